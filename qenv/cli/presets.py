"""The human baselines a searched or learned recipe is compared with, picked one way for every program
(``eval_agent.py --presets`` and ``python -m qenv quantize``'s comparison table).

``default``: rtn/gptq/awq at the bit widths bracketing the budget and the recipe's own bpw, llama.cpp's
mixes nearest both and within :data:`MIX_WINDOW_BPW` of them, and fp16; ``all``: every mix too; a
family or a preset name picks those alone.
"""

from __future__ import annotations

import math
from typing import Any

from qenv.errors import QenvError

FIXED_PRESETS: tuple[str, ...] = ("fp16",)
#: human families whose frontier is interpolated at the policy's own bits per weight
FAMILIES: tuple[str, ...] = ("rtn", "gptq", "awq", "llama.cpp", "llama.cpp+imatrix")
_TOL = 1e-9


def bracketing_presets(evaluator: Any, *bpws: float) -> list[str]:
    """rtn/gptq/awq at the widest bit width at or under each of ``bpws`` and the next one above it
    (the budget, and the policy's own size, so that each family's frontier brackets both)."""
    from qenv.envs.reward import bracketing_widths

    widths = sorted({point[1] for bpw in bpws for point in bracketing_widths(evaluator, bpw) if point is not None})
    return [f"{family}-w{b}" for b in widths for family in ("rtn", "gptq", "awq")]


#: --presets words that are not preset names
PRESET_WORDS: tuple[str, ...] = ("default", "all", "none")
#: llama.cpp mixes within this many bits per weight of the budget or the policy are default baselines
MIX_WINDOW_BPW = 1.0


def parse_presets(text: str) -> list[str]:
    """--presets as a list of words (``default``, ``all``, ``none``, families, preset names), each checked
    now, before any model is loaded; an unknown one is one error listing what is valid."""
    from qenv.quant.presets import LLAMACPP_PRESETS, preset

    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    unknown = []
    for word in words:
        if word in PRESET_WORDS or word in FAMILIES:
            continue
        try:
            preset(word, [])
        except QenvError:
            unknown.append(word)
    if unknown or not words:
        raise QenvError(f"Unknown preset(s) {unknown or [text]} in --presets.",
                        f"use a comma-separated list of {', '.join(PRESET_WORDS)}, the families "
                        f"{', '.join(FAMILIES)}, rtn-w<b> / gptq-w<b> / awq-w<b> (with -g32, -g64, -gc), fp16, or "
                        f"llama.cpp's mixes {', '.join(LLAMACPP_PRESETS)}.")
    return words


def nearest_mixes(evaluator: Any, family: str, bpws: tuple[float, ...], window: float) -> list[str]:
    """``family``'s llama.cpp mixes (sized, not scored) nearest at or under and at or over each of ``bpws``,
    and those within ``window`` bits per weight of any of them."""
    from qenv.quant.presets import LLAMACPP_PRESETS, preset

    sized = sorted((evaluator.size(preset(m, evaluator.layers))[0], m) for m in LLAMACPP_PRESETS
                   if family_of(m) == family)
    keep = set()
    for bpw in bpws:
        below = [m for b, m in sized if b <= bpw + _TOL]
        above = [m for b, m in sized if b >= bpw - _TOL]
        keep.update(([below[-1]] if below else []) + ([above[0]] if above else []))
        keep.update(m for b, m in sized if abs(b - bpw) <= window + _TOL)
    return [m for _, m in sized if m in keep]


def select_presets(words: list[str], evaluator: Any, budget: float, policy_bpw: float) -> list[str]:
    """The preset names ``words`` (from :func:`parse_presets`) stand for on this model, in table order,
    each once. ``default``: rtn/gptq/awq at the widths bracketing the budget and the policy's bpw,
    llama.cpp's mixes (with and without the importance matrix) nearest both and within
    :data:`MIX_WINDOW_BPW` of them, and fp16; ``all``: the bracketing widths, every mix and fp16."""
    chosen: list[str] = []
    bpws = (budget, policy_bpw)
    for word in words:
        if word == "none":
            continue
        if word in ("default", "all"):
            names = bracketing_presets(evaluator, *bpws)
            for family in ("llama.cpp", "llama.cpp+imatrix"):
                names += nearest_mixes(evaluator, family, bpws, MIX_WINDOW_BPW if word == "default" else math.inf)
            names += list(FIXED_PRESETS)
        elif word in ("rtn", "gptq", "awq"):
            names = [n for n in bracketing_presets(evaluator, *bpws) if n.startswith(word + "-")]
        elif word in FAMILIES:
            names = nearest_mixes(evaluator, word, bpws, math.inf)
        else:
            names = [word]
        chosen += [n for n in names if n not in chosen]
    return chosen


def family_of(method: str) -> str | None:
    """The human family a preset row belongs to (``None`` for fp16)."""
    from qenv.quant.presets import LLAMACPP_PRESETS

    if method in LLAMACPP_PRESETS:
        return "llama.cpp+imatrix" if method.endswith("-im") else "llama.cpp"
    head = method.split("-w")[0]
    return head if head in ("rtn", "gptq", "awq") else None


__all__ = ["FAMILIES", "FIXED_PRESETS", "MIX_WINDOW_BPW", "PRESET_WORDS", "bracketing_presets", "family_of",
           "nearest_mixes", "parse_presets", "select_presets"]
