"""The best start: the best *measured* recipe a search could return without searching.

qenv's claim is that a searched recipe beats the human rule at the same size. A search that starts
anywhere else (the costliest uniform rule with ties broken by menu order picked RTN over GPTQ; greedy's
plan, whose summed per-layer errors are not the model's error) can end below a human recipe it could
have returned as is (issue 24). So every search starts from the best of:

- greedy's plan (:func:`qenv.envs.allocation.greedy_allocation` on the measured per-layer errors);
- every human preset the menu can express at or under the budget (uniform RTN / GPTQ / AWQ at every
  width and group size, llama.cpp's mixes on ``menu="gguf"``), see :func:`human_preset_names`;
- every other uniform menu rule that fits.

Each is *measured* end to end (the one evaluator, on the calibration tokens), never ranked by a
proxy, and each measurement is counted like any other evaluation. :func:`start_candidates` lists
them (menu indices per layer, deduplicated, greedy's plan first, then costliest first);
:func:`best_start` measures them with the caller's score and returns the best. The searchers score
with the environment's reward (an episode per candidate); the environment's plan-based action kinds
can score with ``-KL`` of the folded recipe (see the issue-24 notes in the report).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from qenv.envs.allocation import greedy_allocation
from qenv.errors import QenvError
from qenv.models.layers import LayerInfo
from qenv.quant.presets import LLAMACPP_PRESETS, preset
from qenv.quant.rules import Rule

_TOL = 1e-9
#: the uniform human families, widths and group suffixes :func:`human_preset_names` spells out
_FAMILIES: tuple[str, ...] = ("gptq", "awq", "rtn")
_WIDTHS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
_GROUPS: tuple[str, ...] = ("", "-g32", "-g64", "-gc")


def human_preset_names() -> tuple[str, ...]:
    """Every human preset name :func:`qenv.quant.presets.preset` builds that a menu could express:
    ``gptq``/``awq``/``rtn`` at widths 2-8 and groups 128 (no suffix), 32, 64 and per channel, then
    llama.cpp's mixes (with and without the importance matrix). GPTQ comes first so that a rule two
    names share is labelled by the stronger family."""
    uniform = tuple(f"{family}-w{bits}{group}" for family in _FAMILIES for bits in _WIDTHS for group in _GROUPS)
    return uniform + LLAMACPP_PRESETS


@dataclass(frozen=True)
class StartCandidate:
    """One recipe a search may start from: its menu index per layer, total storage bits and a name
    that says where it comes from (``greedy plan``, a preset name such as ``gptq-w4``, or
    ``uniform <rule label>`` for a menu rule no preset names)."""

    label: str
    choice: tuple[int, ...]
    bits: float


@dataclass(frozen=True)
class BestStart:
    """What :func:`best_start` measured: the best candidate, its score, and every candidate measured
    with its score, in the order measured (all of them unless ``should_stop`` cut the list short)."""

    candidate: StartCandidate
    score: float
    measured: tuple[tuple[StartCandidate, float], ...]
    complete: bool


def _expressed(recipe_rules: Sequence[Rule], index_of: dict[Rule, int]) -> tuple[int, ...] | None:
    """The menu indices of a recipe's rules, or ``None`` when a rule is not on the menu."""
    out = []
    for rule in recipe_rules:
        j = index_of.get(rule)
        if j is None:
            return None
        out.append(j)
    return tuple(out)


def start_candidates(layers: Sequence[LayerInfo], rules: Sequence[Rule], costs: np.ndarray, budget_bits: float,
                     sensitivity: np.ndarray, presets: Sequence[str] | None = None) -> list[StartCandidate]:
    """The recipes a search starts from, as menu indices per layer, each at or under ``budget_bits``.

    Args:
        layers: the model's quantizable layers (the layer walker's order).
        rules: the menu (the action space's rules); ``costs[i, j]`` is rule ``j``'s bits on layer ``i``.
        budget_bits: the hard budget in bits.
        sensitivity: ``[n_layers, n_rules]`` measured output error x layer size (greedy's proxy).
        presets: human preset names to try (default: :func:`human_preset_names`).

    Order: greedy's plan first (a one-evaluation budget still gets greedy's recipe), then the
    presets and uniform menu rules, costliest first (ties: the preset name order of
    :func:`human_preset_names`, then menu order). A recipe reachable several ways is listed once,
    under its first name (greedy's plan, else a preset's name, else ``uniform <rule>``).
    """
    costs = np.asarray(costs, dtype=np.float64)
    n, m = costs.shape
    if len(layers) != n or len(rules) != m:
        raise QenvError(f"start_candidates got {len(layers)} layers and {len(rules)} rules for costs of shape "
                        f"{costs.shape}.", "pass the costs of these layers under these rules.")
    rows = np.arange(n)
    index_of: dict[Rule, int] = {}
    for j, rule in enumerate(rules):
        index_of.setdefault(rule, j)

    def total(choice: tuple[int, ...]) -> float:
        return float(costs[rows, list(choice)].sum())

    plan = tuple(int(j) for j in greedy_allocation(costs, sensitivity, budget_bits))
    out = [StartCandidate("greedy plan", plan, total(plan))] if total(plan) <= budget_bits + _TOL else []
    seen = {c.choice for c in out}
    named: list[tuple[float, int, StartCandidate]] = []
    for rank, name in enumerate(human_preset_names() if presets is None else presets):
        try:
            recipe = preset(name, list(layers))
        except QenvError:  # a mix this model cannot take
            continue
        choice = _expressed([recipe.rule_for(info.name) for info in layers], index_of)
        if choice is None or choice in seen:
            continue
        bits = total(choice)
        if bits <= budget_bits + _TOL:
            seen.add(choice)
            named.append((bits, rank, StartCandidate(name, choice, bits)))
    for j, rule in enumerate(rules):
        choice = (j,) * n
        bits = total(choice)
        if choice not in seen and bits <= budget_bits + _TOL:
            seen.add(choice)
            named.append((bits, len(named) + 10**6 + j, StartCandidate(f"uniform {rule.label()}", choice, bits)))
    named.sort(key=lambda item: (-item[0], item[1]))
    return out + [c for _, _, c in named]


def best_start(candidates: Sequence[StartCandidate], score: Callable[[tuple[int, ...]], float],
               should_stop: Callable[[], bool] | None = None) -> BestStart | None:
    """Measure the candidates in order with ``score`` (higher is better: the searchers pass the
    environment's reward, a caller scoring KL passes ``-kl``) and return the best (ties: the first).

    ``should_stop()`` is asked before each measurement (a search out of budget, a callback that
    stopped it); the result then says ``complete=False``. ``None`` when nothing was measured.
    A NaN score ranks last.
    """
    measured: list[tuple[StartCandidate, float]] = []
    best: tuple[StartCandidate, float] | None = None
    for candidate in candidates:
        if should_stop is not None and should_stop():
            break
        value = float(score(candidate.choice))
        measured.append((candidate, value))
        if best is None or (not math.isnan(value) and (math.isnan(best[1]) or value > best[1])):
            best = (candidate, value)
    if best is None:
        return None
    return BestStart(best[0], best[1], tuple(measured), complete=len(measured) == len(candidates))
