"""Rewards that mean the same thing on every model.

As CompilerGym scores a compiler pass against ``-Oz``, an episode is scored against the
human-designed reference at the same size: the frontier of uniform round-to-nearest recipes
(``rtn-w2`` … ``rtn-w8``, groups of 128), interpolated at the budget's bits per weight
(log-linearly for KL and perplexity, linearly for top-1). A positive fidelity reward means the
agent's recipe is more faithful than the uniform rule at that size.

Fidelity rewards, by ``reward`` kind:

- ``kl``:   ``log(KL_ref / KL)``
- ``ppl``:  ``(log ppl_ref − log ppl) / (log ppl_ref − log ppl_fp)`` (1 = as good as full precision)
- ``top1``: ``(top1 − top1_ref) / (1 − top1_ref)``

The episode's return is ``fidelity + size_weight · (budget − bpw) / budget − penalty`` plus,
with ``dense_weight`` > 0, ``−dense_weight · err_b`` at the end of each block ``b`` (its relative
output error against full precision). ``penalty`` applies only in the ``penalty`` budget mode, to a
recipe over the budget: ``penalty_weight · (bpw − budget) + max(0, fidelity − fidelity_in)``, where
``fidelity_in`` is an in-budget recipe's (the widest uniform RTN width that fits; see
``ModelTask.in_budget_metrics``). So no over-budget recipe out-scores that in-budget one, whatever
the weight: its fidelity counts at most as much, its size term is negative, its charge positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qenv.errors import QenvError
from qenv.eval.evaluator import Evaluator, Metrics
from qenv.quant.presets import rtn, uniform

REWARD_KINDS: tuple[str, ...] = ("kl", "ppl", "top1")
FRONTIER_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
KL_FLOOR = 1e-9


@dataclass(frozen=True)
class Reference:
    """The human-designed reference at one budget."""

    kl: float
    ppl: float
    top1: float
    bpw: float
    fp_ppl: float
    description: str


def check_reward_kind(kind: str) -> str:
    if kind not in REWARD_KINDS:
        raise QenvError(f"Unknown reward {kind!r}.", f"use one of {REWARD_KINDS}.")
    return kind


def bracketing_widths(evaluator: Evaluator, budget_bpw: float) -> tuple[tuple[float, int] | None, tuple[float, int] | None]:
    """``(bpw, bits)`` of the widest uniform RTN width at or under the budget and of the next one
    above it (``None`` where there is none): the frontier points a budget falls between."""
    points = [(evaluator.size(uniform(evaluator.layers, rtn(b)))[0], b) for b in FRONTIER_BITS]
    below = [p for p in points if p[0] <= budget_bpw + 1e-9]
    above = [p for p in points if p[0] > budget_bpw + 1e-9]
    return (below[-1] if below else None), (above[0] if above else None)


def uniform_frontier(evaluator: Evaluator, budget_bpw: float) -> Reference:
    """Uniform RTN interpolated at ``budget_bpw`` from the two uniform widths that bracket it."""
    layers = evaluator.layers
    below, above = bracketing_widths(evaluator, budget_bpw)
    lo = below or above
    hi = above or below
    assert lo is not None and hi is not None
    m_lo = evaluator.evaluate(uniform(layers, rtn(lo[1])))
    m_hi = m_lo if hi == lo else evaluator.evaluate(uniform(layers, rtn(hi[1])))
    t = 0.0 if hi[0] == lo[0] else min(max((budget_bpw - lo[0]) / (hi[0] - lo[0]), 0.0), 1.0)

    def log_mix(a: float, b: float) -> float:
        return math.exp((1 - t) * math.log(max(a, KL_FLOOR)) + t * math.log(max(b, KL_FLOOR)))

    fp_ppl = evaluator.full_precision_ppl
    desc = f"uniform RTN frontier at {budget_bpw:g} bpw (between rtn-w{lo[1]} @ {lo[0]:.3f} and rtn-w{hi[1]} @ {hi[0]:.3f})"
    return Reference(kl=log_mix(m_lo.kl, m_hi.kl), ppl=log_mix(m_lo.ppl, m_hi.ppl),
                     top1=(1 - t) * m_lo.top1 + t * m_hi.top1, bpw=budget_bpw, fp_ppl=fp_ppl, description=desc)


def fidelity_reward(kind: str, metrics: Metrics, ref: Reference) -> float:
    if kind == "kl":
        return math.log(max(ref.kl, KL_FLOOR) / max(metrics.kl, KL_FLOOR))
    if kind == "ppl":
        gap = math.log(ref.ppl) - math.log(ref.fp_ppl)
        return (math.log(ref.ppl) - math.log(metrics.ppl)) / max(gap, 1e-9)
    return (metrics.top1 - ref.top1) / max(1.0 - ref.top1, 1e-9)
