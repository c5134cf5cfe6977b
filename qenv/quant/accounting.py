"""Exact storage accounting for a quantized model.

Bits per weight (bpw) are taken over the targeted layers, as quantization papers report them;
model bytes add everything that is not quantized (embeddings, norms, biases, untargeted layers),
stored in fp16, with tied tensors counted once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from torch import nn

from qenv.models.layers import LayerInfo, weight_parameter
from qenv.quant.rules import FP16_BITS, KEEP, Rule, layer_bits


def rule_bpw(rule: Rule, info: LayerInfo) -> float:
    """Exact bits per weight of ``rule`` on one layer (codes, scales, zero points, survivors)."""
    return layer_bits(rule, info.out_features, info.in_features) / info.numel


def recipe_bits(layers: Iterable[LayerInfo], recipe: Mapping[str, Rule]) -> int:
    """Total storage bits of the targeted layers under ``recipe`` (unnamed layers stay fp16)."""
    return sum(layer_bits(recipe.get(info.name, KEEP), info.out_features, info.in_features) for info in layers)


def bits_per_weight(layers: Iterable[LayerInfo], recipe: Mapping[str, Rule]) -> float:
    layers = list(layers)
    weights = sum(info.numel for info in layers)
    return recipe_bits(layers, recipe) / max(weights, 1)


def model_bytes(model: nn.Module, layers: Iterable[LayerInfo], recipe: Mapping[str, Rule],
                untargeted: int | None = None) -> int:
    """Bytes to store the whole model: quantized layers exactly, all other parameters in fp16.

    ``untargeted`` is :func:`untargeted_params` of the same model and layers, when the caller keeps it
    (it does not depend on the recipe, and counting it walks every parameter).
    """
    layers = list(layers)
    other = untargeted_params(model, layers) if untargeted is None else untargeted
    return math.ceil((recipe_bits(layers, recipe) + other * FP16_BITS) / 8)


def untargeted_params(model: nn.Module, layers: Iterable[LayerInfo]) -> int:
    """Parameters outside the targeted layers (stored in fp16), a tied tensor counted once."""
    targeted = {id(weight_parameter(model, info)) for info in layers}
    seen: set[int] = set()
    other = 0
    for param in model.parameters():  # parameters() yields a tied tensor once
        if id(param) in targeted or id(param) in seen:
            continue
        seen.add(id(param))
        other += param.numel()
    return other
