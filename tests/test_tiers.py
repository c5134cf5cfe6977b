"""The two test tiers (tests/conftest.py): tests marked ``slow`` are skipped by the README's test command
and run with ``--run-slow`` or ``QENV_SLOW_TESTS=1``; a parametrization's representative cases stay in
the default tier. Run on a copy of the real conftest in pytest's own ``pytester`` sandbox."""

from __future__ import annotations

from pathlib import Path

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
    result = sandbox.runpytest_inprocess("-ra")
    result.assert_outcomes(passed=2, skipped=3)
    assert len([line for line in result.outlines if line.startswith("SKIPPED [3] ")]) == 1, result.outlines
    result.stdout.fnmatch_lines(["*extended tier*--run-slow or QENV_SLOW_TESTS=1*"])
    passed = sandbox.runpytest_inprocess("-v").outlines
    assert any("test_cases[kept] PASSED" in line for line in passed), passed


@pytest.mark.parametrize("how", ["--run-slow", "QENV_SLOW_TESTS=1"])
def test_run_slow_or_the_variable_runs_everything(sandbox: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                  how: str) -> None:
    args = [how] if how.startswith("--") else []
    if not args:
        monkeypatch.setenv(*how.split("="))
    sandbox.runpytest_inprocess(*args).assert_outcomes(passed=5)


def test_a_representative_case_must_be_a_value() -> None:
    from conftest import extended_beyond

    with pytest.raises(AssertionError, match="not among"):
        extended_beyond(["a", "b"], ["c"])
