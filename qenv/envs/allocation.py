"""Bit allocation under a budget: the measured sensitivities and the allocations built on them.

One place for what both the environment and the searchers need:

- :func:`rule_errors`: the relative output error of every layer under every rule of a list
  (:func:`qenv.envs.features.output_error`), cached on disk beside the reference;
- :func:`greedy_allocation`: HAWQ-style greedy. Every layer starts at its cheapest rule, and the
  upgrade with the largest drop in ``error × layer size`` per extra bit is applied until nothing
  fits. It is the ``greedy`` searcher's recipe, the plan of the ``residual`` action kind (whose
  action 0 reproduces it) and the projection of the ``allocation`` kind;
- :func:`fill_budget`: spends what an allocation left unused, so that less than one menu step
  (the smallest upgrade of any layer) stays unused;
- :func:`lagrangian_allocation`: the convex-hull version of greedy (each layer minimises
  ``error + λ · bits`` and λ is bisected to the budget), cheap enough to recompute at every step
  for the observation's "greedy bits" feature.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from qenv.eval.evaluator import Evaluator
from qenv.eval.reference import batching_key, numerics_key
from qenv.io import atomic_path
from qenv.models.layers import LayerInfo
from qenv.quant.rules import Rule

_TOL = 1e-9


def rule_errors(evaluator: Evaluator, layers: Sequence[LayerInfo], rules: Sequence[Rule]) -> np.ndarray:
    """``[n_layers, n_rules]`` relative output errors ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` (float64),
    cached on disk under the model, tokens, batching, rules and :func:`numerics_key`."""
    from qenv.envs.features import output_error

    text = (evaluator.loaded.fingerprint + evaluator.tokens.fingerprint + "|".join(i.name for i in layers)
            + "|b" + batching_key(evaluator.batches) + "|" + "|".join(r.label() + repr(r) for r in rules)
            + "|" + numerics_key(evaluator.loaded.device))
    key = hashlib.sha1(text.encode()).hexdigest()[:16]
    path = None if evaluator.cache_dir is None else Path(evaluator.cache_dir) / f"errors-v1-{key}.npy"
    if path is not None and path.is_file():
        try:
            cached = np.load(path)
            if cached.shape == (len(layers), len(rules)):
                return cached
        except (OSError, ValueError):
            pass
    with torch.inference_mode():
        err = np.array([[output_error(evaluator, info, rule) for rule in rules] for info in layers], dtype=np.float64)
    err = np.nan_to_num(err, nan=1e30, posinf=1e30)
    if path is not None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, err)
    return err


def greedy_allocation(costs: np.ndarray, sensitivity: np.ndarray, budget_bits: float) -> np.ndarray:
    """HAWQ-style greedy: the rule index of each layer.

    ``costs`` and ``sensitivity`` (error × layer size) are ``[n_layers, n_rules]``. Every layer
    starts at its cheapest rule (the most accurate among equally cheap ones); then the change with
    the largest error drop per extra bit that fits is applied (ties: largest drop, then the first
    layer and rule), until no change that lowers the error fits. Deterministic.
    """
    err = np.asarray(sensitivity, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    n, m = costs.shape
    rows = np.arange(n)
    choice = np.array([min(range(m), key=lambda j: (costs[i, j], err[i, j], j)) for i in rows], dtype=np.int64)
    spent = float(costs[rows, choice].sum())
    while True:
        d_cost = costs - costs[rows, choice][:, None]
        d_err = err[rows, choice][:, None] - err
        ok = (d_err > 0) & (spent + d_cost <= budget_bits + _TOL)
        if not ok.any():
            return choice
        gain = np.where(d_cost > 0, d_err / np.maximum(d_cost, 1e-12), np.inf)
        ci, cj = np.nonzero(ok)  # best gain, then largest drop, then first layer and rule
        best = np.lexsort((cj, ci, -d_err[ci, cj], -gain[ci, cj]))[0]
        i, j = int(ci[best]), int(cj[best])
        spent += d_cost[i, j]
        choice[i] = j


def fill_budget(costs: np.ndarray, sensitivity: np.ndarray, choice: np.ndarray, budget_bits: float) -> np.ndarray:
    """Spend what ``choice`` leaves unused: while some layer has a costlier rule that fits, move
    the layer whose move adds the fewest bits (ties: the lower error, then the first layer) to
    its most accurate fitting costlier rule. Afterwards no single layer can move to a costlier
    rule within the budget, i.e. less than one menu step of the budget stays unused."""
    costs = np.asarray(costs, dtype=np.float64)
    err = np.asarray(sensitivity, dtype=np.float64)
    choice = np.array(choice, dtype=np.int64)
    rows = np.arange(costs.shape[0])
    spent = float(costs[rows, choice].sum())
    while True:
        d_cost = costs - costs[rows, choice][:, None]
        ok = (d_cost > 0) & (spent + d_cost <= budget_bits + _TOL)
        if not ok.any():
            return choice
        ci, cj = np.nonzero(ok)
        # the most accurate fitting costlier rule of each candidate layer; move the layer whose best costs least
        best = np.lexsort((cj, err[ci, cj], ci))
        first = np.unique(ci[best], return_index=True)[1]
        cand = best[first]
        pick = cand[np.lexsort((ci[cand], err[ci[cand], cj[cand]], d_cost[ci[cand], cj[cand]]))[0]]
        i, j = int(ci[pick]), int(cj[pick])
        spent += d_cost[i, j]
        choice[i] = j


def unused_step(costs: np.ndarray, choice: np.ndarray, budget_bits: float) -> tuple[float, float]:
    """``(unused bits, smallest upgrade of any layer)`` of an allocation (for checks and tests)."""
    costs = np.asarray(costs, dtype=np.float64)
    rows = np.arange(costs.shape[0])
    current = costs[rows, choice]
    d = costs - current[:, None]
    ups = d[d > 0]
    return float(budget_bits - current.sum()), float(ups.min()) if ups.size else float("inf")


def lagrangian_allocation(costs: np.ndarray, sensitivity: np.ndarray, budget_bits: float,
                          iterations: int = 40) -> np.ndarray:
    """Each layer's rule minimising ``sensitivity + λ · cost``, with the smallest λ (bisected in
    log space) whose total fits the budget; the cheapest rules when none does. Greedy's
    convex-hull counterpart, in ``O(iterations · n_layers · n_rules)``."""
    costs = np.asarray(costs, dtype=np.float64)
    err = np.asarray(sensitivity, dtype=np.float64)
    rows = np.arange(costs.shape[0])
    if costs.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)

    def pick(lam: float) -> np.ndarray:
        return np.argmin(err + lam * costs, axis=1)

    scale = max(float(np.max(err)), 1e-30) / max(float(np.min(costs[costs > 0])) if (costs > 0).any() else 1.0, 1e-30)
    lo, hi = np.log(scale) - 60.0, np.log(scale) + 5.0
    best = pick(np.exp(hi))
    if costs[rows, best].sum() > budget_bits + _TOL:
        return np.argmin(costs + 1e-12 * err, axis=1)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        trial = pick(np.exp(mid))
        if costs[rows, trial].sum() <= budget_bits + _TOL:
            best, hi = trial, mid
        else:
            lo = mid
    return best
