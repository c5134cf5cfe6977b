"""The fast Lagrangian allocations give exactly the plain bisection's result (issue 12).

The observation computes the greedy plan of the layers left at every step; the env now uses
``LagrangianSuffix`` (a per-model table) and ``lagrangian_allocation`` skips layers whose rule
is fixed across the bracket. Both must return bit for bit what the plain bisection returns.
"""

from __future__ import annotations

import numpy as np
import pytest

from qenv.envs.allocation import LagrangianSuffix, lagrangian_allocation
from qenv.envs.features import model_relative


def plain_lagrangian(costs: np.ndarray, err: np.ndarray, budget_bits: float, iterations: int = 40) -> np.ndarray:
    """The bisection as it was written before the speed-ups (the reference)."""
    rows = np.arange(costs.shape[0])

    def pick(lam: float) -> np.ndarray:
        return np.argmin(err + lam * costs, axis=1)

    scale = max(float(np.max(err)), 1e-30) / max(float(np.min(costs[costs > 0])) if (costs > 0).any() else 1.0, 1e-30)
    lo, hi = np.log(scale) - 60.0, np.log(scale) + 5.0
    best = pick(np.exp(hi))
    if costs[rows, best].sum() > budget_bits + 1e-9:
        return np.argmin(costs + 1e-12 * err, axis=1)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        trial = pick(np.exp(mid))
        if costs[rows, trial].sum() <= budget_bits + 1e-9:
            best, hi = trial, mid
        else:
            lo = mid
    return best


def _cases(seed: int, count: int, width: int | None = None):
    rng = np.random.default_rng(seed)
    for t in range(count):
        n, m = int(rng.integers(1, 40)), width or int(rng.integers(1, 7))
        costs = np.sort(rng.choice(np.arange(1, 100000), (n, m)), axis=1).astype(np.float64)
        if t % 5 == 0:  # equal costs and whole-number errors: ties everywhere
            costs = rng.integers(0, 6, (n, m)).astype(np.float64) * 1000
            err = rng.integers(0, 4, (n, m)).astype(np.float64)
        elif t % 3 == 0:  # errors that fall with cost, as real ladders
            err = np.sort(rng.random((n, m)), axis=1)[:, ::-1] * 10 ** rng.uniform(-8, 8)
        else:
            err = rng.random((n, m)) * 10 ** rng.uniform(-5, 5)
        if t % 7 == 0:
            err = np.round(err, 1)
        yield rng, costs, np.ascontiguousarray(err)


def test_fast_allocations_equal_the_plain_bisection():
    checked = fast = 0
    for rng, costs, err in _cases(0, 120):  # every kind of case many times over (ties, ladders, rounding)
        table = LagrangianSuffix(costs, err)
        fast += table.fast
        for start in range(costs.shape[0]):
            c, e = costs[start:], err[start:]
            low, high = c.min(axis=1).sum(), c.max(axis=1).sum()
            for budget in (low - 1, low, float(rng.uniform(low, high + 1)), high + 5):
                want = plain_lagrangian(c, e, budget)
                assert np.array_equal(lagrangian_allocation(c, e, budget), want)
                assert np.array_equal(table.allocate(start, budget), want)
                checked += 1
    assert checked > 1000 and fast > 100  # the table's fast path really ran


def test_table_falls_back_on_costs_it_cannot_sum_exactly():
    costs = np.array([[1.5, 2.5, 4.0], [1.0, 2.0, 3.0]])
    err = np.array([[3.0, 2.0, 1.0], [5.0, 1.0, 0.5]])
    table = LagrangianSuffix(costs, err)
    assert not table.fast
    for budget in (2.5, 4.0, 6.0, 7.0):
        assert np.array_equal(table.allocate(0, budget), plain_lagrangian(costs, err, budget))


def test_observation_features_equal_a_straight_recomputation():
    """model_relative with the per-model table equals it without (the plain allocation)."""
    for rng, costs, err in _cases(1, 60, width=5):  # one column per SENSITIVITY_BITS width
        n = costs.shape[0]
        table = LagrangianSuffix(costs, err)
        numel = rng.integers(100, 10000, n).astype(np.float64)
        for index in range(n + 1):
            c = costs[index:]
            bits = float(rng.uniform(c.min(axis=1).sum(), c.max(axis=1).sum() + 1)) if index < n else 0.0
            bpw = float(rng.uniform(1, 8))
            assert model_relative(costs, err, index, bits, bpw, numel, table) == \
                model_relative(costs, err, index, bits, bpw, numel)


def plain_greedy(costs: np.ndarray, err: np.ndarray, budget_bits: float) -> np.ndarray:
    """greedy_allocation as it was written before the speed-up (a lexsort of every candidate)."""
    n, m = costs.shape
    rows = np.arange(n)
    choice = np.array([min(range(m), key=lambda j: (costs[i, j], err[i, j], j)) for i in rows], dtype=np.int64)
    spent = float(costs[rows, choice].sum())
    while True:
        d_cost = costs - costs[rows, choice][:, None]
        d_err = err[rows, choice][:, None] - err
        ok = (d_err > 0) & (spent + d_cost <= budget_bits + 1e-9)
        if not ok.any():
            return choice
        gain = np.where(d_cost > 0, d_err / np.maximum(d_cost, 1e-12), np.inf)
        ci, cj = np.nonzero(ok)
        best = np.lexsort((cj, ci, -d_err[ci, cj], -gain[ci, cj]))[0]
        i, j = int(ci[best]), int(cj[best])
        spent += d_cost[i, j]
        choice[i] = j


def test_greedy_allocation_equals_the_lexsort_version():
    from qenv.envs.allocation import greedy_allocation

    for rng, costs, err in _cases(2, 150):
        low, high = costs.min(axis=1).sum(), costs.max(axis=1).sum()
        for budget in (low, float(rng.uniform(low, high + 1))):
            assert np.array_equal(greedy_allocation(costs, err, budget), plain_greedy(costs, err, budget))


def plain_fill(costs: np.ndarray, err: np.ndarray, choice: np.ndarray, budget_bits: float) -> np.ndarray:
    """fill_budget as it was written before the speed-up (lexsorts of every candidate)."""
    choice = np.array(choice, dtype=np.int64)
    rows = np.arange(costs.shape[0])
    spent = float(costs[rows, choice].sum())
    while True:
        d_cost = costs - costs[rows, choice][:, None]
        ok = (d_cost > 0) & (spent + d_cost <= budget_bits + 1e-9)
        if not ok.any():
            return choice
        ci, cj = np.nonzero(ok)
        best = np.lexsort((cj, err[ci, cj], ci))
        cand = best[np.unique(ci[best], return_index=True)[1]]
        pick = cand[np.lexsort((ci[cand], err[ci[cand], cj[cand]], d_cost[ci[cand], cj[cand]]))[0]]
        i, j = int(ci[pick]), int(cj[pick])
        spent += d_cost[i, j]
        choice[i] = j


def test_fill_budget_equals_the_lexsort_version():
    from qenv.envs.allocation import fill_budget

    for rng, costs, err in _cases(3, 150):
        n, m = costs.shape
        start = rng.integers(0, m, n)
        budget = float(costs[np.arange(n), start].sum() + rng.uniform(0, costs.sum() / 3 + 1))
        assert np.array_equal(fill_budget(costs, err, start, budget), plain_fill(costs, err, start, budget))


def test_table_without_a_threshold_asks_every_lambda():
    """Where a suffix's totals do not fall with λ (never seen in practice) the bisection asks the
    table at every λ instead of reading the threshold: still the plain bisection's plans."""
    checked = 0
    for rng, costs, err in _cases(7, 60):
        table = LagrangianSuffix(costs, err)
        if not table.fast:
            continue
        table.falling[:] = False
        for start in range(costs.shape[0]):
            c, e = costs[start:], err[start:]
            for budget in rng.uniform(c.min(axis=1).sum() - 1, c.max(axis=1).sum() + 1, 3):
                assert np.array_equal(table.allocate(start, float(budget)), plain_lagrangian(c, e, float(budget)))
                checked += 1
    assert checked > 300


def test_greedy_allocation_from_a_start_fits_and_keeps_greedys_own_plan():
    """The residual kind's re-plan: started from greedy's own plan at the same budget nothing moves;
    started from any allocation, the result fits the budget whenever the cheapest rules do, and no
    error-lowering upgrade that fits is left."""
    from qenv.envs.allocation import greedy_allocation

    for rng, costs, err in _cases(3, 150):
        rows = np.arange(costs.shape[0])
        low, high = costs.min(axis=1).sum(), costs.max(axis=1).sum()
        budget = float(rng.uniform(low, high + 1))
        plan = greedy_allocation(costs, err, budget)
        assert np.array_equal(greedy_allocation(costs, err, budget, start=plan), plan)
        start = rng.integers(0, costs.shape[1], costs.shape[0])
        for b in (budget, low, float(rng.uniform(low, high + 1))):
            got = greedy_allocation(costs, err, b, start=start)
            assert costs[rows, got].sum() <= b + 1e-6
            d_cost = costs - costs[rows, got][:, None]
            upgrade = (err[rows, got][:, None] - err > 0) & (costs[rows, got].sum() + d_cost <= b + 1e-9)
            assert not upgrade.any()


def test_greedy_allocation_from_a_start_with_nan_errors_and_bad_starts():
    """A NaN error (never a choice) does not stall the lowering; a start that is not one rule index
    per layer is refused."""
    from qenv.envs.allocation import greedy_allocation

    costs = np.array([[2.0, 4.0, 8.0], [2.0, 4.0, 8.0]])
    err = np.array([[9.0, 3.0, 1.0], [8.0, np.nan, 1.0]])
    got = greedy_allocation(costs, err, 7.0, start=np.array([0, 2]))
    assert costs[np.arange(2), got].sum() <= 7.0 and got[1] != 1
    for bad in ([-1, 0], [0.7, 0.0], [0], [0, 3]):
        with pytest.raises(ValueError, match="one rule index"):
            greedy_allocation(costs, err, 7.0, start=np.array(bad))
