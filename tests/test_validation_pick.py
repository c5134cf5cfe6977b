"""Searches pick their final recipe on a validation split they did not fit (issue 24 item 6).

``validation_fraction`` holds a seeded share of the calibration sequences back from the evaluator
(episodes, screenings and GPTQ/AWQ's calibration never see them); greedy, random and evolution then
return the finalist with the lowest KL on those held-back tokens, not the one that best fits the
tokens they tuned on. Real model (stories260K), real evaluator, at uniform gptq-w3's exact size."""

from __future__ import annotations

import pytest

from qenv import QenvError
from qenv.agents import make_agent
from qenv.envs.quant_llm import QuantLLMEnv
from qenv.models.loading import load_model
from qenv.quant.accounting import bits_per_weight
from qenv.quant.presets import preset


@pytest.fixture(scope="module")
def held(stories_bin, tmp_path_factory):
    loaded = load_model(str(stories_bin), device="cpu")
    budget = bits_per_weight(loaded.layers, preset("gptq-w3", loaded.layers))
    return QuantLLMEnv(str(stories_bin), budget_bpw=budget, n_tokens=512, seq_len=64, batch_size=2, device="cpu",
                       cache_dir=tmp_path_factory.mktemp("qenv-cache"), validation_fraction=0.5)


@pytest.mark.slow  # extended tier: searches on stories260K
def test_the_validation_sequences_are_held_back_from_the_evaluator(held):
    task = held.task
    fit, val = task.evaluator.tokens.ids, task.validation_tokens.ids
    assert fit.shape == val.shape == (4, 64)
    assert not {tuple(row) for row in fit.tolist()} & {tuple(row) for row in val.tolist()}
    assert task.validation_evaluator().weights is task.evaluator.weights  # quantized on the fitting tokens only
    with pytest.raises(QenvError, match="validation_fraction"):
        QuantLLMEnv("tiny-llama", validation_fraction=1.0)


@pytest.mark.slow  # extended tier: searches on stories260K
def test_searches_return_the_finalist_with_the_lowest_validation_kl(held):
    """For each searcher the returned recipe is, among its finalists, the one whose KL on the
    validation tokens (recomputed here) is lowest; in at least one search that is not the recipe with
    the best calibration reward, so returning the calibration best would fail this test."""
    task = held.task
    moved = 0
    for name, evaluations in (("greedy", 24), ("random", 24), ("evolution", 24)):
        agent = make_agent(name, held, seed=0)
        recipe, info = agent.search(total_timesteps=evaluations * agent.n_layers)
        finalists = agent._finalists()
        assert len(set(finalists)) > 1, name
        kl = {key: float(task.validation_evaluator().evaluate(agent._played[key][0]).kl) for key in finalists}
        best = min(finalists, key=lambda key: (kl[key], -agent._seen[key]))
        assert recipe == agent._played[best][0] and info["validation_kl"] == kl[best], name
        assert agent.best_actions == agent._played[best][2]
        assert sum(row["picked"] for row in info["validation_finalists"]) == 1
        calibration_best = max(agent._seen, key=agent._seen.get)
        moved += best != calibration_best
    assert moved >= 1


def test_a_search_never_picks_worse_on_validation_than_its_best_start(held):
    """The best start is always a finalist of the final pick: a search whose calibration best fits the
    tokens it tuned on returns the best start rather than a recipe worse than it on held-back tokens."""
    for name in ("evolution",):  # (random search rarely moves past its start in a few evaluations)
        agent = make_agent(name, held, seed=0)
        agent.finalists = 1  # only the calibration best besides the start: the start must still be compared
        _, info = agent.search(total_timesteps=48 * agent.n_layers)
        start = agent.start.candidate.choice
        assert max(agent._seen, key=agent._seen.get) != start, name  # the search moved past its start
        assert start in agent._finalists(), name
        assert info["validation_kl"] <= agent.validation_kl(start), name
        assert any(row["validation_kl"] == agent.validation_kl(start) for row in info["validation_finalists"])
