"""The best start's disk cache (issue 25: training on a zoo over a budget range measured the best
start of every (model, budget) again in every process, most of a CPU training run's time).

Real model (the built-in tiny Llama), real evaluator: the cached start is the freshly measured one,
score for score; it is read back without one evaluation; and it is keyed, so that another budget,
menu, model or set of calibration tokens is measured, never served a stale score."""

from __future__ import annotations

import numpy as np
import pytest

from qenv.cache_files import CacheWarning
from qenv.envs.quant_llm import QuantLLMEnv
from qenv.envs.start import best_start, start_candidates
from qenv.envs.task import read_best_start, start_cache_path
from qenv.eval.evaluator import Evaluator
from qenv.eval.tokens import TokenSet

BUDGET = 3.5


def candidates(task, budget_bpw):
    bits = budget_bpw * task.total_weights
    return bits, start_candidates(task.layers, task.rules, task.costs, bits, task.menu_sensitivity())


def test_the_cached_best_start_is_the_fresh_one_and_is_keyed(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    env = QuantLLMEnv("tiny-llama", n_tokens=128, seq_len=32, batch_size=4, device="cpu", cache_dir=cache,
                      action_kind="allocation", budget_bpw=BUDGET)
    task = env.task
    first = task.start_plan(BUDGET)  # measured at the env's first reset, and written
    assert first.complete and len(first.measured) > 1
    bits, cands = candidates(task, BUDGET)
    path = start_cache_path(task.evaluator, task.layers, task.rules, bits, cands)
    assert path is not None and path.is_file()

    # read back without one evaluation: the same best candidate and every candidate's score
    del task.starts[BUDGET]
    task.start_scores.clear()  # the in-process memo too: only the file is left

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a cached best start was measured again")

    with monkeypatch.context() as m:
        m.setattr(task.evaluator, "evaluate_blockwise", no_evaluation)
        cached = task.start_plan(BUDGET)
    assert cached == first

    assert {c.choice for c, _ in cached.measured} <= set(task.start_scores)  # shared with other budgets

    # another budget measures only the candidates no budget measured yet (greedy's plan at it)
    bits3, cands3 = candidates(task, 3.0)
    new = [c for c in cands3 if c.choice not in task.start_scores]
    calls = []
    measure = task.evaluator.evaluate_blockwise
    with monkeypatch.context() as m:
        m.setattr(task.evaluator, "evaluate_blockwise", lambda recipe: calls.append(1) or measure(recipe))
        at3 = task.start_plan(3.0)
    assert len(calls) == len(new) < len(at3.measured)

    # equal to a fresh measurement of every candidate that reads no cache
    fresh = best_start(cands, lambda choice: -task.evaluator.evaluate_blockwise(task.plan_recipe(choice)).kl)
    assert fresh is not None and fresh.candidate == cached.candidate
    assert [c for c, _ in fresh.measured] == [c for c, _ in cached.measured]
    np.testing.assert_allclose([s for _, s in fresh.measured], [s for _, s in cached.measured], rtol=1e-6, atol=0)

    # keyed: another budget, menu, model or calibration tokens is another file
    keyed = {path}
    keyed.add(start_cache_path(task.evaluator, task.layers, task.rules, bits3, cands3))
    other_menu = task.rules[:-1]
    keyed.add(start_cache_path(task.evaluator, task.layers, other_menu, bits, cands))
    ids = task.evaluator.tokens.ids.clone()
    ids[0, 1] = (ids[0, 1] + 1) % 16
    other_tokens = Evaluator(task.loaded, TokenSet(ids, "edited"), batch_size=4, cache_dir=cache)
    keyed.add(start_cache_path(other_tokens, task.layers, task.rules, bits, cands))
    keyed.add(start_cache_path(task.evaluator, task.layers, task.rules, bits, cands[1:]))  # other candidates
    assert len(keyed) == 5
    no_cache = Evaluator(task.loaded, task.evaluator.tokens, batch_size=4, cache_dir=False)
    assert start_cache_path(no_cache, task.layers, task.rules, bits, cands) is None

    # a file that does not hold one score per candidate is damaged: removed, then measured again
    with pytest.warns(CacheWarning, match="damaged"):
        assert read_best_start(path, cands[:-1]) is None
    assert not path.exists() and read_best_start(path, cands) is None

