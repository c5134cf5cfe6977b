"""The programs on what makes the problem transferable: a zoo of models, fine-tuning (--init-from),
eval_agent.py on seen, fine-tuned and unseen models, their bad input, and the rl-zoo3 configs."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import pytest
from conftest import TINY_ZOO_CONFIG as TINY
from conftest import load_script, run_main

import qenv  # noqa: F401  (registers QuantLLM-v0)
from qenv.envs.features import EPISODE_NAMES, STATIC_NAMES

REPO = Path(__file__).resolve().parents[1]
SMALL = {"n_tokens": 256, "seq_len": 32, "cache_dir": False}
train_agent = load_script("train_agent")
eval_agent = load_script("eval_agent")


def one_line_error(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]


@pytest.mark.slow  # extended tier: the zoo training
def test_zoo_training_then_fine_tuning_on_a_new_model(zoo_run, capsys):
    zoo = json.loads((zoo_run / "zoo" / "summary.json").read_text())
    assert [m["name"] for m in zoo["train_models"]][1] == "tiny-llama" and len(zoo["train_models"]) == 2
    ft = json.loads((zoo_run / "ft" / "summary.json").read_text())
    assert ft["init_from"] == str((zoo_run / "zoo" / "model.zip").resolve())
    capsys.readouterr()
    code = run_main(eval_agent, ["--policy", zoo_run / "ft" / "model.zip", "--model", "tiny-qwen2", "--model",
                                 "tiny-gpt2", "--model", "tiny-llama", "--searchers", "greedy", "--out", zoo_run / "ev"])
    out = capsys.readouterr().out
    assert code == 0
    results = json.loads((zoo_run / "ev" / "results.json").read_text())
    assert results["fine_tuned"] == ["tiny-qwen2"] and results["zero_shot"] == ["tiny-gpt2"]
    assert "tiny-qwen2 (fine-tuned model)" in out and "tiny-gpt2 (unseen model)" in out
    # tiny-llama was in the zoo the fine-tuning started from: seen in training, not zero-shot
    assert "tiny-llama (trained-on model)" in out and results["models"][2]["seen"] is True


@pytest.mark.slow  # extended tier: trains and evaluates
def test_eval_agent_on_a_policy_with_every_residual_only_option(stories_bin, tmp_path, capsys):
    """eval_agent builds the searchers' menu env from the run's settings: the residual-only option
    (max_deviations) stays with the policy's env instead of refusing the menu kind."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    assert run_main(train_agent, ["--model", stories_bin, "--config", tmp_path / "tiny.yaml", "--logdir", tmp_path,
                                  "--name", "r", "--no-progress", "--env-kwargs", "n_tokens=256", "seq_len=32",
                                  "cache_dir=false", "observation=relative", "max_deviations=3"]) == 0
    capsys.readouterr()
    code = run_main(eval_agent, ["--policy", tmp_path / "r" / "model.zip", "--model", "tiny-gpt2", "--searchers",
                                 "greedy", "--out", tmp_path / "ev"])
    assert code == 0, capsys.readouterr().err
    methods = [r["method"] for r in json.loads((tmp_path / "ev" / "results.json").read_text())["models"][0]["rows"]]
    assert "greedy" in methods and any(m.startswith("policy") for m in methods)


@pytest.mark.slow  # extended tier: trains and evaluates three budgets
def test_a_policy_over_several_budgets_trains_and_is_evaluated_at_one(stories_bin, tmp_path, capsys):
    """``budgets`` in env_kwargs: training episodes sample them; the run's own deterministic
    evaluation and eval_agent.py run at one budget (budget_bpw / --budget-bpw), not a sampled one."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    args = ["--config", tmp_path / "tiny.yaml", "--logdir", tmp_path, "--no-progress", "--model", stories_bin,
            "--name", "multi", "--env-kwargs", "n_tokens=256", "seq_len=32", "cache_dir=false",
            "budgets=[2.5, 3.0]", "observation=relative"]
    assert run_main(train_agent, [*args, "--timesteps", 350]) == 0  # 10 episodes of 35 layers
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert summary["final"][Path(stories_bin).stem]["bpw"] <= 3.0 + 1e-9  # the config's budget_bpw, 3.0
    # the best training episode is one at that budget too (the others are other sizes, other references)
    best = json.loads((tmp_path / "multi" / "best_recipe.json").read_text())
    assert best["metrics"]["budget_bpw"] == 3.0 and best["metrics"]["bpw"] <= 3.0 + 1e-9
    # TensorBoard: each budget's episodes also on curves of their own, which add up to the mixed one
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "multi" / "tb" / "run_1"), size_guidance={"scalars": 0})
    acc.Reload()
    counts = {tag: len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"] if tag.endswith("/fidelity_reward")}
    assert set(counts) == {"episode/fidelity_reward", "episode/budget_2.5/fidelity_reward",
                           "episode/budget_3/fidelity_reward"}, counts
    assert counts["episode/budget_2.5/fidelity_reward"] + counts["episode/budget_3/fidelity_reward"] == \
        counts["episode/fidelity_reward"]
    capsys.readouterr()
    # a budget no model can meet is one line and exit 2 with worker processes too, not their tracebacks
    bad = [a if not str(a).startswith("budgets=") else "budgets=[1.0, 3.0]" for a in args[:-1]] + [
        "--name", "floor", "--n-envs", 2, "--vec-env", "subproc"]
    assert run_main(train_agent, bad) == 2
    err = capsys.readouterr().err
    assert "budgets has 1, which is below" in err and "Traceback" not in err and not (tmp_path / "floor").exists()
    capsys.readouterr()
    for budget in (2.5, 4.0):
        out = tmp_path / f"ev{budget}"
        assert run_main(eval_agent, ["--policy", tmp_path / "multi" / "model.zip", "--budget-bpw", budget,
                                     "--searchers", "none", "--out", out]) == 0
        result = json.loads((out / "results.json").read_text())["models"][0]
        policy = next(row for row in result["rows"] if row["kind"] == "policy")
        assert result["budget_bpw"] == budget and budget - 0.3 < policy["bpw"] <= budget + 1e-9, policy


def test_init_from_a_policy_with_another_observation_size(tmp_path, capsys):
    from stable_baselines3 import PPO

    other = gym.make("CartPole-v1")  # 4 observations, 2 actions
    PPO("MlpPolicy", other, n_steps=32, batch_size=32).save(tmp_path / "cartpole")
    code = run_main(train_agent, ["--init-from", tmp_path / "cartpole.zip", "--logdir", tmp_path, "--no-progress"])
    one_line_error(capsys, code, "observations of size (4,)", "Fix:")
    assert not any((tmp_path / d).is_dir() for d in ("ppo",)) and not list(tmp_path.glob("ppo-*"))


@pytest.mark.slow  # extended tier: the zoo training
def test_init_from_with_another_action_kind(zoo_run, tmp_path, capsys):
    code = run_main(train_agent, ["--init-from", zoo_run / "zoo" / "model.zip", "--env-kwargs",
                                  "action_kind=discrete", "--logdir", tmp_path, "--no-progress"])
    one_line_error(capsys, code, "acts in Discrete(7)", "action_kind")


@pytest.mark.slow  # extended tier: the zoo training
def test_a_policy_fed_another_observation_kind_of_the_same_size(zoo_run, tmp_path, capsys):
    """full and relative observations have the same size: fine-tuning or evaluating a policy with
    the kind it did not train with is one line, before anything is written."""
    code = run_main(train_agent, ["--init-from", zoo_run / "zoo" / "model.zip", "--env-kwargs", "action_kind=residual",
                                  "observation=relative", "--logdir", tmp_path, "--name", "r", "--no-progress"])
    one_line_error(capsys, code, "observation=relative differs from the observation=full", "use observation=full")
    assert not (tmp_path / "r").exists()
    code = run_main(eval_agent, ["--policy", zoo_run / "zoo" / "model.zip", "--model", "tiny-gpt2", "--env-kwargs",
                                 "observation=relative", "--out", tmp_path / "ev"])
    one_line_error(capsys, code, "observation=relative differs", "train a policy with observation=relative")
    assert not (tmp_path / "ev").exists()


@pytest.mark.slow  # extended tier: the zoo training
def test_init_from_a_policy_of_another_algorithm(zoo_run, tmp_path, capsys):
    # a PPO zip fine-tuned as A2C loaded (same policy network) and then failed in A2C's optimizer
    # (KeyError 'square_avg') after writing the run folder
    code = run_main(train_agent, ["--init-from", zoo_run / "zoo" / "model.zip", "--agent", "a2c", "--env-kwargs",
                                  "action_kind=residual", "--logdir", tmp_path, "--name", "a", "--no-progress"])
    one_line_error(capsys, code, "trained by 'ppo'", "--agent ppo")
    assert not (tmp_path / "a").exists()


def test_zoo_with_a_budget_one_model_cannot_meet(stories_bin, tmp_path, capsys):
    # the cheapest menu rules reach 2.250 bpw on tiny-llama but 2.264 on stories260K
    code = run_main(train_agent, ["--model", "tiny-llama", "--model", stories_bin, "--budget-bpw", 2.255,
                                  "--logdir", tmp_path, "--name", "z", "--no-progress", "--env-kwargs",
                                  "n_tokens=256", "seq_len=32"])
    one_line_error(capsys, code, "stories260K (one of the 2 models of this zoo", "at least 2.264")
    assert not (tmp_path / "z").exists()


def test_unknown_action_kind_in_the_program(tmp_path, capsys):
    code = run_main(train_agent, ["--env-kwargs", "action_kind=bogus", "--logdir", tmp_path, "--no-progress"])
    one_line_error(capsys, code, "Unknown action space kind 'bogus'", "residual")


# -- configs --------------------------------------------------------------------------------------------
CONFIGS = {"ppo": "ppo", "maskable_ppo": "ppo", "a2c": "a2c", "dqn": "dqn", "sac": "sac", "td3": "td3", "ddpg": "ddpg",
           "ppo_allocation": "ppo"}  # configs/<file>.yaml -> rl-zoo3's algorithm (and qenv's agent: the file's stem


def test_every_algorithm_has_a_config_qenv_accepts():
    from qenv.agents.registry import check_hyperparams
    from qenv.cli.config import load_agent_config

    assert {p.stem for p in (REPO / "configs").glob("*.yaml")} == set(CONFIGS)  # a new file is tested here too
    for name in CONFIGS:
        cfg = load_agent_config(REPO / "configs" / f"{name}.yaml", "QuantLLM-v0")
        agent = name if name != "ppo_allocation" else "ppo"
        check_hyperparams(agent, cfg.hyperparams, name)
        assert cfg.checkpoint_freq == 2048 and cfg.env_kwargs["action_kind"]


@pytest.mark.slow
def test_configs_load_and_train_in_rl_zoo3(tmp_path):
    """rl-zoo3's own ExperimentManager reads each config, builds the env and trains a few steps
    (MaskablePPO's file is read as PPO: rl-zoo3 has no MaskablePPO, the hyperparameters are PPO's)."""
    pytest.importorskip("rl_zoo3")
    import argparse

    import yaml
    from rl_zoo3.exp_manager import ExperimentManager

    for agent, zoo_algo in CONFIGS.items():
        path = REPO / "configs" / f"{agent}.yaml"
        env_kwargs = {**yaml.safe_load(path.read_text())["QuantLLM-v0"].get("env_kwargs", {}), "model": "tiny-llama",
                      **SMALL}
        manager = ExperimentManager(argparse.Namespace(), zoo_algo, "QuantLLM-v0", str(tmp_path), config=str(path),
                                    env_kwargs=env_kwargs, n_timesteps=64, verbose=0, device="cpu", log_interval=-1)
        model = manager.setup_experiment()[0]
        manager.learn(model)
        assert model.num_timesteps >= 64


@pytest.mark.slow  # extended tier: trains
def test_normalize_from_the_config_trains_behind_vecnormalize(stories_bin, tmp_path, capsys):
    (tmp_path / "n.yaml").write_text(TINY.replace("  env_kwargs:", "  normalize: {norm_obs: true, norm_reward: false}\n"
                                                                    "  env_kwargs:"))
    code = run_main(train_agent, ["--config", tmp_path / "n.yaml", "--model", stories_bin, "--logdir", tmp_path,
                                  "--name", "n", "--no-progress", "--env-kwargs", "n_tokens=256", "seq_len=32",
                                  "cache_dir=false"])
    assert code == 0
    stats = json.loads((tmp_path / "n" / "vecnormalize.json").read_text())
    assert stats["count"] > 64 and not stats["norm_reward"] and len(stats["mean"]) == len(STATIC_NAMES + EPISODE_NAMES)
    assert any(abs(m) > 1e-3 for m in stats["mean"])  # statistics were gathered during training
    code = run_main(eval_agent, ["--policy", tmp_path / "n" / "model.zip", "--searchers", "none", "--out",
                                 tmp_path / "ev"])
    assert code == 0, capsys.readouterr()
