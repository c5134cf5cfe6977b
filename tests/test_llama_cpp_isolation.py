"""llama.cpp runs in a child process with its weight repacking off: a llama.cpp crash is one failed call
(one failed test), never a dead pytest, and what qenv exports is checked by loading it there.

Real children, real signals: the crash test's child really dies of SIGSEGV (it reads address 0)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="the gguf extra (pip install 'qenv[gguf]') is not installed")
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("the gguf extra (llama-cpp-python) is not installed", allow_module_level=True)

from qenv import Evaluator, load_model, tokens_from_model  # noqa: E402
from qenv.errors import QenvError  # noqa: E402
from qenv.llama_cpp_isolated import check_gguf_export, run_llama_cpp, score_gguf, signal_name  # noqa: E402
from qenv.quant.rules import Rule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def evaluator():
    lm = load_model("default")
    return Evaluator(lm, tokens_from_model(lm.model, 128, 64, seed=0), cache_dir=False)


def test_a_segfaulting_child_is_one_error_naming_the_signal() -> None:
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("qenv-llama-cpp-*"))
    crash = "import ctypes, sys; sys.stdin.read(); ctypes.string_at(0)"  # a real SIGSEGV
    with pytest.raises(QenvError) as err:
        run_llama_cpp({"task": "score"}, "scoring x.gguf", script=[sys.executable, "-c", crash])
    message = str(err.value)
    assert "crashed while scoring x.gguf" in message and "SIGSEGV" in message
    assert "--no-repack" in message and "use_extra_bufts" in message
    assert signal_name(-11) == "SIGSEGV" and signal_name(0) is None and signal_name(2) is None
    assert set(Path(tempfile.gettempdir()).glob("qenv-llama-cpp-*")) == before  # its folder is removed too


def test_a_failing_child_is_one_error_with_its_last_line(tmp_path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(QenvError, match=r"llama.cpp failed while scoring .*broken.gguf \(exit status 1: "):
        score_gguf(broken, [[1, 2, 3]])


def _load_log(path: Path, repack: bool) -> subprocess.CompletedProcess:
    code = ("import sys; from qenv.llama_cpp_child import load_llama; "
            f"load_llama({str(path)!r}, repack={repack}, n_ctx=16, verbose=True)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)


# extended tier: two llama.cpp loads (a load with repacking off, its logits compared, stays in the default
# tier: test_export_check_accepts_the_scored_file_and_refuses_another)
@pytest.mark.slow
def test_qenv_loads_turn_llama_cpps_repacking_off(evaluator, tmp_path) -> None:
    """llama.cpp logs a CPU_REPACK buffer when it repacks Q4_0 weights (its default); qenv's loads have none."""
    from qenv.export_gguf import write_gguf

    path = write_gguf(evaluator, {i.name: Rule(gguf="Q4_0") for i in evaluator.layers}, tmp_path / "q4_0.gguf")
    off = _load_log(path, repack=False)
    assert off.returncode == 0, off.stderr[-2000:]
    assert "CPU_Mapped model buffer" in off.stderr and "CPU_REPACK" not in off.stderr
    on = _load_log(path, repack=True)  # the default, which this test shows is really switched
    if on.returncode == 0:  # (a CPU without repacked Q4_0 kernels logs none either way)
        assert "CPU_REPACK" in on.stderr or "REPACK = 1" not in on.stderr


def test_export_check_accepts_the_scored_file_and_refuses_another(evaluator, tmp_path) -> None:
    from qenv.export_gguf import write_gguf

    recipe = {i.name: Rule(gguf="Q5_0") for i in evaluator.layers}
    path = write_gguf(evaluator, recipe, tmp_path / "model.gguf")
    report = check_gguf_export(evaluator, recipe, path)
    assert report.startswith("model.gguf checked: llama.cpp (repacking off") and "repacking" in report
    other = {i.name: Rule(gguf="Q2_K") for i in evaluator.layers}  # a file that is not this recipe's model
    with pytest.raises(QenvError, match="not the model qenv measured"):
        check_gguf_export(evaluator, other, path, probe_repack=False)


@pytest.mark.slow  # extended tier: another llama.cpp check of a written GGUF
def test_export_keeps_model_gguf_only_after_the_check(evaluator, tmp_path) -> None:
    from qenv.export import export_all

    recipe = {i.name: Rule(gguf="Q4_1") for i in evaluator.layers}
    paths = export_all(tmp_path / "x", evaluator.layers, recipe, {"model": "default"}, evaluator=evaluator)
    assert paths["gguf"].is_file()
    assert "model.gguf" not in (paths["skipped"].read_text() if "skipped" in paths else "")
    assert paths["gguf_check"].read_text().startswith("model.gguf checked")


@pytest.mark.slow  # extended tier: the script in a child process
def test_gguf_perplexity_script_runs_without_repacking(evaluator, tmp_path) -> None:
    from conftest import WIKITEXT_TEST, require
    from qenv.export_gguf import write_gguf

    require(WIKITEXT_TEST, "wikitext-2 test text")
    path = write_gguf(evaluator, {i.name: Rule(gguf="Q8_0") for i in evaluator.layers}, tmp_path / "q8.gguf")
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gguf_perplexity.py"), str(path), str(WIKITEXT_TEST),
                          "--n-tokens", "128", "--ctx", "64"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "perplexity" in out.stdout, out.stderr[-2000:]
