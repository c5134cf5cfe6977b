"""bench/bench_quality.py: its quality jobs on a real model, the RL methods' rows (rl_best, rl_eval,
the rule kinds), the transfer runs, and the tables it writes from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qenv.quant.rules import Rule

REPO = Path(__file__).resolve().parents[2]


def load_bench_quality(name: str):
    """bench/bench_quality.py as a module (a script of the bench folder, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "bench_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def load_plan_deviations():
    from qenv.cli.config import load_agent_config

    return load_agent_config(REPO / "configs" / "maskable_ppo.yaml", "QuantLLM-v0").hyperparams["plan_deviations"]


def test_bench_quality_transfer_table_counts_unseen_cells_against_each_baseline():
    """The zero-shot table puts greedy, random search and evolution beside the best human recipe and
    counts only the models the policy never saw (strictly lower KL wins; a tie with greedy is no win)."""
    bench = load_bench_quality("bench_quality_tr")

    def cell(model, budget, seen, kl, greedy, human):
        return {"model": model, "budget": budget, "seen": seen, "seeds": [0], "policy_kl": (kl, 0.0),
                "policy_ppl": (10.0, 0.0), "policy_top1": (0.5, 0.0), "policy_bpw": (budget, 0.0),
                "best_human": ["gptq-w2"], "human_kl": human, "human_ppl": 12.0, "human_top1": 0.4,
                "human_bpw": 2.56, "kl_ratio": (human / kl, 0.0), "ppl_diff": (-2.0, 0.0),
                "train_timesteps": (512.0, 0.0),
                "searched": {"greedy": {"kl": greedy, "bpw": budget}, "random": {"kl": 9.0, "bpw": budget, "evals": 16},
                             "evolution": {"kl": 0.5, "bpw": budget, "evals": 16}}}

    md = "\n".join(bench.transfer_markdown([cell("a", 2.5, False, 1.0, 1.2, 0.9), cell("b", 3.0, False, 1.0, 1.0, 2.0),
                                             cell("c", 3.0, True, 0.1, 1.0, 2.0)]))
    assert "| a | **no** | 2.5 |" in md and "| 1.2 (2.50) | 9 (16) | 0.5 (16) | **better** (1.20x) |" in md
    assert "beats greedy in 1/2 cells" in md and "beats random search in 2/2" in md and "beats evolution in 0/2" in md
    assert "at or under the budget in 1/2 cells" in md and "at 3.0 bpw and above in 1/1 cells" in md


def test_bench_quality_merge_fills_zero_shot_rows_from_the_same_complete_training():
    """A later run that trained the same (budget, seed) completely and as long fills the zero-shot
    rows the first run's deadline cut off; one whose training was shorter fills nothing."""
    bench = load_bench_quality("bench_quality_merge")

    def run(steps, models, truncated=False):
        rows = [{"kind": "transfer", "method": "train", "budget": 3.5, "seed": 0, "timesteps": steps,
                 "truncated": truncated}]
        return rows + [{"kind": "transfer", "method": "eval", "budget": 3.5, "seed": 0, "model": m, "seen": False,
                        "policy": {"kl": kl}} for m, kl in models]

    first = run(12288, [("gpt2", 0.1)])
    notes: list[str] = []
    rows = bench.merge_runs([first, run(12288, [("gpt2", 0.2), ("smollm2", 0.3)])], notes)
    evals = sorted((r["model"], r["policy"]["kl"], r["run"]) for r in rows if r.get("method") == "eval")
    assert evals == [("gpt2", 0.1, 0), ("smollm2", 0.3, 1)] and any("kept" in n for n in notes)
    rows = bench.merge_runs([first, run(4096, [("smollm2", 0.3)])])
    assert [r["model"] for r in rows if r.get("method") == "eval"] == ["gpt2"]
    other = run(12288, [("smollm2", 0.3)])
    other[0]["observation"] = "relative"  # as long, but another policy
    rows = bench.merge_runs([first, other])
    assert [r["model"] for r in rows if r.get("method") == "eval"] == ["gpt2"]


def quality_cfg(bench, stories_bin, out, **over):
    """A bench_quality.py quality job's settings for stories260K at 3.0 bpw, small and on the CPU."""
    import time

    data_dir = stories_bin.parents[1]
    return {"model": bench.resolve_model("stories260K", data_dir), "budget": 3.0, "deadline": time.time() + 600,
            "out": str(out), "data_dir": str(data_dir), "n_tokens": 256, "seq_len": 32, "batch_size": 8,
            "held_tokens": 256, "device": "cpu", "dtype": "float32", "cache_dir": str(Path(out) / "c"),
            "seeds": [0], "rl_agent": "maskable_ppo", "action_kind": "residual", "threads": 1, **over}


@pytest.mark.slow  # extended tier: runs the benchmark (trains)
def test_bench_quality_reports_the_best_training_episode(stories_bin, tmp_path):
    """bench_quality.py reports the RL run twice: its deterministic rollout (ppo) and, like the
    searchers, the best recipe of its N training episodes (rl_best), measured again."""
    pytest.importorskip("sb3_contrib")
    bench = load_bench_quality("bench_quality_rl")
    cfg = quality_cfg(bench, stories_bin, tmp_path, episodes=4, methods=["ppo"], rl_observation="relative")
    bench.quality_job(cfg)
    rows = {r["method"]: r for r in bench.load_rows(tmp_path)}
    assert rows["ppo"]["observation"] == rows["rl_best"]["observation"] == "relative"
    assert {"ppo", "rl_best"} <= set(rows) and "error" not in rows["rl_best"], rows.get("rl_best")
    best, ppo = rows["rl_best"], rows["ppo"]
    assert best["evals"] == 4 and 1 <= best["best_episode"] <= 4 and ppo["evals"] == 4
    assert best["kl"] == pytest.approx(best["episode_kl_min"], rel=1e-5)  # the best episode's recipe, measured again
    assert best["bpw"] <= 3.0 + 1e-9 and ppo["plan_deviations"] == load_plan_deviations()
    agg = bench.aggregate(bench.load_rows(tmp_path))
    assert "rl_best" in agg["cells"]["stories260K"]["3"]
    table = "\n".join(bench.rl_vs_searchers(agg))
    assert "| stories260K | 3 |" in table and "- rl_best: beats random in 0/0 cells" in table  # no random run here


@pytest.mark.slow  # extended tier: runs the benchmark (trains)
def test_bench_quality_rl_eval_reports_the_best_of_k_evaluated_rollouts(stories_bin, tmp_path):
    """rl_eval: N − K training episodes, the deterministic rollout evaluated along the way (at most
    K times, N evaluations in all), and the best evaluation's recipe measured again; the report
    gives it its own column."""
    pytest.importorskip("sb3_contrib")
    bench = load_bench_quality("bench_quality_rleval")
    cfg = quality_cfg(bench, stories_bin, tmp_path, episodes=8, methods=["greedy", "rl_eval"], rl_eval_points=4)
    bench.quality_job(cfg)
    rows = {r["method"]: r for r in bench.load_rows(tmp_path)}
    row = rows["rl_eval"]
    assert "error" not in row, row
    assert row["train_episodes"] == 4 and 1 <= row["eval_points"] <= 4 and row["evals"] <= 8
    assert not row["truncated"] and len(row["eval_kls"]) == row["eval_points"]
    # the reward is the fidelity to the reference (size_weight 0): the best evaluation has the least KL
    assert row["kl"] == pytest.approx(min(row["eval_kls"]), rel=1e-5) and row["bpw"] <= 3.0 + 1e-9
    assert {"ppo", "rl_best"}.isdisjoint(rows)  # a run of its own
    table = "\n".join(bench.rl_vs_searchers(bench.aggregate(bench.load_rows(tmp_path))))
    assert "RL best of K evaluated rollouts (rl_eval)" in table and "- rl_eval: beats random in 0/0 cells, greedy in" in table
    assert "(ppo)" not in table


def test_bench_quality_counts_no_win_from_float_noise():
    """A mean over seeds that all ended on greedy's recipe is that recipe's KL, not an ulp below
    it, and the report's "beats" needs more than float noise."""
    bench = load_bench_quality("bench_quality_noise")
    x = 0.027259780652821064
    assert bench._mean_std([x, x, x]) == (x, 0.0)
    assert not bench.lower(x * (1 - 1e-12), x) and bench.lower(x * (1 - 1e-6), x)
    cells = {"cells": {"m": {"3": {"greedy": {"kl": (x, 0.0), "runs": [1]},
                                   "rl_eval": {"kl": (x * (1 - 1e-12), 0.0), "runs": [1]}}}}}
    table = "\n".join(bench.rl_vs_searchers(cells))
    assert "(beats none)" in table and "greedy in 0/1" in table and "random in 0/0" in table


@pytest.mark.slow  # extended tier: runs the benchmark (trains)
def test_bench_quality_rl_env_reaches_the_rl_method_and_bad_keys_are_one_line(stories_bin, tmp_path, capsys):
    """--rl-env goes to the RL method's env only (max_deviations=0: its rollout is greedy's recipe,
    recorded in the rows); an unknown or ill-typed key stops the run before anything is written."""
    pytest.importorskip("sb3_contrib")
    import time

    bench = load_bench_quality("bench_quality_rlenv")
    data_dir = stories_bin.parents[1]
    cfg = {"model": bench.resolve_model("stories260K", data_dir), "budget": 3.0, "deadline": time.time() + 600,
           "episodes": 2, "out": str(tmp_path / "q"), "data_dir": str(data_dir), "n_tokens": 256, "seq_len": 32,
           "batch_size": 8, "held_tokens": 256, "device": "cpu", "dtype": "float32", "cache_dir": str(tmp_path / "c"),
           "seeds": [0], "methods": ["greedy", "ppo"], "rl_agent": "maskable_ppo", "action_kind": "residual",
           "threads": 1, "rl_env": {"max_deviations": 0, "size_weight": 0.01}}
    bench.quality_job(cfg)
    rows = {r["method"]: r for r in bench.load_rows(tmp_path / "q")}
    assert rows["ppo"]["rl_env"] == {"max_deviations": 0, "size_weight": 0.01}
    assert rows["ppo"]["kl"] == rows["greedy"]["kl"] and rows["ppo"]["bpw"] == rows["greedy"]["bpw"]
    assert bench.rl_env_kwargs({"rl_env": {"a": 1}, "transfer_eval_env": {"a": 2}}, evaluation=True) == {"a": 2}
    for bad, match in ((["--rl-env", "max_deviation=3"], "is not an argument of QuantLLM-v0"),
                       (["--transfer-eval-env", "max_deviations=-1"], "--transfer-eval-env: max_deviations=-1"),
                       (["--rl-env", "size_weight"], "is not key=value"),
                       (["--rl-env", "budget_bpw=2.5"], "set by bench_quality.py itself"),
                       (["--rl-env", "max_deviations=5", "--action-kind", "discrete"], "--action-kind discrete"),
                       (["--rl-config", str(tmp_path / "nope.yaml")], "is not a file"),
                       # the action kind comes from --rl-config's env_kwargs: allocation, not residual
                       (["--rl-agent", "ppo", "--rl-config", str(REPO / "configs" / "ppo_allocation.yaml"), "--rl-env",
                         "max_deviations=3"], "--action-kind allocation")):
        out = tmp_path / "never"
        code = bench.main(["run", "--models", "stories260K", "--out", str(out), *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and match in err[0] and not out.exists(), err


@pytest.mark.slow  # extended tier: runs the benchmark (trains)
def test_bench_quality_transfer_rolls_out_under_the_eval_env(stories_bin, tmp_path):
    """--transfer-eval-env reaches the zero-shot rollouts (not the training) and both rows say so."""
    pytest.importorskip("sb3_contrib")
    bench = load_bench_quality("bench_quality_tr_env")
    out = tmp_path / "tr"
    code = bench.main(["run", "--models", "--data-dir", str(stories_bin.parents[1]), "--out", str(out),
                       "--transfer-train", "default", "--transfer-test", "stories260K", "--transfer-budgets", "3.0",
                       "--transfer-seeds", "0", "--transfer-timesteps", "128", "--transfer-eval-jobs",
                       "--no-transfer-eval-seen", "--rl-agent", "maskable_ppo", "--action-kind", "residual",
                       "--rl-observation", "relative", "--rl-env", "size_weight=0.01", "--transfer-eval-env",
                       "max_deviations=0", "--device", "cpu", "--n-tokens", "256", "--held-tokens", "256",
                       "--max-procs", "2", "--deadline-s", "300"])
    assert code == 0
    rows = [r for r in bench.load_rows(out) if r.get("kind") == "transfer"]
    train = next(r for r in rows if r["method"] == "train")
    ev = next(r for r in rows if r["method"] == "eval")
    assert train["rl_env"] == {"size_weight": 0.01} and train["eval_env"] == ev["eval_env"]
    assert ev["eval_env"] == {"size_weight": 0.01, "max_deviations": 0} and ev["deviations"] == 0
    assert "error" not in ev and ev["policy"]["bpw"] <= 3.0 + 1e-9


@pytest.fixture(scope="module")
def allocation_transfer(stories_bin, tmp_path_factory):
    """One bench_quality.py transfer run for two tests (it trains and rolls out in worker processes):
    --rl-config configs/ppo_allocation.yaml, trained at 3.0 bpw (--transfer-train-budget) and rolled
    out at 2.5 and 3.5. The deadline is far: a busy machine must not truncate the jobs (no row at 3.5)."""
    bench = load_bench_quality("bench_quality_rl_config")
    out = tmp_path_factory.mktemp("allocation-transfer") / "tr"
    code = bench.main(["run", "--models", "--data-dir", str(stories_bin.parents[1]), "--out", str(out),
                       "--transfer-train", "default", "--transfer-test", "stories260K", "--transfer-budgets", "2.5",
                       "3.5", "--transfer-train-budget", "3.0", "--transfer-seeds", "0", "--transfer-timesteps", "128",
                       "--transfer-eval-jobs", "--no-transfer-eval-seen", "--rl-agent", "ppo", "--rl-config",
                       str(REPO / "configs" / "ppo_allocation.yaml"), "--device", "cpu", "--n-tokens", "256",
                       "--held-tokens", "256", "--max-procs", "2", "--deadline-s", "1800"])
    assert code == 0
    return bench, out


@pytest.mark.slow  # extended tier: runs the benchmark (trains)
def test_bench_quality_transfer_with_an_rl_config_of_the_allocation_kind(allocation_transfer):
    """--rl-config: the RL method's hyperparameters and env_kwargs from another file
    (configs/ppo_allocation.yaml: PPO on the allocation kind with the relative observation), its
    action kind and observation taken from it, in training and in the zero-shot rollouts."""
    bench, out = allocation_transfer
    settings = json.loads((out / "raw" / "settings.json").read_text())["args"]
    assert settings["action_kind"] == "allocation" and settings["rl_observation"] is None
    rows = [r for r in bench.load_rows(out) if r.get("kind") == "transfer"]
    trains = [r for r in rows if r["method"] == "train"]
    assert trains and all((r["agent"], r["action_kind"], r["observation"]) == ("ppo", "allocation", "relative")
                          for r in trains), trains
    evals = [r for r in rows if r["method"] == "eval"]
    assert evals and all("error" not in ev for ev in evals), evals
    assert all(ev["policy"]["bpw"] <= ev["budget"] + 1e-9 for ev in evals)


@pytest.mark.slow  # extended tier: runs the benchmark (trains)
def test_bench_quality_transfer_trains_one_policy_for_every_budget(allocation_transfer):
    """--transfer-train-budget: every budget's zero-shot rollouts use the policy trained at that one
    budget (the jobs of both budgets trained the same weights), and the report says so."""
    import torch

    bench, out = allocation_transfer
    rows = [r for r in bench.load_rows(out) if r.get("kind") == "transfer"]
    trains = {r["budget"]: r for r in rows if r["method"] == "train"}
    assert set(trains) == {2.5, 3.5} and {r["train_budget"] for r in trains.values()} == {3.0}
    evals = {r["budget"]: r for r in rows if r["method"] == "eval"}
    assert set(evals) == {2.5, 3.5} and all("error" not in r for r in evals.values()), evals
    assert evals[2.5]["policy"]["bpw"] <= 2.5 + 1e-9 < evals[3.5]["policy"]["bpw"] <= 3.5 + 1e-9
    a, b = (torch.load(bench.policy_file(out, budget, 0), weights_only=True) for budget in (2.5, 3.5))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # one policy
    assert "at 3 bpw (one policy for every budget)" in (out / "quality_tables.md").read_text()


@pytest.mark.slow  # extended tier: runs the benchmark (trains)
def test_bench_quality_trains_on_the_rule_kinds(stories_bin, tmp_path):
    """bench_quality.py's RL method runs on the kinds that invent rules: MaskablePPO on ``rule``
    (the benchmark config's plan_deviations, which only the residual kind has, is left out) and
    SAC on ``continuous`` (off-policy: no rollout length to size); the rows count the rules that
    are not on the menu."""
    pytest.importorskip("sb3_contrib")
    import time

    from qenv.envs.spaces import DEFAULT_MENU

    bench = load_bench_quality("bench_quality_rules")
    assert "plan_deviations" in bench.ppo_hyperparams(42, 4, agent="maskable_ppo", action_kind="residual")
    assert "plan_deviations" not in bench.ppo_hyperparams(42, 4, agent="maskable_ppo", action_kind="rule")
    assert "n_steps" not in bench.ppo_hyperparams(42, 4, agent="sac", action_kind="continuous")
    data_dir = stories_bin.parents[1]
    for agent, kind in (("maskable_ppo", "rule"), ("sac", "continuous")):
        out = tmp_path / kind
        cfg = {"model": bench.resolve_model("stories260K", data_dir), "budget": 3.0, "deadline": time.time() + 600,
               "episodes": 2, "out": str(out), "data_dir": str(data_dir), "n_tokens": 256, "seq_len": 32,
               "batch_size": 8, "held_tokens": 256, "device": "cpu", "dtype": "float32",
               "cache_dir": str(tmp_path / "c"), "seeds": [0], "methods": ["ppo"], "rl_agent": agent,
               "action_kind": kind, "threads": 1}
        bench.quality_job(cfg)
        rows = {r["method"]: r for r in bench.load_rows(out)}
        for method in ("ppo", "rl_best"):
            row = rows[method]
            assert "error" not in row and row["action_kind"] == kind and row["bpw"] <= 3.0 + 1e-9, row
            rules = {Rule.from_dict(r) for r in row["rules"].values()}
            assert row["distinct_rules"] == len(rules) and row["off_menu_rules"] == len(rules - set(DEFAULT_MENU))
    # --rl-shaping: the RL method's env is shaped, the searchers' env is not; its default is the config's
    assert bench.config_shaping("maskable_ppo") == 1.0 and bench.config_shaping("ppo") == 0.0
    out = tmp_path / "shaped"
    cfg.update(out=str(out), rl_agent="maskable_ppo", action_kind="residual", rl_shaping=1.0, methods=["greedy", "ppo"])
    bench.quality_job(cfg)
    rows = {r["method"]: r for r in bench.load_rows(out)}
    assert rows["ppo"]["shaping_weight"] == 1.0 and rows["rl_best"]["shaping_weight"] == 1.0
    assert "error" not in rows["greedy"] and rows["ppo"]["bpw"] <= 3.0 + 1e-9
    # a menu recipe has no rule off the menu
    menu = bench.menu_use({"a": DEFAULT_MENU[0], "b": DEFAULT_MENU[0], "c": DEFAULT_MENU[3]})
    assert (menu["distinct_rules"], menu["off_menu_rules"], menu["off_menu_layers"]) == (2, 0, 0)
    odd = bench.menu_use({"a": Rule(bits=3, group_size=128, symmetric=True), "b": DEFAULT_MENU[3]})
    assert (odd["off_menu_rules"], odd["off_menu_layers"]) == (1, 1)
