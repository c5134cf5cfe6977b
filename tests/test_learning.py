"""What makes the problem learnable: model-relative features and observations, budgets sampled per
episode, potential shaping, MaskablePPO, and a policy started at greedy's plan (plan_deviations).
The action kinds' semantics are in test_action_kinds.py, the programs' zoo and fine-tuning runs in
test_transfer_programs.py, the bench scripts' tests in tests/bench/."""

from __future__ import annotations

import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env

import qenv  # noqa: F401  (registers QuantLLM-v0)
from qenv import QenvError
from qenv.envs.episodes import play_episode
from qenv.envs.features import EPISODE_NAMES, SENSITIVITY_BITS, STATIC_NAMES

REPO = Path(__file__).resolve().parents[1]
SMALL = {"n_tokens": 256, "seq_len": 32, "cache_dir": False}


def make(model, kind="discrete", budget=3.0, **extra):
    return gym.make("QuantLLM-v0", model=str(model), action_kind=kind, budget_bpw=budget, **SMALL, **extra).unwrapped


@pytest.mark.slow  # extended tier
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


@pytest.mark.slow  # extended tier
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


@pytest.mark.slow  # extended tier: many episodes
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


@pytest.mark.slow  # extended tier
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


@pytest.mark.slow  # extended tier: trains
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


# -- residual policy learning: the policy starts at the plan (plan_deviations) -------------------------
@pytest.mark.slow  # extended tier: greedy on the default model
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


@pytest.mark.slow  # extended tier: 560 sampled steps
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


@pytest.mark.slow  # extended tier: builds residual and discrete envs (hyperparameter refusals stay in test_agents)
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
