"""The two test tiers (tests/conftest.py): tests marked ``slow`` are skipped by the README's test command
and run with ``--run-slow`` or ``QENV_SLOW_TESTS=1``; a parametrization's representative cases stay in
the default tier. Run on a copy of the real conftest in pytest's own ``pytester`` sandbox."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

pytest_plugins = ("pytester",)

CONFTEST = Path(__file__).with_name("conftest.py")
TESTS = """
import pytest
from conftest import extended_beyond


def test_default():
    pass


@pytest.mark.slow
def test_extended():
    pass


@pytest.mark.parametrize("case", extended_beyond(["kept", "other", "third"], ["kept"]))
def test_cases(case):
    pass
"""


@pytest.fixture()
def sandbox(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("QENV_SLOW_TESTS", raising=False)
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_tiers_sample=TESTS)
    pytester.syspathinsert()  # `from conftest import ...`, as the real test modules do
    return pytester


def test_the_default_tier_skips_slow_tests_in_one_summary_line(sandbox: pytest.Pytester) -> None:
    result = sandbox.runpytest_inprocess("-ra", "-v")
    result.assert_outcomes(passed=2, skipped=3)
    assert len([line for line in result.outlines if line.startswith("SKIPPED [3] ")]) == 1, result.outlines
    result.stdout.fnmatch_lines(["*extended tier*--run-slow or QENV_SLOW_TESTS=1*"])
    assert any("test_cases[kept] PASSED" in line for line in result.outlines), result.outlines


def test_run_slow_runs_everything(sandbox: pytest.Pytester) -> None:
    sandbox.runpytest_inprocess("--run-slow").assert_outcomes(passed=5)


@pytest.mark.parametrize("value, runs", [("1", True), ("true", True), ("0", False), ("", False), (None, False)])
def test_qenv_slow_tests_set_true_runs_everything(monkeypatch: pytest.MonkeyPatch, value, runs: bool) -> None:
    from conftest import run_slow_tests

    if value is None:
        monkeypatch.delenv("QENV_SLOW_TESTS", raising=False)
    else:
        monkeypatch.setenv("QENV_SLOW_TESTS", value)
    without_the_flag = SimpleNamespace(getoption=lambda name: False)
    assert run_slow_tests(without_the_flag) is runs


def test_a_representative_case_must_be_a_value() -> None:
    from conftest import extended_beyond

    with pytest.raises(AssertionError, match="not among"):
        extended_beyond(["a", "b"], ["c"])
