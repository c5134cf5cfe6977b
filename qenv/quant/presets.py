"""Human-designed recipes: the bar every searched rule has to clear.

Each preset maps the layer list from the layer walker to a recipe, so it works on every
architecture: uniform round-to-nearest, uniform GPTQ, an AWQ-like activation-aware scheme, and
llama.cpp-like Q4_K_M / Q3_K_M mixes that follow ``llama_tensor_get_type``'s per-tensor rules.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

from qenv.errors import QenvError
from qenv.models.layers import LayerInfo
from qenv.quant.rules import Rule, Recipe

#: llama.cpp k-quant types approximated by rules (no 16-wide sub-blocks here: groups of 32).
KQUANT_RULES: dict[str, Rule] = {
    "Q2_K": Rule(bits=2, group_size=32),
    "Q3_K": Rule(bits=3, group_size=32, symmetric=True),
    "Q4_K": Rule(bits=4, group_size=32),
    "Q5_K": Rule(bits=5, group_size=32),
    "Q6_K": Rule(bits=6, group_size=32, symmetric=True),
    "Q8_0": Rule(bits=8, group_size=32, symmetric=True),
}
#: llama.cpp's own bits per weight of each type, for reporting the nearest type
KQUANT_BPW: dict[str, float] = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of blocks that get more bits: first and last eighth, every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _kquant_type(info: LayerInfo, mix: str) -> str:
    """The k-quant type llama.cpp gives this tensor in the ``Q4_K_M`` or ``Q3_K_M`` mix."""
    i, n = info.block, info.n_blocks
    if info.kind in ("lm_head",):
        return "Q6_K"
    if info.kind == "embed":
        return "Q6_K" if info.tied_to else ("Q4_K" if mix == "Q4_K_M" else "Q3_K")
    if mix == "Q4_K_M":
        if info.kind in ("v", "down", "fc_out"):
            return "Q6_K" if use_more_bits(i, n) else "Q4_K"
        if info.kind == "qkv":
            return "Q5_K"
        return "Q4_K"
    # Q3_K_M
    if info.kind == "v":
        return "Q5_K" if i < 2 else "Q4_K"
    if info.kind in ("down", "fc_out"):
        return "Q5_K" if i < n // 16 else "Q4_K"
    if info.kind in ("o", "qkv"):
        return "Q4_K"
    return "Q3_K"


def llamacpp_mix(layers: list[LayerInfo], mix: str = "Q4_K_M") -> Recipe:
    mix = mix.upper()
    if mix not in ("Q4_K_M", "Q3_K_M"):
        raise QenvError(f"Unknown llama.cpp mix {mix!r}.", "use 'Q4_K_M' or 'Q3_K_M'.")
    return Recipe({info.name: KQUANT_RULES[_kquant_type(info, mix)] for info in layers})


def uniform(layers: list[LayerInfo], rule: Rule) -> Recipe:
    return Recipe({info.name: rule for info in layers})


def rtn(bits: int, group_size: int = 128) -> Rule:
    return Rule(bits=bits, group_size=group_size)


def gptq(bits: int, group_size: int = 128) -> Rule:
    return Rule(bits=bits, group_size=group_size, rounding="gptq")


def awq(bits: int, group_size: int = 128) -> Rule:
    """AWQ-like: scale input channels by rms(x)^0.5 (foldable) and search clipping per group."""
    return Rule(bits=bits, group_size=group_size, act_scale=0.5, mse_clip=True)


_FAMILIES: dict[str, Callable[[int], Rule]] = {"rtn": rtn, "gptq": gptq, "awq": awq}
PRESET_EXAMPLES: tuple[str, ...] = (
    "rtn-w2", "rtn-w3", "rtn-w4", "rtn-w8", "gptq-w3", "gptq-w4", "awq-w3", "awq-w4", "q3_k_m", "q4_k_m", "fp16",
)


def preset(name: str, layers: list[LayerInfo]) -> Recipe:
    """A named human-designed recipe: ``rtn-w<b>``, ``gptq-w<b>``, ``awq-w<b>``, ``q4_k_m``, ``q3_k_m``, ``fp16``."""
    key = name.lower()
    if key == "fp16":
        return Recipe({})
    if key in ("q4_k_m", "q3_k_m"):
        return llamacpp_mix(layers, key)
    match = re.fullmatch(r"(rtn|gptq|awq)-w(\d+)(?:-g(\d+|c))?", key)
    if match:
        family, bits, group = match.groups()
        group_size = -1 if group == "c" else int(group or 128)
        return uniform(layers, replace(_FAMILIES[family](int(bits)), group_size=group_size))
    raise QenvError(f"Unknown preset {name!r}.",
                    f"use one of {', '.join(PRESET_EXAMPLES)} (rtn/gptq/awq take any bit width and -g32/-g64/-gc).")
