"""Action kinds are classes in one registry: the built-in ones say what the env does, and a new
kind is one class (defined here, in the test file)."""

from __future__ import annotations

import itertools
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import qenv  # noqa: F401  (registers QuantLLM-v0)
from qenv import QenvError
from qenv.envs.episode import EpisodeState
from qenv.envs.episodes import play_episode, rule_to_action
from qenv.envs.kinds import KINDS, ActionKind, register_kind
from qenv.envs.spaces import ACTION_SPACE_KINDS, MASKABLE_KINDS, RULE_KINDS, SPACE_FAMILY
from qenv.quant.rules import Rule, layer_bits

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


# -- the kinds' semantics on real models: masks, the residual and allocation kinds, knobs, bad actions --
#: the moved semantics tests' settings (256 tokens of 32, no disk cache): cheap, as the tiny_env fixture's
CHEAP = {"n_tokens": 256, "seq_len": 32, "cache_dir": False}


def make(model, kind="discrete", budget=3.0, **extra):
    return gym.make("QuantLLM-v0", model=str(model), action_kind=kind, budget_bpw=budget, **CHEAP, **extra).unwrapped


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_masks_do_forbid_rules_when_the_budget_is_tight(stories_bin):
    env = make(stories_bin, "discrete", 2.5)
    env.reset(seed=0)
    for _ in range(len(env.task.layers) // 2):  # spend as much as allowed early
        mask = env.action_masks()
        env.step(int(np.flatnonzero(mask)[np.argmax(env.task.costs[env.index][mask])]))
    assert not env.action_masks().all()
    with pytest.raises(QenvError, match="no action masks"):
        make(stories_bin, "continuous").action_masks()


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_allocation_moves_the_best_start_where_the_preferences_move_greedy(stories_bin):
    """The allocation kind's projection is anchored at the best start: zero (or all-equal)
    preferences play it exactly; other preferences move only the layers whose rule they move in
    greedy's plan (filled) and, where the best start leaves bits unused, the layers they favour;
    the recipe meets the budget, and a best start under the budget is filled on the favoured layers
    (issue 25: a policy at 4.0 bpw on stories260K spent 3.49)."""
    from qenv.envs.allocation import fill_budget, greedy_allocation, project_preferences

    underfilled = []
    for model, budget in itertools.product([stories_bin, "tiny-qwen2"], [2.5, 4.0, 4.5]):
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
            anchor = np.array(start.candidate.choice)
            moved = set(np.flatnonzero(env.allocation_choice != anchor).tolist())
            favoured = set(np.flatnonzero(prefs > prefs.astype(np.float64).mean()).tolist())
            assert moved and moved <= set(np.flatnonzero(tilted != base).tolist()) | favoured, (model, budget, seed)
            assert np.array_equal(env.allocation_choice, project_preferences(t.costs, t.menu_sensitivity(), anchor,
                                                                             prefs, bits))
            # no layer the policy favours can still take a costlier, more accurate rule in the bits left
            rows, choice, sens = np.arange(n), env.allocation_choice, t.menu_sensitivity()
            room = bits - t.costs[rows, choice].sum()
            can = (t.costs - t.costs[rows, choice][:, None] <= room + 1e-9) & (sens < sens[rows, choice][:, None])
            assert not can[sorted(favoured)].any(), (model, budget, seed)
            if start.candidate.bits < bits - 0.1 * t.total_weights:  # a best start 0.1 bpw or more under the budget
                underfilled.append((model, budget))
                assert info["bpw"] > start.candidate.bits / t.total_weights + 0.05, (model, budget, seed)
    assert underfilled  # e.g. stories260K at 4.0, whose best start is uniform 3-bit GPTQ


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["continuous", "relative", "allocation", "residual", "rule"])
def test_new_kinds_pass_both_check_envs(stories_bin, kind):
    env = make(stories_bin, kind)
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)


@pytest.mark.slow
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


@pytest.mark.slow
def test_every_kind_is_registered_and_unknown_kinds_fail_clearly(stories_bin):
    assert set(ACTION_SPACE_KINDS) >= {"discrete", "multidiscrete", "continuous", "relative", "allocation",
                                       "residual", "rule"}
    with pytest.raises(QenvError, match="Unknown action space kind 'bogus'"):
        make(stories_bin, "bogus")


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["allocation", "relative", "residual"])
def test_nan_actions_of_the_stateful_kinds_are_refused(kind: str, tiny_env) -> None:
    """A diverged policy's NaN is an error in every kind, never read as 0 or cast to an index."""
    env = tiny_env(kind, budget_bpw=4.0)
    env.reset(seed=0)
    for bad in (np.array([np.nan]), np.array([np.inf])):
        with pytest.raises(QenvError, match="not a finite number"):
            env.step(bad)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["multidiscrete", "rule"])
def test_out_of_range_knob_indices_are_refused(kind: str, tiny_env) -> None:
    """As the discrete kind refuses an index past its menu, knob indices past their range are refused,
    not clipped to the last choice."""
    env = tiny_env(kind, budget_bpw=4.0)
    env.reset(seed=0)
    too_big = np.asarray(env.action_space.nvec) + 5
    with pytest.raises(QenvError, match="is not in the .* action space"):
        env.step(too_big)
    env.step(np.zeros_like(too_big))  # in range still works
