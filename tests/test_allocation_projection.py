"""The allocation kind's projection (:func:`qenv.envs.allocation.project_preferences`) on a menu
of real layer sizes and bit widths: it keeps the best start for preferences that say nothing,
never breaks the budget, and spends the budget a best start leaves unused (issue 25: a policy at
4.0 bpw on stories260K spent 3.49, anchored at uniform 3-bit GPTQ)."""

from __future__ import annotations

import numpy as np
import pytest

from qenv.envs.allocation import fill_budget, greedy_allocation, project_preferences

#: bits per weight of the menu's rules (with their scales), as a group-128 menu has them
RULE_BPW = np.array([2.125, 3.125, 4.125, 5.125, 6.125, 8.125])
#: the anchor's rule: uniform 3-bit, as the best start measured at 4.0 bpw on stories260K
ANCHOR_RULE = 1


def menu(n_layers: int = 14, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(costs, sensitivity)`` of a model of ``n_layers`` linears: costs are each layer's weights
    times each rule's bits; the error falls by about 4x per extra bit (a uniform quantizer's
    error), scaled per layer, and weighted by the layer's size as greedy's sensitivity is."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([4096, 8192, 16384, 32768], size=n_layers).astype(np.float64)
    costs = sizes[:, None] * RULE_BPW[None, :]
    scale = rng.lognormal(0.0, 1.0, size=n_layers)
    err = scale[:, None] * 4.0 ** -RULE_BPW[None, :] * rng.uniform(0.8, 1.2, size=(n_layers, RULE_BPW.size))
    return costs, err * sizes[:, None]


def spent(costs: np.ndarray, choice: np.ndarray) -> float:
    return float(costs[np.arange(costs.shape[0]), choice].sum())


def test_preferences_that_say_nothing_play_the_anchor_itself():
    costs, sens = menu()
    anchor = np.full(costs.shape[0], ANCHOR_RULE)
    budget = 4.0 * costs[:, 0].sum() / RULE_BPW[0]
    for level in (0.0, 0.5, -0.3):
        prefs = np.full(costs.shape[0], level)
        assert np.array_equal(project_preferences(costs, sens, anchor, prefs, budget), anchor)


@pytest.mark.parametrize("seed", range(6))
def test_a_policy_spends_the_budget_the_anchor_leaves_unused(seed):
    costs, sens = menu(seed=seed)
    n = costs.shape[0]
    weights = costs[:, 0] / RULE_BPW[0]
    budget = 4.0 * weights.sum()
    anchor = np.full(n, ANCHOR_RULE)  # 3.125 bpw: 0.875 bpw under the budget
    prefs = np.random.default_rng(100 + seed).uniform(-1, 1, size=n)
    choice = project_preferences(costs, sens, anchor, prefs, budget)
    assert spent(costs, choice) <= budget + 1e-6
    # no layer the policy favours can still take a costlier, more accurate rule within the budget
    favoured = prefs > prefs.mean()
    rows = np.arange(n)
    room = budget - spent(costs, choice)
    can = (costs - costs[rows, choice][:, None] <= room + 1e-9) & (sens < sens[rows, choice][:, None])
    assert not can[favoured].any(), seed
    # the budget is spent: less than the largest favoured layer's step from one rule to the next is left
    assert room < (weights[favoured].max() * np.diff(RULE_BPW).max()), seed
    assert spent(costs, choice) / weights.sum() > 3.5
    # the layers it disfavours keep at most what the moves gave them: the fill goes to the favoured ones
    weighted = sens * np.exp(3.0 * prefs)[:, None]
    tilted = fill_budget(costs, weighted, greedy_allocation(costs, weighted, budget), budget)
    base = fill_budget(costs, sens, greedy_allocation(costs, sens, budget), budget)
    changed = set(np.flatnonzero(choice != anchor).tolist())
    assert changed <= set(np.flatnonzero(tilted != base).tolist()) | set(np.flatnonzero(favoured).tolist())


def test_an_anchor_that_fills_the_budget_only_moves_as_greedy_moves():
    """Greedy's own plan, filled, leaves less than a step: the projection is the moves alone, as
    before the fill (every moved layer is one the preferences moved in greedy's plan)."""
    costs, sens = menu(seed=3)
    n = costs.shape[0]
    budget = 3.5 * (costs[:, 0] / RULE_BPW[0]).sum()
    anchor = fill_budget(costs, sens, greedy_allocation(costs, sens, budget), budget)
    for seed in range(4):
        prefs = np.random.default_rng(seed).uniform(-1, 1, size=n)
        choice = project_preferences(costs, sens, anchor, prefs, budget)
        weighted = sens * np.exp(3.0 * prefs)[:, None]
        tilted = fill_budget(costs, weighted, greedy_allocation(costs, weighted, budget), budget)
        assert spent(costs, choice) <= budget + 1e-6
        assert set(np.flatnonzero(choice != anchor).tolist()) <= set(np.flatnonzero(tilted != anchor).tolist())


def test_bad_shapes_are_refused():
    costs, sens = menu()
    with pytest.raises(ValueError, match="one preference and one anchor rule per layer"):
        project_preferences(costs, sens, np.zeros(3, dtype=np.int64), np.zeros(costs.shape[0]), 1e6)
