"""QuantLLM-v0 under bad or careless use (issue 28, items 13, 14, 15, 19), table-driven.

Each table row is one case a user or an agent hit: an over-budget recipe in the ``penalty`` mode,
an action the space does not contain, a ``reset`` argument the env does not read, a copied env.
"""

from __future__ import annotations

import copy
import pickle
import re

import gymnasium as gym
import numpy as np
import pytest

import qenv  # noqa: F401  (registers QuantLLM-v0)
from qenv import QenvError
from qenv.envs.episodes import play_episode, score_recipe
from qenv.envs.spaces import DEFAULT_MENU

SMALL = {"n_tokens": 512, "seq_len": 64, "cache_dir": False}


def make(stories_bin, **kwargs) -> gym.Env:
    return gym.make("QuantLLM-v0", model=str(stories_bin), **{**SMALL, **kwargs})


# -- 13: the penalty budget mode never rewards breaking the budget ------------------------------------
@pytest.mark.parametrize("reward, penalty_weight", [("kl", 1.0), ("kl", 0.0), ("ppl", 1.0), ("top1", 0.25)])
def test_penalty_mode_never_pays_for_breaking_the_budget(stories_bin, reward, penalty_weight):
    """The costliest recipe (8 bits everywhere, far over a 3.0 budget) scores below greedy's plan
    within the budget, at the default weight and even at weight 0 (before: +3.32 against -0.157)."""
    env = make(stories_bin, budget_mode="penalty", penalty_weight=penalty_weight, reward=reward)
    inner = env.unwrapped
    costliest = int(np.argmax(inner.task.costs.sum(axis=0)))
    over = play_episode(env, [costliest] * len(inner.task.layers))
    greedy = play_episode(env, [int(j) for j in inner.task.greedy_plan(3.0)])
    assert over["bpw"] > 8.0 and not over["budget_met"] and over["clamped_actions"] == 0
    assert greedy["budget_met"]
    assert over["reward"] < greedy["reward"]
    # every over-budget recipe scores below the in-budget recipe its fidelity is capped at
    floor_metrics = inner.task.in_budget_metrics(3.0)
    assert floor_metrics.bpw <= 3.0
    assert over["reward"] <= over["fidelity_reward"]  # the charge is never a bonus
    assert over["episode_return"] == pytest.approx(over["fidelity_reward"] - over["budget_penalty"])


def test_penalty_mode_charges_nothing_within_the_budget(stories_bin):
    env = make(stories_bin, budget_mode="penalty")
    greedy = play_episode(env, [int(j) for j in env.unwrapped.task.greedy_plan(3.0)])
    assert greedy["budget_penalty"] == 0.0
    assert greedy["reward"] == pytest.approx(greedy["fidelity_reward"])


# -- 14: actions outside the space are refused, not rounded or cut -------------------------------------
BAD_ACTIONS = [
    ("discrete", 2.7), ("discrete", -0.5), ("discrete", [3, 99]), ("discrete", 1 + 0j), ("discrete", len(DEFAULT_MENU)),
    ("discrete", -1), ("discrete", True), ("discrete", np.float32(2.0)), ("discrete", "3"),
    ("multidiscrete", [1.9] * 4), ("multidiscrete", [1, 1, 1]), ("multidiscrete", [1, 1, 1, 1, 1]),
    ("multidiscrete", [6, 0, 0, 0]), ("multidiscrete", [0, 0, 0, -1]),
    ("residual", 1.5), ("residual", 7), ("residual", [0, 1]),
    ("relative", 0.5), ("relative", np.array([2.2])),
    ("allocation", [0.1, 0.2]), ("allocation", np.zeros(3, dtype=np.float32)), ("allocation", 1.5),
    ("allocation", 1 + 0j),
]


@pytest.mark.parametrize("kind, action", BAD_ACTIONS, ids=[f"{k}-{a!r}" for k, a in BAD_ACTIONS])
def test_actions_outside_the_space_are_refused(stories_bin, kind, action):
    env = make(stories_bin, action_kind=kind)
    env.reset(seed=0)
    with pytest.raises(QenvError, match="is not in the .* action space"):
        env.step(action)
    inner = env.unwrapped
    assert inner.index == 0 and inner.recipe == {}  # nothing was applied
    env.step(env.action_space.sample())  # and the env still steps


GOOD_ACTIONS = [
    ("discrete", 3), ("discrete", np.int64(3)), ("discrete", np.array(3)), ("discrete", np.array([3])),
    ("multidiscrete", [1, 1, 1, 1]), ("multidiscrete", np.array([1, 1, 1, 1], dtype=np.int32)),
    ("residual", np.int64(0)), ("relative", np.array(1)),
    ("allocation", np.array([0.5], dtype=np.float32)), ("allocation", -1.0), ("allocation", np.array([1.0])),
]


@pytest.mark.parametrize("kind, action", GOOD_ACTIONS, ids=[f"{k}-{a!r}" for k, a in GOOD_ACTIONS])
def test_actions_of_the_space_in_the_forms_agents_pass_are_taken(stories_bin, kind, action):
    env = make(stories_bin, action_kind=kind)
    env.reset(seed=0)
    env.step(action)
    assert env.unwrapped.index == 1


def test_continuous_kind_refuses_a_vector_of_the_wrong_length_or_outside_the_box(stories_bin):
    env = make(stories_bin, action_kind="continuous", menu="gguf", budget_bpw=8.5)
    env.reset(seed=0)
    for action in ([0.0], [0.0, 0.0, 0.0], [1.5, 0.0], [np.nan, 0.0]):
        with pytest.raises(QenvError):
            env.step(np.asarray(action, dtype=np.float32))
    env.step(np.zeros(2, dtype=np.float32))
    assert env.unwrapped.index == 1


# -- 15 and 19: a refused reset changes nothing -------------------------------------------------------
BAD_RESETS = [
    ({"options": {"budget": 4.0}}, "unknown key"),
    ({"options": {"budget_bpw": 3.0, "seed": 1}}, "unknown key"),
    ({"options": [("budget_bpw", 3.0)]}, "is not a dict"),
    ({"options": "budget_bpw=3"}, "is not a dict"),
    ({"options": {"budget_bpw": 4.0}}, "not one of this environment's budgets"),
    ({"options": {"model_index": 1}}, "names no model"),
    ({"seed": -1}, "is not a seed"),
    ({"seed": 1.5}, "is not a seed"),
    ({"seed": "1"}, "is not a seed"),
]


@pytest.mark.parametrize("kwargs, message", BAD_RESETS, ids=[repr(k) for k, _ in BAD_RESETS])
def test_a_refused_reset_leaves_a_made_env_working(stories_bin, kwargs, message):
    env = make(stories_bin)  # gym.make: with gymnasium's order and checker wrappers
    env.reset(seed=0)
    env.step(0)
    with pytest.raises(QenvError, match=message) as raised:
        env.reset(**kwargs)
    if "unknown key" in message or "not a dict" in message:
        assert "['model_index', 'budget_bpw']" in str(raised.value)  # the valid keys are listed
    assert env.unwrapped.index == 1 and env.unwrapped.budget_bpw == 3.0
    env.step(0)  # the episode goes on (before: TypeError from gymnasium's checker)
    obs, _ = env.reset(seed=np.int64(3))
    assert env.observation_space.contains(obs)


@pytest.mark.parametrize("observation", ["full", "relative"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_env_resets_and_plays_like_the_original(stories_bin, how, observation):
    env = make(stories_bin, observation=observation).unwrapped
    clone = copy.deepcopy(env) if how == "deepcopy" else pickle.loads(pickle.dumps(env))
    a, _ = env.reset(seed=1)
    b, _ = clone.reset(seed=1)  # before: KeyError (a cache keyed by the task's id())
    assert np.array_equal(a, b)
    actions = [int(j) for j in env.task.greedy_plan(3.0)]
    assert play_episode(clone, actions)["kl"] == pytest.approx(play_episode(env, actions)["kl"])


# -- the environment's own checks (issue 13) -------------------------------------------------------------
ENV_CASES = {
    # case: (env kwargs, what to do with the env, phrase of the QenvError)
    "nan_continuous_action": ({"action_kind": "continuous"},
                              lambda env: env.step(np.array([np.nan, 0, 0, 0], dtype=np.float32)), "not a finite number"),
    "model_index_out_of_range": ({}, lambda env: env.reset(options={"model_index": 5}), "names no model"),
    "model_index_not_an_int": ({}, lambda env: env.reset(options={"model_index": "0"}), "names no model"),
    "bool_kwarg_as_text": ({"include_lm_head": "maybe"}, None, "must be true or false"),
    "negative_weight_cache": ({"weight_cache_gib": -1}, None, "must be a number of at least 0"),
    "negative_shaping_weight": ({"shaping_weight": -2}, None, "shaping_weight=-2 must be a number of at least 0"),
    "render_mode_human": ({"render_mode": "human"}, None, "draws no window"),
    "seq_len_above_context": ({"seq_len": 1024, "n_tokens": 2048}, None, "longer than the 512-token context"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ENV_CASES))
def test_env_refuses_bad_arguments_and_actions(case, stories_bin, cache_dir):
    from qenv.cli.envs import make_quant_env

    kwargs, act, needle = ENV_CASES[case]
    base = {"model": str(stories_bin), "n_tokens": 512, "seq_len": 64, **kwargs}
    if act is None:
        with pytest.raises(QenvError, match=re.escape(needle)):
            make_quant_env(**base)
        return
    env = make_quant_env(**base)
    env.reset(seed=0)
    with pytest.raises(QenvError, match=re.escape(needle)):
        act(env)


@pytest.mark.slow
def test_episode_length_is_documented_not_a_time_limit(stories_bin, cache_dir):
    """Episodes always terminate after one step per layer; the spec sets no TimeLimit (documented)."""
    from qenv.cli.envs import make_quant_env
    from qenv.envs.quant_llm import QuantLLMEnv

    env = make_quant_env(model=str(stories_bin), n_tokens=512, seq_len=64)
    assert env.spec.max_episode_steps is None and "max_episode_steps" in QuantLLMEnv.__doc__
    env.reset(seed=0)
    n = len(env.unwrapped.task.layers)
    for i in range(n):
        _, _, terminated, truncated, _ = env.step(0)
        assert terminated == (i == n - 1) and not truncated
    assert env.unwrapped.episode_length == n
