"""EvoPress-style evolution (issue 24 item 3): level switches at constant size, multi-step selection,
seeded with the best start. Real model (stories260K), real evaluator; budget = uniform gptq-w4's bpw."""

from __future__ import annotations

import numpy as np
import pytest

from qenv.agents import make_agent
from qenv.agents.base import score_recipe
from qenv.agents.searchers import EvolutionSearch
from qenv.envs.quant_llm import QuantLLMEnv
from qenv.errors import QenvError
from qenv.models.loading import load_model
from qenv.quant.accounting import bits_per_weight
from qenv.quant.presets import preset


@pytest.fixture(scope="module")
def env(stories_bin, tmp_path_factory):
    """512 calibration tokens in 8 batches of one sequence: stages of 1/8 and 1/2 of the tokens are
    1 and 4 batches."""
    loaded = load_model(str(stories_bin), device="cpu")
    budget = bits_per_weight(loaded.layers, preset("gptq-w4", loaded.layers))
    return QuantLLMEnv(str(stories_bin), budget_bpw=budget, n_tokens=512, seq_len=64, batch_size=1, device="cpu",
                       cache_dir=tmp_path_factory.mktemp("qenv-cache"))


def uniform_gptq_w4(agent: EvolutionSearch) -> np.ndarray:
    return np.array(next(c.choice for c in agent.start_candidates() if c.label == "gptq-w4"))


@pytest.mark.slow  # extended tier: evolution searches
def test_level_switches_keep_the_size_of_uniform_gptq_w4(env):
    """From uniform gptq-w4 (exactly the budget), one level switch raises a layer to w5 and lowers a
    layer of the same shape to gptq-w3: the same bits, moved. Every child meets the budget."""
    agent = make_agent("evolution", env, seed=0, knob_rate=0.0, max_mutations=1)
    parent = uniform_gptq_w4(agent)
    agent.population = [(0.0, tuple(int(j) for j in parent))]
    shapes = [(i.out_features, i.in_features) for i in env.unwrapped.task.layers]
    for _ in range(40):
        child = agent._child()
        assert child is not None
        changed = np.flatnonzero(child != parent)
        assert len(changed) == 2 and shapes[changed[0]] == shapes[changed[1]]
        bits = [agent.rules[child[i]].bits - agent.rules[parent[i]].bits for i in changed]
        assert sorted(bits) == [-1, 1]
        assert agent._total(child) == agent._total(parent)  # exactly constant size
    agent = make_agent("evolution", env, seed=1, knob_rate=0.5, max_mutations=3)
    agent.population = [(0.0, tuple(int(j) for j in parent))]
    children = [agent._child() for _ in range(60)]
    assert all(agent.feasible(c) for c in children if c is not None)
    # knob switches: a layer moves to another rule of its width (GPTQ to AWQ or RTN: the same bits here)
    assert any(c is not None and any(c[i] != parent[i] and agent.rules[c[i]].bits == 4 for i in range(len(c)))
               for c in children)


@pytest.mark.slow  # extended tier: evolution searches
def test_moves_across_sizes_when_no_two_layers_share_a_shape(env):
    agent = make_agent("evolution", env, seed=0, knob_rate=0.0)
    agent._groups = []  # as on a model whose layers all differ in shape: EvoPress's group_rule="none"
    parent = uniform_gptq_w4(agent)
    agent.population = [(0.0, tuple(int(j) for j in parent))]
    children = [agent._child() for _ in range(30)]
    made = [c for c in children if c is not None]
    assert made and all(agent.feasible(c) for c in made)


@pytest.mark.slow  # extended tier: evolution searches
def test_multi_step_selection_promotes_the_best_of_each_stage(env):
    agent = make_agent("evolution", env, seed=0)
    assert agent.n_batches == 8 and agent._stages == [(1, 4), (4, 1)] and agent.survivors == 1
    parent = uniform_gptq_w4(agent)
    agent.population = [(0.0, tuple(int(j) for j in parent))]
    agent._limit = 100.0
    children = []
    while len(children) < 8:
        child = agent._child()
        if child is not None and tuple(child) not in children:
            children.append(tuple(int(j) for j in child))
    chosen = agent._select(children, agent._stages)
    inner = env.unwrapped
    first = [score_recipe(inner, agent._recipe_of(c), max_batches=1)[0] for c in children]
    top4 = [children[k] for k in sorted(range(8), key=lambda k: (-first[k], k))[:4]]
    second = [score_recipe(inner, agent._recipe_of(c), max_batches=4)[0] for c in top4]
    assert chosen == [top4[int(np.argmax(second))]]
    assert agent.screenings == 8 + 4 and agent.spent == pytest.approx(8 * 1 / 8 + 4 * 4 / 8)


@pytest.mark.slow  # extended tier: evolution searches
def test_evolution_starts_from_the_best_start_and_improves_on_its_own_tokens(env):
    n = len(env.unwrapped.task.layers)
    agent = make_agent("evolution", env, seed=0).learn(64 * n)  # greedy's part stops after ~40 here
    assert agent.greedy_done
    start = agent.start
    assert start.complete and agent.history[len(start.measured) - 1] == pytest.approx(start.score)
    assert agent.best_reward >= start.score
    assert agent.population[0][0] == agent.best_reward and len(agent.population) == 1  # (1 + λ), elitist
    assert {b for _, b in agent._screened} == {1, 4}
    assert agent.spent == pytest.approx(agent.evaluations + sum(b / 8 for _, b in agent._screened)) and agent.spent <= 64
    assert agent.feasible(np.array(agent._best_choice()))


@pytest.mark.slow  # extended tier: evolution searches
def test_stage_settings(env):
    agent = make_agent("evolution", env, seed=0, stages=((0.1, 8), (0.12, 3), (0.6, 2), (1.0, 1)))
    assert agent._stages == [(1, 3), (5, 2)]  # shares round to batches; equal ones merge; all batches: dropped
    assert make_agent("evolution", env, screen_batches=2, survivors=3)._stages == [(2, 3)]
    assert make_agent("evolution", env, screen_batches=0)._stages == []
    assert make_agent("evolution", env, survivors=2)._stages == [(1, 4), (4, 2)]
    with pytest.raises(QenvError, match="token fraction"):
        make_agent("evolution", env, stages=((1.5, 2),))
    with pytest.raises(QenvError, match="population=0"):
        make_agent("evolution", env, population=0)


@pytest.mark.slow  # extended tier: a greedy search and an evolution search
def test_evolution_runs_greedy_first_and_never_ends_worse_on_its_calibration_tokens(env):
    """Evolution spends the first part of its budget on greedy itself (the same code): every recipe
    greedy evaluated, with the same reward, is among evolution's, greedy's result is its first parent,
    and evolution's best on its own calibration tokens is at least greedy's; then it evolves further.
    The old design (evolution from the best start alone, no greedy part) fails the first assertions."""
    n = len(env.unwrapped.task.layers)
    greedy = make_agent("greedy", env, seed=0).learn(64 * n)
    for seed in (0, 1):
        evo = make_agent("evolution", env, seed=seed).learn(64 * n)
        assert evo.greedy_done and evo.greedy_pick == greedy._best_choice()
        assert set(greedy._seen) <= set(evo._seen)
        assert all(evo._seen[key] == value for key, value in greedy._seen.items())
        assert evo.history[:len(greedy.history)] == greedy.history  # greedy's part, step for step
        assert evo.evaluations > greedy.evaluations  # and then it evolved
        assert evo.best_reward >= greedy.best_reward
        assert evo.best_recipe == evo._played[evo._best_choice()][0]  # without validation: the calibration best


@pytest.mark.slow  # extended tier: a greedy search and an evolution search
def test_evolution_keeps_greedys_validation_pick_unless_beaten_by_the_margin(stories_bin, tmp_path_factory):
    """With validation tokens held back, evolution returns greedy's own pick (same tokens; greedy is
    deterministic) unless an evolved recipe is lower on the validation tokens by more than the margin:
    with a margin of 99% it is exactly greedy's recipe, with none its validation KL is at most greedy's."""
    loaded = load_model(str(stories_bin), device="cpu")
    budget = bits_per_weight(loaded.layers, preset("gptq-w3", loaded.layers))
    held = QuantLLMEnv(str(stories_bin), budget_bpw=budget, n_tokens=512, seq_len=64, batch_size=1, device="cpu",
                       cache_dir=tmp_path_factory.mktemp("qenv-cache"), validation_fraction=0.5)
    n = len(held.unwrapped.task.layers)
    g_recipe, g_info = make_agent("greedy", held, seed=0).search(total_timesteps=128 * n)
    kept = make_agent("evolution", held, seed=0, validation_margin=0.99)
    recipe, info = kept.search(total_timesteps=128 * n)
    assert kept.greedy_done and kept.evaluations > len(kept._greedy_finalists)
    assert recipe == g_recipe and info["validation_kl"] == g_info["validation_kl"]
    free = make_agent("evolution", held, seed=0, validation_margin=0.0)
    _, info = free.search(total_timesteps=128 * n)
    assert info["validation_kl"] <= g_info["validation_kl"]
    evolved = [key for key in free._finalists() if key not in free._greedy_finalists]
    assert evolved and all(key in free._validated for key in evolved)  # the evolved finalists were compared
    assert not set(evolved) & free._greedy_played  # evolved: measured after greedy's part, not greedy's own
    with pytest.raises(QenvError, match="validation_margin"):
        make_agent("evolution", held, validation_margin=1.0)
