"""The bench scripts beside bench_quality.py: zero_shot_table.py, zero_shot_vs_greedy.py, and the
one-off experiments of bench/experiments/ (recipe_shift, depth_tilt, replan_gap, one_deviation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: one-off experiment scripts (bench/experiments/README.md), apart from the benchmarks users run
EXPERIMENTS = REPO / "bench" / "experiments"


def test_zero_shot_table_reads_eval_agent_results(tmp_path):
    """bench/zero_shot_table.py turns eval_agent.py's results.json into the zero-shot rows: only
    unseen models, the best preset at or under the budget, and strict wins counted per baseline."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("zero_shot_table", REPO / "bench" / "zero_shot_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)

    def row(method, kind, kl, bpw, over=False):
        return {"method": method, "kind": kind, "kl": kl, "bpw": bpw, "over_budget": over}

    rows = [row("policy (maskable_ppo)", "policy", 1.0, 3.0), row("greedy", "searcher", 1.0, 3.0),
            row("random", "searcher", 2.0, 3.0), row("evolution", "searcher", 0.9, 3.0),
            row("gptq-w2", "preset", 1.5, 2.3), row("q4_k_m", "preset", 0.1, 5.0, over=True)]
    run = {"budget_bpw": 3.0, "models": [
        {"model": "new", "n_layers": 7, "seen": False, "status": "zero-shot", "rows": rows},
        {"model": "old", "n_layers": 7, "seen": True, "status": "trained on", "rows": rows}]}
    (tmp_path / "results.json").write_text(json.dumps(run))
    cells = table.cells([str(tmp_path / "results.json")])
    assert [c["model"] for c in cells] == ["new"] and cells[0]["best_preset"]["method"] == "gptq-w2"
    md = table.markdown(cells)
    assert "| new (7) | 3 | 1 (3.000) | 1 | 2 | 0.9 | — | gptq-w2: 1.5 (2.300) | same (1.00x) | **better** (1.50x) |" in md
    assert "beats greedy in 0/1" in md and "beats random search in 1/1" in md and "evolution in 0/1" in md


@pytest.mark.slow  # extended tier: a zoo training and the script's rollouts
def test_zero_shot_vs_greedy_rolls_out_the_runs_policy_against_greedy(zoo_run, tmp_path):
    """bench/zero_shot_vs_greedy.py: the run's policy (residual kind) against greedy's recipe on an
    unseen model; with max_deviations=0 given on top of the run's settings the rollout is greedy's."""
    import shutil
    import subprocess
    import sys

    out = {}
    run = tmp_path / "zoo"  # the policy under another name, as --eval-freq's best_model.zip: --policy reads it
    shutil.copytree(zoo_run / "zoo", run, ignore=shutil.ignore_patterns("tb", "checkpoints"))
    (run / "model.zip").rename(run / "best_model.zip")
    for extra in (["--env", "cache_dir=false"], ["--env", "cache_dir=false", "max_deviations=0"]):
        path = tmp_path / f"zs{len(extra)}.json"
        subprocess.run([sys.executable, str(REPO / "bench" / "zero_shot_vs_greedy.py"), str(run),
                        "--policy", "best_model.zip", "--models", "tiny-gpt2", "--budgets", "3.0", "--n-tokens", "256",
                        *extra, "--out", str(path)], check=True, capture_output=True, text=True, cwd=tmp_path)
        out[len(extra)] = json.loads(path.read_text())
    row = out[2]["rows"][0]
    assert row["model"] == "tiny-gpt2" and row["budget"] == 3.0 and row["policy_bpw"] <= 3.0 + 1e-9
    assert row["verdict"] == ("better" if row["policy_kl"] < row["greedy_kl"] else
                              "same" if row["policy_kl"] == row["greedy_kl"] else "worse")
    limited = out[3]["rows"][0]
    assert out[3]["env"]["max_deviations"] == 0 and out[3]["env"]["cache_dir"] is False and limited["layers_off_plan"] == 0 and limited["verdict"] == "same"
    assert limited["policy_kl"] == limited["greedy_kl"] == row["greedy_kl"]


@pytest.mark.slow  # extended tier: runs the experiment scripts
def test_recipe_shift_and_depth_tilt_scripts(stories_bin, tmp_path):
    """bench/experiments/recipe_shift.py counts the layers an RL recipe that beats greedy moves up or down
    against greedy's recipe (from a rollout that stayed on the plan), by kind and by third of the
    model; bench/experiments/depth_tilt.py plays the allocation kind with a fixed depth tilt on a real model."""
    import re
    import subprocess
    import sys

    rule = lambda bits: {"bits": bits, "group_size": 128}  # noqa: E731
    plan = {"model.layers.0.self_attn.k_proj": rule(3), "model.layers.5.mlp.up_proj": rule(4)}
    better = {"model.layers.0.self_attn.k_proj": rule(4), "model.layers.5.mlp.up_proj": rule(3)}
    (tmp_path / "run" / "raw").mkdir(parents=True)
    lines = [{"model": "m", "budget": 3.0, "method": "greedy", "kl": 1.0},
             {"model": "m", "budget": 3.0, "method": "ppo", "seed": 0, "kl": 1.0, "rules": plan},
             {"model": "m", "budget": 3.0, "method": "rl_eval", "seed": 0, "kl": 0.8, "rules": better}]
    (tmp_path / "run" / "raw" / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = subprocess.run([sys.executable, str(EXPERIMENTS / "recipe_shift.py"), str(tmp_path / "run")],
                         check=True, capture_output=True, text=True).stdout
    assert out.startswith("1 RL recipes better than greedy, in the 1 cells"), out
    assert re.search(r"k_proj:\s+1 layers up,\s+0 down", out) and re.search(r"up_proj:\s+0 layers up,\s+1 down", out)
    assert re.search(r"first third:\s+1 layers up", out) and re.search(r"last third:\s+0 layers up,\s+1 down", out)
    out = subprocess.run([sys.executable, str(EXPERIMENTS / "depth_tilt.py"), str(stories_bin), "--budgets", "3.0",
                          "--tilts", "0", "0.2", "--n-tokens", "256"], check=True, capture_output=True, text=True).stdout
    assert re.search(r"stories260K.bin @ 3: greedy KL [\d.]+; tilted / greedy: a=0: [\d.]+, a=0.2: [\d.]+", out), out


@pytest.mark.slow  # extended tier: runs the experiment scripts
def test_replan_gap_and_one_deviation_scripts_print_their_measurements(stories_bin):
    """bench/experiments/replan_gap.py and bench/experiments/one_deviation.py (the numbers in BENCHMARKS.md's residual
    section) run on a real model and print one line per budget / per (layer, action)."""
    import re
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(EXPERIMENTS / "replan_gap.py"), str(stories_bin), "--budgets", "3.0",
                          "4.0", "--n-tokens", "256"], check=True, capture_output=True, text=True).stdout
    lines = [line for line in out.splitlines() if "layers differ" in line]
    assert len(lines) == 2 and all(re.search(r"summed sensitivity [\d.]+x greedy's", line) for line in lines), out
    out = subprocess.run([sys.executable, str(EXPERIMENTS / "one_deviation.py"), str(stories_bin), "--budget", "4.0",
                          "--layers", "2", "--actions", "1", "--n-tokens", "256"],
                         check=True, capture_output=True, text=True).stdout
    steps = [line for line in out.splitlines() if line.startswith("layer")]
    assert 1 <= len(steps) <= 2 and all("x greedy's" in line for line in steps), out
    assert all(re.search(r"sensitivity x[\d.]+, KL", line) for line in steps), out
