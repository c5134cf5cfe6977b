"""bench/equal_size.py with tiny settings: a preset's own size as the budget, held-out scores, the ratio,
and "worse" wherever the searched recipe is worse (issue 24, item 8)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from qenv import load_model
from qenv.quant.presets import resolve_budget

REPO = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("equal_size", REPO / "bench" / "equal_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # extended tier: runs the benchmark
def test_equal_size_table_on_stories260k(stories_bin, tmp_path, capsys):
    bench = load_bench()
    data_dir = stories_bin.parents[1]
    if not (data_dir / "tinystories" / "TinyStories-valid-first1000.txt").is_file():
        pytest.skip("real data missing: tinystories beside the repo")
    code = bench.main(["--models", "stories260K", "--presets", "gptq-w4", "--evaluations", "2", "--seeds", "0",
                       "--n-tokens", "256", "--held-tokens", "256", "--seq-len", "64", "--batch-size", "8",
                       "--device", "cpu", "--data-dir", str(data_dir), "--out", str(tmp_path)])
    assert code == 0
    text = (tmp_path / "equal_size.md").read_text()
    bpw, _ = resolve_budget("gptq-w4", load_model(stories_bin, device="cpu").layers)
    row = next(line for line in text.splitlines() if line.startswith("| gptq-w4 "))
    assert row.startswith(f"| gptq-w4 ({bpw:.3f}) | default |")
    assert "text:tinystories_calib.txt" in text and "tinystories_held.txt" in text
    # the calibration and held-out stories are disjoint files cut from one corpus
    calib = (tmp_path / "work" / "tinystories_calib.txt").read_text()
    held = (tmp_path / "work" / "tinystories_held.txt").read_text()
    assert held[:200] not in calib
    rows = {r["method"]: r for r in bench.bq.load_rows(tmp_path) if r.get("budget_preset") == "gptq-w4"}
    human = rows["preset:gptq-w4"]
    assert human["bpw"] == pytest.approx(bpw) and human["budget"] == pytest.approx(bpw)
    for method in ("greedy_plan", "best_uniform", "best_start", "greedy", "evolution"):
        assert rows[method]["bpw"] <= bpw + 1e-9  # searched at the preset's own size
        ratio = rows[method]["held_kl"] / human["held_kl"]
        cell = re.search(rf"\({ratio:.3g}, (\*\*worse\*\*|better|equal)\)", row)
        assert cell is not None, (method, ratio, row)
        assert (cell.group(1) == "**worse**") == (ratio > 1)
    # the preset is one of the best start's candidates: on the calibration tokens it is no worse
    assert rows["best_start"]["kl"] <= human["kl"] and rows["best_start"]["evals"] > 1
    # the best uniform menu rule is one uniform rule, and one of the best start's candidates
    assert len(rows["best_uniform"]["rule"]) == 1 and rows["best_start"]["kl"] <= rows["best_uniform"]["kl"]
    # one calibration sequence of the four was held back; greedy picked its recipe on it
    assert rows["greedy"]["validation_kl"] is not None and rows["greedy"]["validations"] >= 1
    assert "| greedy plan (1 eval) KL / ppl (ratio) | best uniform rule KL / ppl (ratio) | best start KL / ppl " \
        "(ratio) | greedy KL" in text


def test_unknown_preset_is_one_line(tmp_path, capsys):
    code = load_bench().main(["--presets", "no-such-preset", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "gptq-w4" in err[0]


def test_calibration_agreement_counts_rank_order():
    """bench/calib_agreement.py's measure of whether the calibration ranking is the held-out one."""
    spec = importlib.util.spec_from_file_location("calib_agreement", REPO / "bench" / "calib_agreement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    same = module.agreement([0.1, 0.2, 0.3], [1.0, 2.0, 3.0])
    assert same["spearman"] == pytest.approx(1.0) and same["pairs_alike"] == 1.0 and same["best_agrees"]
    swapped = module.agreement([0.1, 0.2, 0.3], [1.0, 3.0, 2.0])
    assert swapped["spearman"] == pytest.approx(0.5) and swapped["pairs_alike"] == pytest.approx(2 / 3)
    flipped = module.agreement([0.1, 0.2, 0.3], [3.0, 2.0, 1.0])
    assert flipped["spearman"] == pytest.approx(-1.0) and not flipped["best_agrees"]
    assert flipped["held_rank_of_calib_best"] == 3


def test_presets_of_equal_size_share_one_job(stories_bin):
    """gptq-w3 and awq-w3 store the same bits: one job (one set of searches) serves both presets."""
    bench = load_bench()
    model = {"name": "stories260K", "spec": str(stories_bin), "corpus": "tinystories"}
    groups = bench.same_size_groups(model, ["gptq-w3", "gptq-w4", "awq-w3", "awq-w4", "q4_k_m-im"], "learned")
    assert groups == [["gptq-w3", "awq-w3"], ["gptq-w4", "awq-w4"], ["q4_k_m-im"]]


def test_table_compares_one_search_with_each_preset_of_its_size():
    """A shared job's searches get one row per preset, each ratio against that preset's own KL."""
    bench = load_bench()
    base = {"kind": "quality", "model": "m", "budget": 3.25, "budget_preset": "gptq-w3", "menu": "learned"}
    rows = [{**base, "method": "meta", "menu": "learned"},
            {**base, "method": "preset:gptq-w3", "kl": 0.5, "held_kl": 0.5, "ppl": 10.0},
            {**base, "method": "preset:awq-w3", "kl": 0.3, "held_kl": 0.3, "ppl": 9.0},
            {**base, "method": "evolution", "seed": 0, "kl": 0.4, "held_kl": 0.4, "ppl": 9.5}]
    lines = [line for line in bench.table(rows).splitlines() if line.startswith("| gptq-w3 ") or
             line.startswith("| awq-w3 ")]
    assert len(lines) == 2
    assert "(0.8, better)" in lines[0] and lines[0].startswith("| gptq-w3 (3.250) | learned |")
    assert "(1.33, **worse**)" in lines[1] and "worse than the preset" in lines[1]
