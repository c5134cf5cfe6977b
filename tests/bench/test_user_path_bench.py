"""bench/bench_user_path.py: the user's commands as child processes, cold then warm, timed by stage from
the programs' own log lines, with the child's peak memory (issue 26 item 8)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "bench_user_path.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_user_path", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stages_are_read_from_stage_lines_and_bars_final_lines() -> None:
    lines = [(0.5, "loading model smollm2-135m ..."), (29.0, "loading model smollm2-135m: done in 28.4 s"),
             (40.0, "layer errors under 5 rules: 10% (105/1050 layer-rule, 2.3 s)"),
             (61.2, "layer errors under 5 rules: done, 1050 layer-rule in 22.1 s"),
             (70.0, "scoring 6 presets: done, 6 preset in 8.7 s"), (71.0, "note: transformers loaded model/ back")]
    assert _module().parse_stages(lines) == [
        {"stage": "loading model smollm2-135m", "s": 28.4, "at": 29.0},
        {"stage": "layer errors under 5 rules", "s": 22.1, "at": 61.2},
        {"stage": "scoring 6 presets", "s": 8.7, "at": 70.0}]


@pytest.mark.slow  # two CLI processes: their imports alone cost ~10 CPU s each
def test_quantize_cold_then_warm_on_a_tiny_model(tmp_path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny-llama", "--commands", "quantize",
                           "--n-tokens", "128", "--seq-len", "64", "--search-evals", "1", "--calib-data", "",
                           "--timeout", "600", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "user_path.json").read_text())
    cold, warm = report["runs"]
    assert (cold["phase"], warm["phase"]) == ("cold", "warm") and cold["rc"] == warm["rc"] == 0
    for run in (cold, warm):
        assert run["peak_rss_mib"] > 50 and run["cpu_s"] > 0 and run["wall_s"] > 0 and run["carriage_returns"] == 0
        names = [s["stage"] for s in run["stages"]]
        assert "loading model tiny-llama" in names and any(n.startswith("scoring ") for n in names)
    # cold computed the reference and the layer features; warm read them from the cache it left
    assert any(s["stage"].startswith("reference pass") for s in cold["stages"])
    assert not any(s["stage"].startswith("reference pass") for s in warm["stages"])
    assert (out / "quantize-warm" / "model").is_dir()
    assert "| quantize | cold | 0 |" in (out / "user_path.md").read_text()
