"""The best start (issue 24): every search begins at the best *measured* of greedy's plan, the human
presets the menu can express and the uniform rules, so that none ends below a human recipe it could
have returned as is; and greedy's proxy is corrected by end-to-end measurement.

Real model (stories260K), real evaluator; the budget is uniform gptq-w4's exact bpw on it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qenv.agents import make_agent
from qenv.agents.base import play_episode
from qenv.agents.searchers import GreedySearch
from qenv.envs.allocation import greedy_allocation
from qenv.envs.quant_llm import QuantLLMEnv
from qenv.envs.start import StartCandidate, best_start, human_preset_names, start_candidates
from qenv.models.loading import load_model
from qenv.quant.presets import preset
from qenv.quant.rules import Recipe

SEARCHERS_THAT_SEARCH = ("greedy", "random", "evolution")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("qenv-cache")


def small(cache, **kw):
    return {"n_tokens": 512, "seq_len": 64, "batch_size": 4, "device": "cpu", "cache_dir": cache, **kw}


@pytest.fixture(scope="module")
def gptq_w4_bpw(stories_bin):
    loaded = load_model(str(stories_bin), device="cpu")
    from qenv.quant.accounting import bits_per_weight

    return bits_per_weight(loaded.layers, preset("gptq-w4", loaded.layers))


@pytest.fixture(scope="module")
def env(stories_bin, cache, gptq_w4_bpw):
    return QuantLLMEnv(str(stories_bin), budget_bpw=gptq_w4_bpw, **small(cache))


def measured(env, candidate: StartCandidate) -> float:
    """A candidate's reward, measured independently of any searcher: one episode of its actions."""
    return play_episode(env, [int(j) for j in candidate.choice])["reward"]  # discrete kind: actions are menu indices


# --------------------------------------------------------------------------------- the candidates
@pytest.mark.slow  # extended tier: measures every candidate
def test_candidates_are_greedy_then_the_human_presets_and_uniform_rules_that_fit(env):
    inner = env.unwrapped
    task, rules = inner.task, list(inner.mapper.rules)
    sens = make_agent("greedy", env).sensitivity()
    cands = start_candidates(task.layers, rules, task.costs, inner.budget_bits, sens)
    labels = [c.label for c in cands]
    assert labels[0] == "greedy plan"
    assert np.array_equal(cands[0].choice, greedy_allocation(task.costs, sens, inner.budget_bits))
    assert {"gptq-w4", "awq-w4", "rtn-w4", "gptq-w3", "awq-w3", "rtn-w3"} <= set(labels)
    assert len({c.choice for c in cands}) == len(cands)  # each recipe once
    rows = np.arange(len(task.layers))
    for c in cands:
        assert c.bits == pytest.approx(task.costs[rows, list(c.choice)].sum()) and c.bits <= inner.budget_bits + 1e-9
    # every uniform menu rule that fits is a candidate (named by its preset where one names it), and
    # none that does not fit is
    totals = task.costs.sum(axis=0)
    uniform = {c.choice[0] for c in cands if len(set(c.choice)) == 1}
    assert uniform == {j for j in range(len(rules)) if totals[j] <= inner.budget_bits + 1e-9}
    # the named ones are the presets themselves, at their exact size
    gptq4 = next(c for c in cands if c.label == "gptq-w4")
    assert [rules[j] for j in gptq4.choice] == [preset("gptq-w4", task.layers).rule_for(i.name) for i in task.layers]
    assert gptq4.bits == pytest.approx(inner.budget_bits)  # the budget is gptq-w4's own size
    # costliest first after greedy's plan
    assert [c.bits for c in cands[1:]] == sorted((c.bits for c in cands[1:]), reverse=True)


@pytest.mark.slow  # extended tier: measures every candidate
def test_a_preset_the_menu_cannot_express_is_not_a_candidate(env):
    inner = env.unwrapped
    task = inner.task
    no_gptq = [r for r in inner.mapper.rules if r.rounding != "gptq"]
    costs = task.costs[:, [list(inner.mapper.rules).index(r) for r in no_gptq]]
    sens = np.ones_like(costs)
    labels = [c.label for c in start_candidates(task.layers, no_gptq, costs, inner.budget_bits, sens)]
    assert not any(label.startswith("gptq") for label in labels) and "rtn-w4" in labels


def test_human_preset_names_cover_every_uniform_family_width_and_group():
    names = set(human_preset_names())
    for family in ("rtn", "gptq", "awq"):
        for bits in (2, 3, 4, 5, 6, 8):
            assert {f"{family}-w{bits}", f"{family}-w{bits}-g32", f"{family}-w{bits}-g64", f"{family}-w{bits}-gc"} <= names
    assert {"q4_k_m", "q4_k_m-im", "q3_k_m-im"} <= names


@pytest.mark.slow  # extended tier: measures every candidate
def test_llamacpp_mixes_are_candidates_on_the_gguf_menu(cache):
    """On menu="gguf" the llama.cpp mixes whose types the menu holds are start candidates at their size."""
    gguf_env = QuantLLMEnv("tiny-llama", budget_bpw=8.0, action_kind="discrete", menu="gguf", prebuild=False,
                           **small(cache))
    inner = gguf_env.unwrapped
    task = inner.task
    size = task.evaluator.size(preset("q4_k_m", task.layers))[0]
    cands = start_candidates(task.layers, list(inner.mapper.rules), task.costs, size * task.total_weights,
                             np.ones_like(task.costs))
    labels = [c.label for c in cands]
    assert "q4_k_m" in labels and all(c.bits <= size * task.total_weights + 1e-6 for c in cands)
    assert not any(label.startswith(("gptq", "awq", "rtn")) for label in labels)  # not on this menu


def test_best_start_takes_the_best_score_and_stops_when_asked():
    cands = [StartCandidate(name, (k,), 1.0) for k, name in enumerate("abcd")]
    scores = {(0,): 1.0, (1,): 3.0, (2,): math.nan, (3,): 3.0}
    result = best_start(cands, lambda choice: scores[choice])
    assert result.candidate.label == "b" and result.score == 3.0 and result.complete  # ties: the first
    assert [c.label for c, _ in result.measured] == list("abcd")
    asked = []
    cut = best_start(cands, lambda choice: asked.append(choice) or scores[choice], should_stop=lambda: len(asked) >= 1)
    assert cut.candidate.label == "a" and not cut.complete and asked == [(0,)]
    assert best_start(cands, lambda choice: 0.0, should_stop=lambda: True) is None


# ------------------------------------------------------------------------- searchers start from it
@pytest.mark.parametrize("name", SEARCHERS_THAT_SEARCH)
@pytest.mark.slow  # extended tier: three searches
def test_a_search_never_returns_worse_than_the_best_start(env, name):
    """Each candidate is measured here, independently (one episode each): the searcher's result is
    at least as good as the best of them on the same calibration tokens, and it measured them all."""
    n = len(env.unwrapped.task.layers)
    agent = make_agent(name, env, seed=0)
    cands = agent.start_candidates()
    agent.learn((len(cands) + 4) * n)
    floor = max(measured(env, c) for c in cands)
    assert agent.start is not None and agent.start.complete and len(agent.start.measured) == len(cands)
    assert agent.start.score == pytest.approx(floor, abs=1e-12)
    assert agent.best_reward >= floor - 1e-12
    assert agent.evaluations >= len(cands) and agent.spent <= len(cands) + 4 + 1e-9
    replay = play_episode(env, agent.best_actions)
    assert replay["reward"] == pytest.approx(agent.best_reward, abs=1e-12) and replay["budget_met"]


@pytest.mark.slow  # extended tier: a search
def test_a_budget_below_the_start_measures_greedys_plan_first_and_continues(env):
    n = len(env.unwrapped.task.layers)
    agent = make_agent("greedy", env, seed=0).learn(1)  # one evaluation: the old greedy's recipe
    assert agent.evaluations == 1 and not agent.start.complete
    assert agent.start.candidate.label == "greedy plan"
    plan = greedy_allocation(agent.costs, agent.sensitivity(), agent.budget_bits)
    played = play_episode(env, [int(j) for j in plan])  # the env folds AWQ scales over shared inputs
    assert agent.best_recipe == Recipe.from_dict(played["recipe_rules"]) and agent.best_reward == played["reward"]
    agent.learn(len(agent.start_candidates()) * n)  # continues: the rest of the start, then refines
    assert agent.start.complete and agent.evaluations >= len(agent.start_candidates())


# ------------------------------------------------------------------------ greedy, corrected end to end
@pytest.mark.slow  # extended tier: a search
def test_greedy_refinement_is_never_worse_than_its_proxy_plan_and_counts_its_evaluations(env):
    n = len(env.unwrapped.task.layers)
    agent = make_agent("greedy", env, seed=0)
    assert isinstance(agent, GreedySearch)
    plan = agent.start_candidates()[0]
    agent.learn(40 * n)
    assert agent.best_reward >= measured(env, plan) - 1e-12
    assert agent.best_reward >= agent.start.score
    # "a few evaluations": the start's, then the refinement's screenings and evaluations, all counted
    assert agent.evaluations > len(agent.start_candidates()) and agent.screenings > 0
    assert agent.spent <= 40 + 1e-9
    assert agent.spent == pytest.approx(agent.evaluations + sum(b / agent.n_batches for _, b in agent._screened))
    # the history only records measured improvements of the best reward
    assert all(b >= a for a, b in zip(agent.history, agent.history[1:]))


@pytest.mark.slow  # extended tier: a search
def test_greedy_moves_meet_the_budget_and_hold_the_changed_layer(env):
    agent = make_agent("greedy", env, seed=0)
    start = tuple(int(j) for j in agent.allocate())
    moves = agent.moves(start)
    deltas = [d for d, _ in moves]
    # two sorted runs: each changed layer's best move, then the others
    assert moves and deltas[0] == min(deltas) and sum(b < a for a, b in zip(deltas, deltas[1:])) <= 1
    for _, y in moves:
        assert agent.feasible(np.array(y)) and y != start
    # a move from uniform gptq-w4 that raises one layer pays for it elsewhere
    uniform = next(c.choice for c in agent.start_candidates() if c.label == "gptq-w4")
    up = [y for _, y in agent.moves(uniform) if any(agent.costs[i, y[i]] > agent.costs[i, uniform[i]]
                                                     for i in range(agent.n_layers))]
    assert up and all(agent.feasible(np.array(y)) for y in up)
    assert all(any(agent.costs[i, y[i]] < agent.costs[i, uniform[i]] for i in range(agent.n_layers)) for y in up)


@pytest.mark.slow  # extended tier: builds the module's env
def test_greedy_rejects_bad_settings(env):
    from qenv.errors import QenvError

    with pytest.raises(QenvError, match="width=0"):
        make_agent("greedy", env, width=0)
    with pytest.raises(QenvError, match="token fraction"):
        make_agent("greedy", env, stages=((0.0, 2),))



@pytest.mark.slow  # extended tier: a search
def test_greedy_measured_marginals_and_swaps(env):
    """The measured ranking: each marginal is the screened reward change of one layer one width up or
    down (re-scored here independently), and each ranked swap moves a width between two layers of one
    shape within the budget, predicted as the sum of its two marginals."""
    from qenv.agents.base import score_recipe

    agent = make_agent("greedy", env, seed=0)
    agent._limit = 1000.0
    uniform = next(c.choice for c in agent.start_candidates() if c.label == "gptq-w4")
    marginals = agent._marginals(uniform, {}, None)
    batches = agent._stages[0][0]
    base = score_recipe(env, agent._recipe_of(uniform), max_batches=batches)[0]
    assert marginals and all(0 <= i < agent.n_layers for i, _ in marginals)
    for (i, j), value in list(marginals.items())[:4]:
        y = list(uniform)
        y[i] = j
        assert value == pytest.approx(score_recipe(env, agent._recipe_of(tuple(y)), max_batches=batches)[0] - base)
        assert agent.rules[j].bits != agent.rules[uniform[i]].bits
    moves = agent.measured_moves(uniform, marginals)
    assert moves and [d for d, _ in moves] == sorted(d for d, _ in moves)
    shapes = [(info.out_features, info.in_features) for info in env.unwrapped.task.layers]
    for delta, y in moves:
        changed = [i for i in range(agent.n_layers) if y[i] != uniform[i]]
        assert len(changed) == 2 and shapes[changed[0]] == shapes[changed[1]] and agent.feasible(np.array(y))
        assert delta == pytest.approx(-sum(marginals[(i, y[i])] for i in changed))
    with pytest.raises(Exception, match="ranking"):
        make_agent("greedy", env, ranking="nope")


# ------------------------------------------------------------------- the plan-based RL kinds' anchor
@pytest.mark.parametrize("kind", ["residual", "allocation"])
@pytest.mark.slow  # extended tier: episodes of two more kinds
def test_the_plan_kinds_zero_action_is_the_best_start(stories_bin, cache, gptq_w4_bpw, env, kind):
    """At gptq-w4's own size the all-zero episode of the residual and allocation kinds scores exactly
    the best start's KL, which is no worse than uniform gptq-w4's (a candidate); the start is measured
    once per task and budget, and the reset that measured it says how many evaluations it cost."""
    plan_env = QuantLLMEnv(str(stories_bin), budget_bpw=gptq_w4_bpw, action_kind=kind, **small(cache))
    task = plan_env.task
    assert task is env.unwrapped.task  # one task per process for one model, tokens and menu
    start = task.start_plan(gptq_w4_bpw)
    zero = 0 if kind == "residual" else np.zeros(1, dtype=np.float32)
    info = play_episode(plan_env, [zero] * len(task.layers))
    assert info["kl"] == -start.score
    gptq4 = next(c for c, _ in start.measured if c.label == "gptq-w4")
    uniform_kl = play_episode(env, [int(j) for j in gptq4.choice])["kl"]  # measured apart, as an episode
    assert info["kl"] <= uniform_kl
    assert -start.score == min(-s for _, s in start.measured)  # the best of every candidate
    _, reset_info = plan_env.reset(seed=0)
    assert reset_info["start"] == start.candidate.label and reset_info["start_evaluations"] == 0  # cached
    fresh = QuantLLMEnv(str(stories_bin), budget_bpw=gptq_w4_bpw, action_kind=kind, **small(cache))
    assert fresh.reset(seed=0)[1]["start_evaluations"] == 0  # the same task: not measured again
    del task.starts[gptq_w4_bpw]  # forgotten: the next env measures it again and its first reset counts it
    again = QuantLLMEnv(str(stories_bin), budget_bpw=gptq_w4_bpw, action_kind=kind, **small(cache))
    assert again.reset(seed=0)[1]["start_evaluations"] == len(start.measured) > 1
    assert again.reset(seed=0)[1]["start_evaluations"] == 0 and task.starts[gptq_w4_bpw] == start
