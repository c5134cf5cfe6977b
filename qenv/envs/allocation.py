"""Bit allocation under a budget: the allocations built on the measured sensitivities.

One place for what both the environment and the searchers need (the sensitivities themselves
are measured by :func:`qenv.eval.sensitivity.rule_errors`):

- :func:`greedy_allocation`: HAWQ-style greedy. Every layer starts at its cheapest rule, and the
  upgrade with the largest drop in ``error × layer size`` per extra bit is applied until nothing
  fits. It is the ``greedy`` searcher's recipe, the plan of the ``residual`` action kind (whose
  action 0 reproduces it) and the projection of the ``allocation`` kind;
- :func:`project_preferences`: the ``allocation`` kind's projection of per-layer preferences onto
  the best start, within the budget;
- :func:`fill_budget`: spends what an allocation left unused, so that less than one menu step
  (the smallest upgrade of any layer) stays unused;
- :func:`lagrangian_allocation`: the convex-hull version of greedy (each layer minimises
  ``error + λ · bits`` and λ is bisected to the budget), cheap enough to recompute at every step
  for the observation's "greedy bits" feature.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right

import numpy as np

_TOL = 1e-9


def greedy_allocation(costs: np.ndarray, sensitivity: np.ndarray, budget_bits: float,
                      start: np.ndarray | None = None) -> np.ndarray:
    """HAWQ-style greedy: the rule index of each layer.

    ``costs`` and ``sensitivity`` (error × layer size) are ``[n_layers, n_rules]``. Every layer
    starts at its cheapest rule (the most accurate among equally cheap ones); then the change with
    the largest error drop per extra bit that fits is applied (ties: largest drop, then the first
    layer and rule), until no change that lowers the error fits. Deterministic.

    ``start``: begin from this allocation instead (the ``residual`` kind's re-plan after a
    deviation: the plan it had, repaired by the same rule). While it is over the budget, the
    move to a cheaper rule with the smallest error rise per bit saved is applied (ties: smallest
    rise, then the first layer and rule); then the upgrades as above. A few moves, where greedy
    from scratch takes one per bit step of every layer.
    """
    err = np.asarray(sensitivity, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    n, m = costs.shape
    rows = np.arange(n)
    if start is None:
        choice = np.array([min(range(m), key=lambda j: (costs[i, j], err[i, j], j)) for i in rows], dtype=np.int64)
    else:
        choice = np.asarray(start)
        if choice.shape != (n,) or not np.issubdtype(choice.dtype, np.integer) or \
                (n and (choice.min() < 0 or choice.max() >= m)):
            raise ValueError(f"start must hold one rule index in [0, {m}) per layer ({n}), not {start!r}")
        choice = choice.astype(np.int64)
    spent = float(costs[rows, choice].sum())
    while spent > budget_bits + _TOL:
        saved = costs[rows, choice][:, None] - costs
        ok = saved > 0
        if not ok.any():  # every layer at its cheapest rule: nothing left to lower
            break
        with np.errstate(over="ignore", invalid="ignore"):  # NaN errors (never chosen) read as infinite
            rise = np.nan_to_num(np.where(ok, err - err[rows, choice][:, None], np.inf), nan=np.inf)
            loss = np.nan_to_num(np.where(ok, rise / np.maximum(saved, 1e-12), np.inf), nan=np.inf)
        top = ok & (loss == loss.min())
        top &= rise == np.where(top, rise, np.inf).min()
        i, j = divmod(int(np.argmax(top)), m)
        spent -= saved[i, j]
        choice[i] = j
    while True:
        d_cost = costs - costs[rows, choice][:, None]
        d_err = err[rows, choice][:, None] - err
        ok = (d_err > 0) & (spent + d_cost <= budget_bits + _TOL)
        if not ok.any():
            return choice
        gain = np.where(d_cost > 0, d_err / np.maximum(d_cost, 1e-12), np.inf)
        # best gain, then largest drop, then first layer and rule (row-major order): the maxima
        # narrowed step by step, as a lexsort of the candidates would order them, without sorting
        g = np.where(ok, gain, -np.inf)
        if np.isnan(g).any():  # NaN sorts last in a lexsort but poisons a max: sort
            ci, cj = np.nonzero(ok)
            best = np.lexsort((cj, ci, -d_err[ci, cj], -gain[ci, cj]))[0]
            i, j = int(ci[best]), int(cj[best])
        else:
            top = ok & (g == g.max())
            top &= d_err == np.where(top, d_err, -np.inf).max()
            i, j = divmod(int(np.argmax(top)), m)
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
        if np.isfinite(err[ok]).all():  # the same choice as the lexsorts below, by narrowing minima
            masked = np.where(ok, err, np.inf)
            layers = np.flatnonzero(ok.any(axis=1))
            # the most accurate fitting costlier rule of each candidate layer (ties: the first rule)
            js = np.argmax(ok[layers] & (masked[layers] == masked[layers].min(axis=1)[:, None]), axis=1)
            dc, de = d_cost[layers, js], err[layers, js]
            top = dc == dc.min()  # move the layer whose best costs least; ties: lower error, then first layer
            top &= de == np.where(top, de, np.inf).min()
            k = int(np.argmax(top))
            i, j = int(layers[k]), int(js[k])
        else:
            ci, cj = np.nonzero(ok)
            # the most accurate fitting costlier rule of each candidate layer; move the layer whose best costs least
            best = np.lexsort((cj, err[ci, cj], ci))
            first = np.unique(ci[best], return_index=True)[1]
            cand = best[first]
            pick = cand[np.lexsort((ci[cand], err[ci[cand], cj[cand]], d_cost[ci[cand], cj[cand]]))[0]]
            i, j = int(ci[pick]), int(cj[pick])
        spent += d_cost[i, j]
        choice[i] = j


def project_preferences(costs: np.ndarray, sensitivity: np.ndarray, anchor: np.ndarray, preferences: np.ndarray,
                        budget_bits: float, base: np.ndarray | None = None) -> np.ndarray:
    """The ``allocation`` action kind's projection: per-layer preferences in [-1, 1] turned into a
    recipe (rule indices) within ``budget_bits``, anchored at ``anchor`` (the best start).

    Greedy on the sensitivities weighted by exp(3·preference), filled, is compared with greedy on
    the plain ones (``base``: greedy's plan, computed when not given), filled: on each layer where
    the preferences changed greedy's rule, the anchor's rule moves by the bits greedy's moved (the
    most accurate rule at or under the anchor's bits plus that change, as the relative kind
    picks). Moves that break the budget are undone, weakest preference first.

    Then the bits still unused go to the layers the policy favours (preference above its mean),
    by greedy on the weighted sensitivities from the recipe. An anchor can sit well under the
    budget (a uniform rule a size step below it: uniform 3-bit GPTQ measured best at 4.0 bpw on
    stories260K), and the moves alone keep its size, so without this a policy at 4.0 bpw spent
    3.49 there. Preferences that change nothing in greedy's plan and favour no layer (all zero,
    or all equal) give the anchor itself: an untrained policy plays the best start."""
    costs = np.asarray(costs, dtype=np.float64)
    sens = np.asarray(sensitivity, dtype=np.float64)
    prefs = np.asarray(preferences, dtype=np.float64).reshape(-1)
    anchor = np.asarray(anchor, dtype=np.int64)
    if prefs.shape != anchor.shape or anchor.shape != (costs.shape[0],):
        raise ValueError(f"one preference and one anchor rule per layer ({costs.shape[0]}), not "
                         f"{prefs.shape} and {anchor.shape}")
    weighted = sens * np.exp(3.0 * prefs)[:, None]
    tilted = fill_budget(costs, weighted, greedy_allocation(costs, weighted, budget_bits), budget_bits)
    base = fill_budget(costs, sens, greedy_allocation(costs, sens, budget_bits) if base is None else base,
                       budget_bits)
    choice = anchor.copy()
    rows = np.arange(costs.shape[0])
    moved = np.flatnonzero(tilted != base)
    for i in moved:
        target = costs[i, choice[i]] + costs[i, tilted[i]] - costs[i, base[i]]
        ok = np.flatnonzero(costs[i] <= target + 1e-9)
        choice[i] = int(ok[np.argmin(sens[i, ok])]) if ok.size else int(np.argmin(costs[i]))
    for i in sorted(moved, key=lambda i: (abs(prefs[i]), i)):  # over the budget: weakest preference undone first
        if costs[rows, choice].sum() <= budget_bits + 1e-9:
            break
        choice[i] = anchor[i]
    favoured = np.flatnonzero(prefs > prefs.mean() + 1e-9) if prefs.size else rows
    unused = budget_bits - float(costs[rows, choice].sum())
    if favoured.size and unused > 1e-9:  # the budget left, spent on the favoured layers
        own = float(costs[favoured, choice[favoured]].sum())
        choice[favoured] = greedy_allocation(costs[favoured], weighted[favoured], own + unused, start=choice[favoured])
    return choice


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
    convex-hull counterpart, in ``O(iterations · n_layers · n_rules)``.

    The observation computes it at every step, so the bisection skips work without changing a
    bit of its result: once the bracket is narrow, most layers pick the same rule at every λ in
    it (provably, from the monotonicity of rounding: see :func:`_decided_rows`), and only the
    others are evaluated; their (whole-number) bit costs sum exactly in any order."""
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
    # the shortcut needs sums that are exact in any order (whole numbers below 2**53), costs >= 0
    # (so that each rule's value grows with λ) and finite errors; anything else runs the plain loop
    exact = bool(np.all(costs >= 0) and np.all(np.isfinite(err)) and float(costs.sum()) < 2.0**52
                 and np.array_equal(costs, np.floor(costs)))
    active, fixed, moved = rows, 0.0, False
    sub_err, sub_costs = err, costs
    few: list[tuple[list[float], list[float]]] | None = None  # the last few undecided rows, as Python floats
    for it in range(iterations):
        if exact and few is None and it >= 8 and it % 3 == 2:
            keep, bits = _decided_rows(sub_err, sub_costs, float(np.exp(lo)), float(np.exp(hi)))
            if not keep.all():
                fixed += bits
                active = active[keep]
                sub_err, sub_costs = err[active], costs[active]
            if active.size <= 4:  # numpy's per-call overhead dominates: the same float operations in Python
                few = [(err[r].tolist(), costs[r].tolist()) for r in active]
        mid = 0.5 * (lo + hi)
        lam = np.exp(mid)
        if few is not None:
            total = fixed
            lam_f = float(lam)
            for e_row, c_row in few:  # argmin of e + λ·c: the first smallest, as np.argmin
                best_v, best_c = e_row[0] + lam_f * c_row[0], c_row[0]
                for e_j, c_j in zip(e_row, c_row):
                    v = e_j + lam_f * c_j
                    if v < best_v:
                        best_v, best_c = v, c_j
                total += best_c
            fits = total <= budget_bits + _TOL
        else:
            trial = np.argmin(sub_err + lam * sub_costs, axis=1)
            fits = fixed + sub_costs[np.arange(active.size), trial].sum() <= budget_bits + _TOL
        if fits:
            hi, moved = mid, True
        else:
            lo = mid
    return pick(np.exp(hi)) if moved else best


def _decided_rows(err: np.ndarray, costs: np.ndarray, lam_lo: float, lam_hi: float) -> tuple[np.ndarray, float]:
    """``(rows still undecided, summed cost of the decided ones)`` for λ anywhere in the bracket.

    Each rule's value ``fl(err + fl(λ · cost))`` grows with λ (rounding is monotone, cost >= 0),
    so a row whose argmin ``j`` at the top of the bracket is below every earlier rule's value at
    the bottom (and not above any later one's: argmin takes the first of equal values) picks
    ``j`` at every λ between. The bracket is widened by 1e-9 to cover ``np.exp``'s rounding."""
    a, b = lam_lo * (1 - 1e-9), lam_hi * (1 + 1e-9)
    v_lo = err + a * costs
    v_hi = err + b * costs
    j = np.argmin(v_hi, axis=1)
    n_rows, m = costs.shape
    r = np.arange(n_rows)
    top = v_hi[r, j][:, None]
    cols = np.arange(m)[None, :]
    ok = np.where(cols < j[:, None], top < v_lo, top <= v_lo)
    ok[r, j] = True
    decided = ok.all(axis=1)
    return ~decided, float(costs[r[decided], j[decided]].sum())


class LagrangianSuffix:
    """:func:`lagrangian_allocation` of the layers from ``start`` on, for any budget, bit for bit,
    at a fraction of its cost (the observation computes it at every step of every episode).

    The bisection only asks, 40 times, whether the suffix's total cost at some λ fits. Built
    once per model: each layer's rule as a function of λ (the pairwise crossing points of
    ``err + λ · cost`` split λ into intervals of one rule each) and, over all layers, the cost
    change at each crossing, summed per suffix: a total is then one lookup. A λ within a margin
    of any crossing (where float rounding could pick another rule than the exact minimum) is
    evaluated the plain way instead. Used only when every cost is a whole number (exact sums),
    and every error is finite; else the plain function runs.
    """

    _EPS = 5e-14  # margin around crossings: over 200x float64's rounding of a difference of err + λ·cost

    def __init__(self, costs: np.ndarray, sensitivity: np.ndarray) -> None:
        self.costs = np.ascontiguousarray(costs, dtype=np.float64)
        self.err = np.ascontiguousarray(sensitivity, dtype=np.float64)
        n, m = self.costs.shape
        self.n = n
        c, e = self.costs, self.err
        positive = np.where(c > 0, c, np.inf)
        # suffix max error and min positive cost: the bisection's starting bracket, as np.max / np.min give them
        self.max_err = np.maximum.accumulate(e.max(axis=1)[::-1])[::-1] if n else np.zeros(0)
        self.min_pos = np.minimum.accumulate(positive.min(axis=1)[::-1])[::-1] if n else np.zeros(0)
        self.fast = bool(n and np.all(c >= 0) and np.all(np.isfinite(e)) and float(c.sum()) < 2.0**52
                         and np.array_equal(c, np.floor(c)))
        if not self.fast:
            return
        eps = self._EPS
        events: list[tuple[float, int, float]] = []  # (λ, layer, cost change)
        unsafe: list[tuple[float, float]] = []
        self.base = np.empty(n, dtype=np.float64)  # each layer's cost as λ -> 0+
        for r in range(n):
            er, cr = e[r].tolist(), c[r].tolist()
            cross, own = [], []
            for j in range(m):
                for k in range(j + 1, m):
                    a, d = cr[k] - cr[j], er[k] - er[j]  # v_k - v_j = d + λ a
                    big = abs(er[j]) + abs(er[k])
                    small = cr[j] + cr[k]
                    if a == 0:  # equal costs: the order is fixed, but rounding can tie them once λ·cost is large
                        if d != 0 and small > 0:
                            own.append((max((abs(d) - eps * big) / (eps * small), 0.0) * (1 - 1e-15), math.inf))
                        continue
                    if abs(a) <= 2 * eps * small:  # costs near 1e13 bits and more: the margins below fail
                        self.fast = False
                        return
                    if a > 0:
                        lo, hi = (-eps * big - d) / (a + eps * small), (eps * big - d) / (a - eps * small)
                    else:
                        lo, hi = (eps * big - d) / (a - eps * small), (-eps * big - d) / (a + eps * small)
                    if hi > 0 and hi >= lo:
                        own.append((max(lo, 0.0) * (1 - 1e-15), hi * (1 + 1e-15)))
                    x = -d / a
                    if x > 0:
                        cross.append(x)
            points = sorted(set(cross))
            reps = ([points[0] / 2] + [(p * q) ** 0.5 for p, q in zip(points, points[1:])] + [points[-1] * 2]
                    if points else [1.0])
            picks = [min(range(m), key=lambda j: (er[j] + lam * cr[j], j)) for lam in reps]
            # a representative λ must itself be safe, else give up the fast path (never seen in practice)
            if own:
                bounds = np.asarray(own)
                at = np.asarray(reps)[:, None]
                if np.any((bounds[:, 0] <= at) & (at <= bounds[:, 1])):
                    self.fast = False
                    return
            unsafe += own
            self.base[r] = cr[picks[0]]
            for t, x in enumerate(points):
                if cr[picks[t + 1]] != cr[picks[t]]:
                    events.append((x, r, cr[picks[t + 1]] - cr[picks[t]]))
        events.sort()
        self.event_lam = [x for x, _, _ in events]
        # cum[i, k]: cost change of the first k events over layers >= i (whole numbers: exact)
        change = np.zeros((n + 1, len(events) + 1), dtype=np.float64)
        for k, (_, r, delta) in enumerate(events):
            change[: r + 1, k + 1] = delta
        self.cum = np.cumsum(change, axis=1)
        self.falling = np.all(np.diff(self.cum, axis=1) <= 0, axis=1)  # per suffix: totals fall as λ grows
        self.base_suffix = np.concatenate([np.cumsum(self.base[::-1])[::-1], [0.0]])
        unsafe.sort()
        merged: list[list[float]] = []
        for lo, hi in unsafe:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self._rows: dict[int, list[float]] = {}
        self.unsafe_lo = [lo for lo, _ in merged]
        self.unsafe_hi = [hi for _, hi in merged]

    def _total(self, start: int, lam: float, row: list[float]) -> float:
        """The suffix's total cost at ``lam``, as ``costs[rows, argmin(err + lam·costs)].sum()``
        (``row``: ``cum[start]`` as a list)."""
        u = bisect_right(self.unsafe_lo, lam) - 1
        if u >= 0 and lam <= self.unsafe_hi[u]:  # near a crossing: the plain way
            c, e = self.costs[start:], self.err[start:]
            return float(c[np.arange(c.shape[0]), np.argmin(e + lam * c, axis=1)].sum())
        return row[bisect_right(self.event_lam, lam)]

    def allocate(self, start: int, budget_bits: float, iterations: int = 40) -> np.ndarray:
        """Exactly ``lagrangian_allocation(costs[start:], sensitivity[start:], budget_bits, iterations)``."""
        costs, err = self.costs[start:], self.err[start:]
        if not self.fast or start >= self.n:
            return lagrangian_allocation(costs, err, budget_bits, iterations)

        def pick(lam: float) -> np.ndarray:
            return np.argmin(err + lam * costs, axis=1)

        min_pos = float(self.min_pos[start])
        scale = max(float(self.max_err[start]), 1e-30) / max(min_pos if np.isfinite(min_pos) else 1.0, 1e-30)
        # Python floats hold the same float64 values as numpy's scalars, and are faster to compare
        lo, hi = float(np.log(scale) - 60.0), float(np.log(scale) + 5.0)
        limit = budget_bits + _TOL
        row = self._rows.get(start)
        if row is None:  # each suffix's totals per event interval, as Python floats (built once per suffix)
            row = self._rows[start] = (self.cum[start] + self.base_suffix[start]).tolist()
        if self._total(start, float(np.exp(hi)), row) > limit:
            return np.argmin(costs + 1e-12 * err, axis=1)
        window = self._feasible_window(start, row, limit)
        # no threshold to read off the table (never seen in practice): every λ is asked
        below, above = window if window is not None else (0.0, math.inf)
        # the margin of the crossings at λ -> 0 has no interval below it to bound its totals: asked too
        near_zero = self.unsafe_hi[0] if self.unsafe_lo and self.unsafe_lo[0] <= 0.0 else 0.0
        # compared in log space, widened by 1e-12 (thousands of ulps of exp's rounding): a log-λ
        # inside a widened window is asked exactly, at numpy's exp (the plain function's λ)
        log_zero = math.log(near_zero) + 1e-12 if near_zero > 0 else -math.inf
        log_below = math.log(below) - 1e-12 if below > 0 else -math.inf
        log_above = math.log(above) + 1e-12 if above > 0 else -math.inf
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if mid <= log_zero or log_below <= mid <= log_above:
                fits = self._total(start, float(np.exp(mid)), row) <= limit
            else:
                fits = mid > log_above
            if fits:
                hi = mid
            else:
                lo = mid
        return pick(np.exp(hi))

    def _feasible_window(self, start: int, row: list[float], limit: float) -> tuple[float, float] | None:
        """``(below, above)``: every λ < below makes the suffix's total exceed ``limit`` and every λ >
        above fits it, also where the total is computed the plain way (a rule picked near a crossing is
        one of the rules on either side of it, so that total lies between the table's totals around the
        margin). Between them (the margin around the crossing where the total first fits) each λ is
        asked. ``None`` when the table's totals do not fall with λ (then every λ is asked)."""
        window: tuple[float, float] | None = None
        if self.falling[start]:
            first = bisect_left(row, -limit, key=float.__neg__)  # the first interval whose total fits
            first = first if first < len(row) else None
            if first is not None:
                threshold = self.event_lam[first - 1] if first > 0 else 0.0
                u = bisect_right(self.unsafe_lo, threshold) - 1
                if first > 0 and u >= 0 and threshold <= self.unsafe_hi[u]:
                    window = (self.unsafe_lo[u], self.unsafe_hi[u])
                else:
                    window = (threshold, threshold)
        return window
