"""QuantLLM-v0: API conformance, budget, determinism, and agreement with the evaluator."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

import qenv
from qenv import QenvError
from qenv.envs.quant_llm import QuantLLMEnv
from qenv.quant.rules import Rule

SMALL = {"n_tokens": 512, "seq_len": 64, "cache_dir": False}


def run_episode(env: gym.Env, seed: int, policy=None) -> tuple[float, dict, list]:
    env.reset(seed=seed)
    env.action_space.seed(seed)
    total, done, actions = 0.0, False, []
    info: dict = {}
    while not done:
        action = env.action_space.sample() if policy is None else policy(env)
        actions.append(action)
        _, reward, done, truncated, info = env.step(action)
        total += reward
        assert not truncated
    return total, info, actions


@pytest.fixture(scope="module")
def stories_env(stories_bin):
    return gym.make("QuantLLM-v0", model=str(stories_bin), **SMALL)


@pytest.mark.parametrize("kind", ["discrete", "multidiscrete", "continuous"])
def test_check_env_passes_for_every_action_kind(stories_bin, kind):
    env = gym.make("QuantLLM-v0", model=str(stories_bin), action_kind=kind, **SMALL).unwrapped
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)


def test_make_registers_and_defaults():
    assert "QuantLLM-v0" in gym.registry
    spec = gym.spec("QuantLLM-v0")
    assert spec.entry_point == "qenv.envs.quant_llm:QuantLLMEnv"


@pytest.mark.parametrize("budget", [2.5, 3.0, 4.0])
def test_budget_met_under_random_actions(stories_bin, budget):
    env = gym.make("QuantLLM-v0", model=str(stories_bin), budget_bpw=budget, **SMALL)
    for seed in range(3):
        _, info, _ = run_episode(env, seed)
        assert info["bpw"] <= budget + 1e-9
        assert set(info["recipe"]) == {layer.name for layer in env.unwrapped.task.layers}


def test_hard_budget_lowers_actions_and_says_so(stories_env):
    most_expensive = int(np.argmax([r.bits for r in stories_env.unwrapped.mapper.menu]))
    _, info, _ = run_episode(stories_env, 0, policy=lambda env: most_expensive)
    assert info["clamped_actions"] > 0
    assert info["bpw"] <= 3.0 + 1e-9


def test_penalty_mode_charges_overspending(stories_bin):
    env = gym.make("QuantLLM-v0", model=str(stories_bin), budget_mode="penalty", penalty_weight=2.0, **SMALL)
    eight = [r.bits for r in env.unwrapped.mapper.menu].index(8)
    total, info, _ = run_episode(env, 0, policy=lambda e: eight)
    assert info["bpw"] > 3.0 and info["clamped_actions"] == 0
    # the bits over budget are charged, and the fidelity above the in-budget recipe's is forfeited
    from qenv.envs.reward import fidelity_reward

    task = env.unwrapped.task
    floor = fidelity_reward("kl", task.in_budget_metrics(3.0), task.reference(3.0))
    forfeit = max(0.0, info["fidelity_reward"] - floor)
    assert total == pytest.approx(info["fidelity_reward"] - 2.0 * (info["bpw"] - 3.0) - forfeit)
    assert info["budget_penalty"] == pytest.approx(2.0 * (info["bpw"] - 3.0) + forfeit)


def test_same_seed_same_recipe_and_reward(stories_bin):
    a = gym.make("QuantLLM-v0", model=str(stories_bin), **SMALL)
    b = gym.make("QuantLLM-v0", model=str(stories_bin), **SMALL)
    ra, ia, _ = run_episode(a, 7)
    rb, ib, _ = run_episode(b, 7)
    assert ia["recipe"] == ib["recipe"] and ra == rb and ia["kl"] == ib["kl"]
    rc, ic, _ = run_episode(a, 8)
    assert ic["recipe"] != ia["recipe"]


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_env_kl_equals_evaluator_kl(stories_bin, kind):
    env = gym.make("QuantLLM-v0", model=str(stories_bin), action_kind=kind, **SMALL)
    for seed in (0, 1):
        _, info, _ = run_episode(env, seed)
        recipe = qenv.Recipe.from_dict(info["recipe_rules"])
        plain = env.unwrapped.task.evaluator.evaluate(recipe)  # apply, forward, restore
        assert info["kl"] == pytest.approx(plain.kl, rel=1e-5, abs=1e-9)
        assert info["ppl"] == pytest.approx(plain.ppl, rel=1e-6)
        assert info["top1"] == pytest.approx(plain.top1, abs=1e-9)
        assert info["bpw"] == plain.bpw and info["model_bytes"] == plain.model_bytes


def test_reward_is_relative_to_the_uniform_reference(stories_bin):
    """A uniform recipe at the reference's own bit width scores about zero."""
    menu = [Rule(bits=3, group_size=128), Rule(bits=2, group_size=128)]
    env = gym.make("QuantLLM-v0", model=str(stories_bin), menu=menu, budget_bpw=3.4, **SMALL)
    total, info, _ = run_episode(env, 0, policy=lambda e: 0)
    assert set(info["recipe"].values()) == {"w3g128a"}
    # the frontier point of rtn-w3 is interpolated between rtn-w3 and rtn-w4, so the reference is
    # better than uniform 3 bits and the reward is negative but small
    assert info["reference_kl"] < info["kl"]
    assert -1.5 < total < 0


def test_full_episode_on_default_model(default_model_dir):
    env = gym.make("QuantLLM-v0", **SMALL)
    assert env.unwrapped.task.name == "wikitext-llama"
    total, info, _ = run_episode(env, 0)
    assert np.isfinite(total) and info["bpw"] <= 3.0 + 1e-9 and info["kl"] > 0


def test_multi_model_env_visits_each_model(stories_bin):
    env = gym.make("QuantLLM-v0", model=[str(stories_bin), "tiny-llama"], **SMALL)
    seen = set()
    for seed in range(8):
        _, info = env.reset(seed=seed)
        seen.add(info["model"])
    assert seen == {"stories260K", "tiny-llama"}
    _, info, _ = run_episode(env, 3)
    assert info["model"] in seen


@pytest.mark.slow  # two worker processes, each importing torch and building the task
def test_vector_envs(stories_bin):
    kwargs = {"model": str(stories_bin), **SMALL}
    for cls in (DummyVecEnv, SubprocVecEnv):
        # "qenv:" makes gymnasium import qenv (and so register the env) inside each worker process
        venv = make_vec_env("qenv:QuantLLM-v0", n_envs=2, seed=0, env_kwargs=kwargs, vec_env_cls=cls)
        try:
            venv.reset()
            n_layers = len(QuantLLMEnv(**kwargs).task.layers)
            finished = 0
            for _ in range(n_layers):
                _, rewards, dones, infos = venv.step(np.array([venv.action_space.sample() for _ in range(2)]))
                finished += int(dones.sum())
            assert finished == 2 and all("bpw" in i for i in infos)
        finally:
            venv.close()


def test_render_ansi_shows_the_recipe(stories_bin):
    env = gym.make("QuantLLM-v0", model=str(stories_bin), render_mode="ansi", **SMALL)
    _, info, _ = run_episode(env, 0)
    table = env.render()
    assert "model.layers.0.self_attn.q_proj" in table and "KL" in table and table == info["table"]


def test_dense_shaping_adds_block_errors(stories_bin):
    env = gym.make("QuantLLM-v0", model=str(stories_bin), dense_weight=1.0, **SMALL)
    total, info, _ = run_episode(env, 0)
    assert info["dense_return"] < 0
    assert total == pytest.approx(info["fidelity_reward"] + info["dense_return"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "no/such/model/dir"}, "not found"),
        ({"budget_bpw": 1.0}, "below"),
        ({"budget_bpw": 17}, "out of range"),
        ({"menu": []}, "menu is empty"),
        ({"menu": [{"bits": 7}]}, "bits=7"),
        ({"reward": "accuracy"}, "Unknown reward"),
        ({"action_kind": "box"}, "Unknown action space kind"),
        ({"budget_mode": "soft"}, "Unknown budget_mode"),
    ],
)
def test_bad_kwargs_fail_at_make(stories_bin, kwargs, message):
    full = {"model": str(stories_bin), **SMALL, **kwargs}
    with pytest.raises(QenvError, match=message):
        gym.make("QuantLLM-v0", **full)


def test_render_rgb_array_draws_bits_per_layer(stories_bin):
    env = gym.make("QuantLLM-v0", model=str(stories_bin), render_mode="rgb_array", **SMALL)
    run_episode(env, 0)
    image = env.render()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.std() > 0


def test_close_releases_the_model(stories_bin):
    import gc
    import weakref

    from qenv.envs import task as env_task

    env = gym.make("QuantLLM-v0", model=str(stories_bin), seed=5, **SMALL)
    model = weakref.ref(env.unwrapped.task.loaded.model)
    assert any(task is env.unwrapped.task for task in env_task._TASKS.values())
    env.close()
    del env
    gc.collect()
    assert model() is None
