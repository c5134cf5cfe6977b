"""eval_agent.py at equal size (issue 24, items 1, 6 and 8): a budget named by a preset, the calibration
stated and kept apart from held-out text, and a summary that says "worse" when the policy is worse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINYSTORIES, load_script, run_main

from qenv import load_model
from qenv.quant.presets import resolve_budget

REPO = Path(__file__).resolve().parents[1]
DEPTH_AGENT = f"{REPO / 'docs' / 'examples' / 'depth_agent.py'}:DepthAgent"
WIKITEXT_TRAIN = REPO.parent / "shared" / "data" / "wikitext-2" / "train.txt"

train_agent = load_script("train_agent")
eval_agent = load_script("eval_agent")


@pytest.fixture(scope="module")
def depth_run(stories_bin, cache_dir, tmp_path_factory) -> Path:
    """The docs' DepthAgent (most bits that fit, plain RTN first on the menu): a policy worse than greedy,
    trained on text."""
    if not TINYSTORIES.is_file() or not WIKITEXT_TRAIN.is_file():
        pytest.skip("real data missing: tinystories / wikitext-2 beside the repo")
    root = tmp_path_factory.mktemp("depth")
    code = run_main(train_agent, ["--agent", DEPTH_AGENT, "--model", stories_bin, "--budget-bpw", "3.0",
                                  "--evaluations", 1, "--data", TINYSTORIES, "--logdir", root, "--name", "d",
                                  "--no-progress", "--env-kwargs", "n_tokens=256", "seq_len=64"])
    assert code == 0
    summary = json.loads((root / "d" / "summary.json").read_text())
    assert summary["total_timesteps"] == 35  # --evaluations 1: one episode of stories260K's 35 layers
    return root / "d" / "model.zip"


@pytest.mark.slow  # extended tier: trains a depth-agent run
def test_worse_policy_is_printed_worse_at_a_presets_size(depth_run, stories_bin, tmp_path, capsys):
    out = tmp_path / "o"
    code = run_main(eval_agent, ["--policy", depth_run, "--agent", DEPTH_AGENT, "--budget-bpw", "gptq-w3", "--calib-data", WIKITEXT_TRAIN,
                                 "--data", TINYSTORIES, "--searchers", "greedy,uniform", "--search-evals", 1,
                                 "--out", out])
    text = capsys.readouterr().out
    assert code == 0, text
    results = json.loads((out / "results.json").read_text())
    model = results["models"][0]
    bpw, _ = resolve_budget("gptq-w3", load_model(stories_bin, device="cpu").layers)
    assert model["budget_bpw"] == pytest.approx(bpw) and model["budget_preset"] == "gptq-w3"
    assert results["budget_preset"] == "gptq-w3"
    assert f"budget gptq-w3 ({bpw:.3f} bpw)" in text
    # the calibration is stated: the --calib-data text, not the run's (the held-out file)
    assert "calibrated on 256 tokens of text:train.txt[0:256]" in text
    assert "scored on held-out text (256 tokens of TinyStories-valid-first1000.txt)" in text
    rows = {r["method"]: r for r in model["rows"]}
    policy, greedy = rows["policy (DepthAgent)"], rows["greedy"]
    assert greedy["kl"] < policy["kl"]  # the set-up: plain RTN where greedy picks GPTQ and friends
    lead = next(line for line in text.splitlines() if line.startswith("trained-on model stories260K:"))
    assert "greedy KL" in lead and "x, policy worse)" in lead.split("the best start")[0]
    assert ": policy worse than greedy" in lead
    assert model["comparisons"]["greedy"]["verdict"] == "policy worse"
    # the best preset at or under the budget comes second, and is never a win
    ref = [line for line in text.splitlines() if line.startswith("  for reference")]
    assert len(ref) == 1 and "better" not in ref[0]


@pytest.mark.slow  # extended tier: trains a depth-agent run
def test_held_out_text_is_never_calibration(depth_run, tmp_path, capsys):
    """The run calibrated on TinyStories: scoring on the same file's first tokens is refused in one line."""
    code = run_main(eval_agent, ["--policy", depth_run, "--agent", DEPTH_AGENT, "--data", TINYSTORIES, "--searchers", "none",
                                 "--out", tmp_path / "o"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: Held-out --data") and "--calib-data" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("program", ["train", "eval"])
@pytest.mark.slow  # extended tier: trains a depth-agent run
def test_unknown_preset_budget_is_one_line(program, depth_run, stories_bin, tmp_path, capsys):
    argv = (["--agent", "uniform", "--model", stories_bin, "--logdir", tmp_path, "--name", "x"] if program == "train"
            else ["--policy", depth_run, "--agent", DEPTH_AGENT, "--out", tmp_path / "x"])
    code = run_main(train_agent if program == "train" else eval_agent, argv + ["--budget-bpw", "no-such-preset"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "no-such-preset" in lines[0] and "gptq-w4" in lines[0] and "Fix: " in lines[0]
    assert not (tmp_path / "x").exists()
