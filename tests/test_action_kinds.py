"""Action kinds are classes in one registry: the built-in ones say what the env does, and a new
kind is one class (defined here, in the test file)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

import qenv  # noqa: F401  (registers QuantLLM-v0)
from qenv import QenvError
from qenv.envs.episode import EpisodeState
from qenv.envs.kinds import KINDS, ActionKind, register_kind
from qenv.envs.spaces import ACTION_SPACE_KINDS, MASKABLE_KINDS, RULE_KINDS, SPACE_FAMILY
from qenv.quant.rules import Rule

SMALL = {"n_tokens": 512, "seq_len": 64, "cache_dir": False}


def test_the_registry_holds_every_built_in_kind_with_the_facts_the_agents_read():
    assert set(ACTION_SPACE_KINDS) <= set(KINDS)
    for name in ACTION_SPACE_KINDS:
        kind = KINDS[name]
        assert kind.family == SPACE_FAMILY[name]
        assert kind.maskable == (name in MASKABLE_KINDS)
        assert kind.fixed_rule == (name in RULE_KINDS)


class CheapOrDear(ActionKind):
    """A kind of two actions: 0 is the layer's cheapest menu rule, 1 the costliest that still fits."""

    fixed_rule = False

    def space(self, menu: tuple[Rule, ...]) -> spaces.Space:
        return spaces.Discrete(2)

    def choice(self, state: EpisodeState, action: Any) -> int:
        costs = state.task.costs[state.index]
        if int(action) == 0:
            return int(np.argmin(costs))
        fits = np.flatnonzero(costs <= state._allowed_bits() + 1e-9)
        return int(fits[np.argmax(costs[fits])])

    def decode(self, state: EpisodeState, action: Any) -> tuple[Rule, int, float, dict[str, Any]]:
        state.mapper.check_action(action)
        choice = self.choice(state, action)
        return state.mapper.rules[choice], choice, 0.0, {"cheap_or_dear": int(action)}

    def masks(self, state: EpisodeState, allowed: float) -> np.ndarray:
        return np.ones(2, dtype=bool)


@pytest.fixture
def cheap_or_dear():
    register_kind("cheap_or_dear", CheapOrDear)
    yield "cheap_or_dear"
    del KINDS["cheap_or_dear"]


def test_a_new_kind_is_one_class(stories_bin, cheap_or_dear):
    env = gym.make("QuantLLM-v0", model=str(stories_bin), action_kind=cheap_or_dear, **SMALL)
    assert env.action_space == spaces.Discrete(2) and env.unwrapped.action_masks().tolist() == [True, True]
    totals = {}
    for action in (0, 1):
        env.reset(seed=0)
        done = False
        while not done:
            _, _, done, _, info = env.step(action)
        assert info["cheap_or_dear"] == action and info["budget_met"] and info["clamped_actions"] == 0
        totals[action] = info
    assert totals[0]["bpw"] < totals[1]["bpw"] <= 3.0 + 1e-9
    assert totals[1]["kl"] < totals[0]["kl"]
    with pytest.raises(QenvError, match="is not in the cheap_or_dear action space"):
        env.reset(seed=0)
        env.step(2)


def test_a_kind_is_registered_once(cheap_or_dear):
    with pytest.raises(QenvError, match="exists already"):
        register_kind("residual", CheapOrDear)
    with pytest.raises(QenvError, match="not an ActionKind"):
        register_kind("x", dict)  # type: ignore[arg-type]
    with pytest.raises(QenvError, match="Unknown action space kind"):
        gym.make("QuantLLM-v0", action_kind="cheap_or_pricey", **SMALL)


@pytest.mark.slow  # greedy's plan on stories260K's default menu (the residual kind starts from it)
def test_residual_options_live_on_the_residual_kind(stories_bin):
    env = gym.make("QuantLLM-v0", model=str(stories_bin), action_kind="residual", max_deviations=2,
                   **SMALL).unwrapped
    assert env.kind.max_deviations == 2
    with pytest.raises(QenvError, match="applies to the residual action kind"):
        KINDS["discrete"](max_deviations=2)
