"""What makes the problem learnable and transferable: masks, budget-complete action kinds,
model-relative features, shaping, MaskablePPO, fine-tuning (--init-from), zoo errors, rl-zoo3 configs."""

from __future__ import annotations

import itertools
import json
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from conftest import load_script, run_main
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import qenv  # noqa: F401  (registers QuantLLM-v0)
from qenv import QenvError
from qenv.envs.episodes import play_episode, rule_to_action
from qenv.envs.features import EPISODE_NAMES, SENSITIVITY_BITS, STATIC_NAMES
from qenv.envs.spaces import ACTION_SPACE_KINDS, MASKABLE_KINDS
from qenv.quant.rules import Rule, layer_bits

REPO = Path(__file__).resolve().parents[1]
#: one-off experiment scripts (bench/experiments/README.md), apart from the benchmarks users run
EXPERIMENTS = REPO / "bench" / "experiments"
SMALL = {"n_tokens": 256, "seq_len": 32, "cache_dir": False}


def make(model, kind="discrete", budget=3.0, **extra):
    return gym.make("QuantLLM-v0", model=str(model), action_kind=kind, budget_bpw=budget, **SMALL, **extra).unwrapped


def decoded_rule(env, action) -> Rule:
    """The rule an allowed action asks for at the current layer (before any lowering)."""
    if env.mapper.stateful:
        return env.mapper.rules[env._menu_choice(action)]
    return env.mapper.to_rule(action)


def allowed_actions(env, mask, rng, samples=24):
    space = env.action_space
    if isinstance(space, gym.spaces.Discrete):
        return [int(a) for a in np.flatnonzero(mask)]
    options, off = [], 0
    for n in space.nvec:
        options.append(np.flatnonzero(mask[off:off + n]))
        off += n
    return [np.array([rng.choice(o) for o in options]) for _ in range(samples)]


@pytest.mark.parametrize("kind", [k for k in MASKABLE_KINDS])
def test_masks_never_allow_a_budget_breaking_rule(stories_bin, kind):
    """Random masked rollouts on three models and three budgets: every allowed action's rule
    leaves the later layers room for their cheapest rules, nothing is lowered, the budget holds."""
    rng = np.random.default_rng(0)
    for model, budget in itertools.product([stories_bin, "tiny-llama", "tiny-gpt2"], [2.5, 3.0, 4.0]):
        env = make(model, kind, budget)
        env.reset(seed=1)
        done, info = False, {}
        while not done:
            mask = env.action_masks()
            assert mask.dtype == bool and mask.any()
            info_layer = env.task.layers[env.index]
            room = env._allowed_bits() + 1e-9
            choices = allowed_actions(env, mask, rng)
            for action in choices:
                rule = decoded_rule(env, action)
                assert layer_bits(rule, info_layer.out_features, info_layer.in_features) <= room, (model, budget, rule)
            action = choices[int(rng.integers(len(choices)))]
            _, _, done, _, info = env.step(action)
            assert not info["clamped"]
        assert info["bpw"] <= budget + 1e-9 and info["clamped_actions"] == 0


def test_masks_do_forbid_rules_when_the_budget_is_tight(stories_bin):
    env = make(stories_bin, "discrete", 2.5)
    env.reset(seed=0)
    for _ in range(len(env.task.layers) // 2):  # spend as much as allowed early
        mask = env.action_masks()
        env.step(int(np.flatnonzero(mask)[np.argmax(env.task.costs[env.index][mask])]))
    assert not env.action_masks().all()
    with pytest.raises(QenvError, match="no action masks"):
        make(stories_bin, "continuous").action_masks()


@pytest.mark.parametrize("budget", [2.5, 3.0, 4.0])
def test_residual_zero_plays_the_best_start_exactly(stories_bin, budget):
    """Action 0 everywhere is the best start (issue 24): the recipe the greedy searcher's own start
    measured best (its candidates played as episodes of the discrete kind), scored the same."""
    from qenv.agents import make_agent

    for model in (stories_bin, "tiny-llama"):
        env = make(model, "residual", budget)
        info = play_episode(env, [0] * len(env.task.layers))
        greedy = make_agent("greedy", make(model, "discrete", budget))
        greedy.learn(len(greedy.start_candidates()) * greedy.n_layers)
        assert greedy.start.complete
        best = greedy.start.candidate.choice
        assert info["recipe"] == {n: r.label() for n, r in env.task.plan_recipe(best).items()}
        assert info["kl"] == -env.task.start_plan(budget).score and info["clamped_actions"] == 0
        assert info["fidelity_reward"] == pytest.approx(greedy._seen[best], rel=1e-12)


def test_residual_replans_the_rest_in_greedys_hull_form_after_a_deviation(stories_bin):
    """After a step off the plan, the layers left are re-planned within the bits left by greedy's
    convex-hull form: the Lagrangian allocation, then filled."""
    from qenv.envs.allocation import fill_budget

    env = make(stories_bin, "residual", 3.0)
    env.reset(seed=0)
    action = int(np.flatnonzero(env.action_masks()[1:])[0]) + 1  # the first allowed step off the plan
    env.step(action)
    t, rest, left = env.task, slice(1, len(env.task.layers)), env.budget_bits - env.spent
    c, sens = t.costs[rest], t.menu_sensitivity()[rest]
    want = fill_budget(c, sens, t.menu_table.allocate(1, left), left)
    assert np.array_equal(env.plan[rest], want) and t.costs[rest][np.arange(34), env.plan[rest]].sum() <= left + 1e-6


def test_allocation_moves_the_best_start_where_the_preferences_move_greedy(stories_bin):
    """The allocation kind's projection is anchored at the best start: zero (or all-equal)
    preferences play it exactly; other preferences move exactly the layers whose rule they move in
    greedy's plan (filled), and the recipe meets the budget."""
    from qenv.envs.allocation import fill_budget, greedy_allocation

    for model, budget in itertools.product([stories_bin, "tiny-qwen2"], [2.5, 4.0]):
        env = make(model, "allocation", budget)
        n, start = len(env.task.layers), env.task.start_plan(budget)
        for level in (0.0, 0.5):
            play_episode(env, [np.full(1, level, dtype=np.float32)] * n)
            assert tuple(env.allocation_choice) == start.candidate.choice
        for seed in (0, 1):
            prefs = np.random.default_rng(seed).uniform(-1, 1, size=n).astype(np.float32)
            info = play_episode(env, [prefs[i:i + 1] for i in range(n)])
            assert info["bpw"] <= budget + 1e-9
            t, bits = env.task, env.budget_bits
            weighted = t.menu_sensitivity() * np.exp(3.0 * prefs.astype(np.float64))[:, None]
            tilted = fill_budget(t.costs, weighted, greedy_allocation(t.costs, weighted, bits), bits)
            base = fill_budget(t.costs, t.menu_sensitivity(), t.greedy_plan(budget), bits)
            moved = set(np.flatnonzero(env.allocation_choice != np.array(start.candidate.choice)).tolist())
            assert moved and moved <= set(np.flatnonzero(tilted != base).tolist()), (model, budget, seed)


@pytest.mark.parametrize("kind", ["continuous", "relative", "allocation", "residual", "rule"])
def test_new_kinds_pass_both_check_envs(stories_bin, kind):
    env = make(stories_bin, kind)
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)


def test_continuous_and_rule_kinds_reach_every_rule_knob(stories_bin):
    invented = Rule(bits=3, group_size=64, outlier_fraction=0.005, rounding="gptq", clip=0.9,
                    salience=(0.5, 2.0, 1.0), act_scale=0.25, symmetric=True)
    mse = Rule(bits=4, group_size=32, mse_clip=True, act_scale=0.75)
    for kind in ("continuous", "rule"):
        env = make(stories_bin, kind)
        for rule in (invented, mse):
            assert env.mapper.to_rule(rule_to_action(env.mapper, rule)) == rule
        env.reset(seed=0)
        _, _, _, _, info = env.step(rule_to_action(env.mapper, invented))
        assert info["rule"] == invented.label()  # the budget has room: the invented rule is applied as asked


def test_every_kind_is_registered_and_unknown_kinds_fail_clearly(stories_bin):
    assert set(ACTION_SPACE_KINDS) >= {"discrete", "multidiscrete", "continuous", "relative", "allocation",
                                       "residual", "rule"}
    with pytest.raises(QenvError, match="Unknown action space kind 'bogus'"):
        make(stories_bin, "bogus")


def test_model_relative_features(stories_bin):
    env = make(stories_bin, "discrete", 3.0)
    obs, _ = env.reset(seed=0)
    z = np.array([env.task.static[:, STATIC_NAMES.index(f"z_log_err_w{b}")] for b in SENSITIVITY_BITS])
    assert np.allclose(z.mean(axis=1), 0.0, atol=1e-5) and np.all(z.std(axis=1) > 0.1)
    names = STATIC_NAMES + EPISODE_NAMES
    assert obs[names.index("greedy_bits")] * 16 in SENSITIVITY_BITS
    shares = []
    done = False
    while not done:
        shares.append(obs[names.index("sensitivity_share_left")])
        obs, _, done, _, _ = env.step(0)
    assert 0 < shares[0] < 1 and shares[-1] == pytest.approx(1.0)


def test_relative_observation_reads_no_scale_of_its_own(stories_bin):
    """``observation="relative"``: sizes, statistics and errors relative to the model's median layer,
    so shifting any of them by one factor over the whole model leaves the observation unchanged."""
    from qenv.envs.features import _CENTRED, layer_parts, parts_median, relative_static

    full = make("tiny-gpt2")
    rel = make("tiny-gpt2", observation="relative")
    layers = rel.task.layers
    static = rel.task.relative_static
    parts = np.array([layer_parts(info) for info in layers])  # the fused qkv counts as q, k and v
    for name in _CENTRED:
        j = STATIC_NAMES.index(name)
        assert parts_median(static[:, j], parts) == pytest.approx(0.0, abs=1e-6)
        shifted = full.task.static.copy()
        shifted[:, j] += 0.7  # e.g. every weight 10^(0.7) times larger, or every layer 2^(11) times wider
        assert np.allclose(relative_static(shifted, layers), static, atol=1e-6)
    assert not np.allclose(full.task.static, static)
    # GPT-2's fused layers read as the layers they fuse, in the kinds a llama-layout policy knows
    qkv = next(i for i, info in enumerate(layers) if info.kind == "qkv")
    fc_out = next(i for i, info in enumerate(layers) if info.kind == "fc_out")
    kind = {k: STATIC_NAMES.index(f"kind_{k}") for k in ("q", "k", "v", "qkv", "down", "fc_out")}
    assert [static[qkv, kind[k]] for k in ("q", "k", "v", "qkv")] == [1.0, 1.0, 1.0, 0.0]
    assert [static[fc_out, kind[k]] for k in ("down", "fc_out")] == [1.0, 0.0]
    # the share of the sensitivity left is read against the mean share: 0 at the last layer (1 of 1)
    obs, _ = rel.reset(seed=0)
    share = (STATIC_NAMES + EPISODE_NAMES).index("sensitivity_share_left")
    done = False
    while not done:
        last = obs[share]
        obs, _, done, _, _ = rel.step(rel.action_space.sample())
    assert last == pytest.approx(0.0, abs=1e-6)
    gym_check_env(make(stories_bin, "residual", observation="relative"), skip_render_check=True)
    with pytest.raises(QenvError, match="Unknown observation kind"):
        make(stories_bin, observation="absolute")


def test_max_deviations_limits_the_steps_that_leave_greedys_plan(stories_bin):
    rng = np.random.default_rng(0)
    greedy = play_episode(make(stories_bin, "residual"), [0] * 35)["recipe"]
    assert play_episode(make(stories_bin, "residual", max_deviations=0), rng.integers(0, 7, 35))["recipe"] == greedy
    for cap in (1, 3):
        env = make(stories_bin, "residual", max_deviations=cap)
        for episode in range(3):
            env.reset(seed=episode)
            done, capped, masked_after = False, 0, []
            while not done:
                mask = env.action_masks()
                if env.deviations >= cap:
                    masked_after.append(mask.tolist() == [True] + [False] * 6)
                action = int(rng.integers(0, 7)) if episode else int(rng.choice(np.flatnonzero(mask)))
                _, _, done, _, info = env.step(action)
                capped += info["deviation_capped"]
            assert info["deviations"] == cap and all(masked_after) and masked_after
            assert (capped > 0) == (episode > 0)  # unmasked random actions ask for more; they get the plan
            assert info["bpw"] <= 3.0 + 1e-9
    for bad, match in (({"max_deviations": -1}, "whole number"), ({"max_deviations": 2.5}, "whole number")):
        with pytest.raises(QenvError, match=match):
            make(stories_bin, "residual", **bad)
    with pytest.raises(QenvError, match="applies to the residual action kind"):
        make(stories_bin, "discrete", max_deviations=3)


def test_budgets_sample_one_budget_per_episode(stories_bin):
    env = make(stories_bin, "residual", budgets=[2.5, 3.0, 4.0])
    seen = {}

    def greedy_episode(env, **reset):
        env.reset(**reset)
        done = False
        while not done:
            _, _, done, _, info = env.step(0)
        return info

    for seed in range(16):
        info = greedy_episode(env, seed=seed)
        seen[env.budget_bpw] = info
        assert info["budget_bpw"] == env.budget_bpw and info["bpw"] <= env.budget_bpw + 1e-9
    assert sorted(seen) == [2.5, 3.0, 4.0]
    # each episode is scored against its own budget's reference, as an env made with that budget is
    alone = greedy_episode(make(stories_bin, "residual", budget=2.5), seed=0)
    assert seen[2.5]["kl"] == alone["kl"] and seen[2.5]["fidelity_reward"] == alone["fidelity_reward"]
    assert seen[2.5]["recipe"] == alone["recipe"] != seen[4.0]["recipe"]
    env.reset(options={"budget_bpw": 4.0})
    assert env.budget_bpw == 4.0
    with pytest.raises(QenvError, match="not one of this environment's budgets"):
        env.reset(options={"budget_bpw": 3.7})
    one = make(stories_bin, "residual", budgets=[4.0])  # one budget given: every episode at it, not at budget_bpw
    assert greedy_episode(one, seed=0)["budget_bpw"] == 4.0
    env.reset(options={"budget_bpw": np.float32(2.5)})  # the budget, whatever number type carries it
    assert env.budget_bpw == 2.5
    with pytest.raises(QenvError, match="list of budgets"):
        make(stories_bin, budgets=[3.0, 0])
    with pytest.raises(QenvError, match="budgets has 0.5, which is below the"):
        make(stories_bin, budgets=[0.5, 3.0])


def test_potential_shaping_leaves_every_return_unchanged(stories_bin):
    plain = make(stories_bin, "discrete", 3.0)
    shaped = make(stories_bin, "discrete", 3.0, shaping_weight=0.5)
    rng = np.random.default_rng(0)
    for _ in range(2):
        actions = [int(rng.integers(plain.action_space.n)) for _ in plain.task.layers]
        rewards = []
        shaped.reset(seed=0)
        for a in actions:
            rewards.append(shaped.step(a)[1])
        assert any(r != 0.0 for r in rewards[:-1])  # dense signal during the episode
        assert sum(rewards) == pytest.approx(play_episode(plain, actions)["reward"], abs=1e-9)


def test_maskable_ppo_trains_and_never_lowers(stories_bin, tmp_path):
    pytest.importorskip("sb3_contrib")
    from stable_baselines3.common.vec_env import DummyVecEnv

    from qenv.agents import make_agent, rollout_recipe
    from qenv.agents.sb3 import agent_name_of_zip

    env = make(stories_bin, "residual", 2.5)
    agent = make_agent("maskable_ppo", DummyVecEnv([lambda: make(stories_bin, "residual", 2.5)]), seed=0,
                       n_steps=64, batch_size=32, n_epochs=1, policy_kwargs={"net_arch": [16]})
    agent.learn(64)
    _, info = rollout_recipe(agent, env, deterministic=True)
    assert info["clamped_actions"] == 0 and info["bpw"] <= 2.5 + 1e-9
    # its zip loads back through qenv's allow-list unpickler (eval_agent.py, --resume): its policy and
    # rollout buffer classes were refused as "could run arbitrary code"
    from qenv.agents import load_agent
    from qenv.agents.sb3 import safe_custom_objects

    file = agent.save(tmp_path / "masked")
    assert {"policy_class", "rollout_buffer_class"} <= set(safe_custom_objects(file))
    with zipfile.ZipFile(file) as src, zipfile.ZipFile(tmp_path / "plain.zip", "w") as dst:
        for item in src.namelist():
            if item != "qenv_agent.json":
                dst.writestr(item, src.read(item))
    assert agent_name_of_zip(tmp_path / "plain.zip") == "maskable_ppo"
    loaded = load_agent("maskable_ppo", file, env=DummyVecEnv([lambda: make(stories_bin, "residual", 2.5)]))
    assert rollout_recipe(loaded, env, deterministic=True)[1]["bpw"] == info["bpw"]
    with pytest.raises(QenvError, match="does not support the 'continuous'"):
        make_agent("maskable_ppo", make(stories_bin, "continuous"))
    with pytest.raises(QenvError, match="does not support the 'residual'"):
        make_agent("greedy", env)


# -- programs: zoo, fine-tuning, bad input -------------------------------------------------------------
train_agent = load_script("train_agent")
eval_agent = load_script("eval_agent")
TINY = """\
QuantLLM-v0:
  n_timesteps: 64
  policy: MlpPolicy
  n_steps: 32
  batch_size: 32
  n_epochs: 1
  policy_kwargs: {net_arch: [16]}
  env_kwargs: {action_kind: residual}
"""


def load_bench_quality(name: str):
    """bench/bench_quality.py as a module (a script of the bench folder, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "bench_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def one_line_error(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]


@pytest.fixture(scope="module")
def zoo_run(stories_bin, tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    (root / "tiny.yaml").write_text(TINY)
    args = ["--config", root / "tiny.yaml", "--logdir", root, "--no-progress", "--env-kwargs", "n_tokens=256",
            "seq_len=32", "cache_dir=false"]
    assert run_main(train_agent, ["--model", stories_bin, "--model", "tiny-llama", "--name", "zoo", *args]) == 0
    assert run_main(train_agent, ["--init-from", root / "zoo" / "model.zip", "--model", "tiny-qwen2",
                                  "--name", "ft", "--timesteps", 32, *args]) == 0
    return root


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


def test_init_from_a_policy_with_another_observation_size(tmp_path, capsys):
    from stable_baselines3 import PPO

    other = gym.make("CartPole-v1")  # 4 observations, 2 actions
    PPO("MlpPolicy", other, n_steps=32, batch_size=32).save(tmp_path / "cartpole")
    code = run_main(train_agent, ["--init-from", tmp_path / "cartpole.zip", "--logdir", tmp_path, "--no-progress"])
    one_line_error(capsys, code, "observations of size (4,)", "Fix:")
    assert not any((tmp_path / d).is_dir() for d in ("ppo",)) and not list(tmp_path.glob("ppo-*"))


def test_init_from_with_another_action_kind(zoo_run, tmp_path, capsys):
    code = run_main(train_agent, ["--init-from", zoo_run / "zoo" / "model.zip", "--env-kwargs",
                                  "action_kind=discrete", "--logdir", tmp_path, "--no-progress"])
    one_line_error(capsys, code, "acts in Discrete(7)", "action_kind")


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
#                                      for one config per algorithm; ppo_allocation is PPO's second config)


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


def test_caches_are_keyed_on_the_thread_count(tmp_path):
    """Float results depend on torch's thread count (reduction order), so a cache written by a
    process with other threads must not be read: each count gets its own files."""
    import torch

    from qenv.eval.reference import numerics_key

    before = torch.get_num_threads()
    try:
        names = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            env = gym.make("QuantLLM-v0", model="tiny-llama", n_tokens=128, seq_len=32, cache_dir=str(tmp_path)).unwrapped
            names.append(numerics_key(env.task.loaded.device))
            env.close()  # drops the task from the per-process cache: the next env reads the disk cache
        files = sorted(p.name for p in tmp_path.iterdir())
    finally:
        torch.set_num_threads(before)
    assert names[0] != names[1]
    for prefix in ("reference-", "features-", "errors-"):
        assert len([f for f in files if f.startswith(prefix)]) == 2, files


@pytest.mark.parametrize("kind", ["allocation", "relative", "residual"])
def test_nan_actions_of_the_stateful_kinds_are_refused(kind: str) -> None:
    """A diverged policy's NaN is an error in every kind, never read as 0 or cast to an index."""
    env = make("tiny-llama", kind, 4.0)
    env.reset(seed=0)
    for bad in (np.array([np.nan]), np.array([np.inf])):
        with pytest.raises(QenvError, match="not a finite number"):
            env.step(bad)
    env.close()


@pytest.mark.parametrize("kind", ["multidiscrete", "rule"])
def test_out_of_range_knob_indices_are_refused(kind: str) -> None:
    """As the discrete kind refuses an index past its menu, knob indices past their range are refused,
    not clipped to the last choice."""
    env = make("tiny-llama", kind, 4.0)
    env.reset(seed=0)
    too_big = np.asarray(env.action_space.nvec) + 5
    with pytest.raises(QenvError, match="is not in the .* action space"):
        env.step(too_big)
    env.step(np.zeros_like(too_big))  # in range still works
    env.close()


# -- residual policy learning: the policy starts at the plan (plan_deviations) -------------------------
def test_untrained_policy_started_at_the_plan_is_greedy_on_the_default_model():
    """plan_deviations: the untrained MaskablePPO's deterministic rollout is exactly the greedy
    searcher's recipe on the default model (42 layers); without it the head is SB3's near-uniform one."""
    pytest.importorskip("sb3_contrib")
    from stable_baselines3.common.vec_env import DummyVecEnv

    from qenv.agents import make_agent, rollout_recipe

    env = make("default", "residual", 3.0)
    agent = make_agent("maskable_ppo", DummyVecEnv([lambda: env]), seed=3, plan_deviations=2)
    _, info = rollout_recipe(agent, env, deterministic=True)
    greedy = make_agent("greedy", make("default", "discrete", 3.0))
    greedy.learn(1)
    assert info["recipe"] == greedy.best_info["recipe"] and info["kl"] == greedy.best_info["kl"]
    # every observation: P(action != 0) = d / L exactly (the head's weights are 0)
    import torch

    obs, _ = env.reset(seed=0)
    probs = agent.model.policy.get_distribution(torch.as_tensor(obs[None])).distribution.probs[0].detach()
    assert float(1 - probs[0]) == pytest.approx(2 / len(env.task.layers), rel=1e-5)
    plain = make_agent("maskable_ppo", DummyVecEnv([lambda: env]), seed=3)
    probs = plain.model.policy.get_distribution(torch.as_tensor(obs[None])).distribution.probs[0].detach()
    assert float(1 - probs[0]) > 0.8  # SB3's own init: ~uniform over the 7 actions


def test_plan_deviations_sets_the_sampled_deviation_rate(stories_bin):
    """Sampled (masked) actions of the untrained policy leave the plan about d / L of the time."""
    pytest.importorskip("sb3_contrib")
    from stable_baselines3.common.vec_env import DummyVecEnv

    from qenv.agents import make_agent
    from qenv.agents.sb3 import plan_bias

    env = make("tiny-llama", "residual", 3.0)
    n_layers = len(env.task.layers)
    for d in (1.0, 4.0):
        agent = make_agent("maskable_ppo", DummyVecEnv([lambda: env]), seed=0, plan_deviations=d)
        deviations = steps = 0
        for episode in range(40):
            obs, _ = env.reset(seed=episode)
            done = False
            while not done:
                action, _ = agent.predict(obs, deterministic=False, action_masks=env.action_masks())
                deviations += int(action) != 0
                steps += 1
                obs, _, done, _, _ = env.step(action)
        rate, want = deviations / steps, d / n_layers
        # masks only ever hide shifts, so the rate is at most d / L; 560 samples: ~4 standard errors
        assert want - 4 * np.sqrt(want * (1 - want) / steps) - 0.02 < rate < want + 4 * np.sqrt(want * (1 - want) / steps)
    assert plan_bias(2, 42, 7) == pytest.approx(np.log(6 * 40 / 2))


def test_plan_deviations_bad_input_and_configs(stories_bin):
    pytest.importorskip("sb3_contrib")
    from stable_baselines3.common.vec_env import DummyVecEnv

    from qenv.agents import make_agent
    from qenv.agents.registry import check_hyperparams
    from qenv.cli.config import load_agent_config

    with pytest.raises(QenvError, match="only on the residual action kind"):
        make_agent("maskable_ppo", DummyVecEnv([lambda: make("tiny-llama", "discrete")]), plan_deviations=2)
    with pytest.raises(QenvError, match="fewer than the episode's 14 steps"):
        make_agent("ppo", DummyVecEnv([lambda: make("tiny-llama", "residual")]), plan_deviations=14)
    with pytest.raises(QenvError, match="out of range"):
        check_hyperparams("maskable_ppo", {"plan_deviations": 0}, "test")
    # the benchmark's RL agent starts at the plan; the README's default command (ppo.yaml) does not
    masked = load_agent_config(REPO / "configs" / "maskable_ppo.yaml", "QuantLLM-v0")
    assert masked.hyperparams["plan_deviations"] > 0 and masked.checkpoint_freq == 2048
    assert "plan_deviations" not in load_agent_config(REPO / "configs" / "ppo.yaml", "QuantLLM-v0").hyperparams


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


def load_plan_deviations():
    from qenv.cli.config import load_agent_config

    return load_agent_config(REPO / "configs" / "maskable_ppo.yaml", "QuantLLM-v0").hyperparams["plan_deviations"]


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
