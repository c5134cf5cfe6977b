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
from qenv.quant import gguf as _gguf
from qenv.quant.rules import FP16_BITS, KEEP, Rule, layer_bits


def rule_bpw(rule: Rule, info: LayerInfo) -> float:
    """Exact bits per weight of ``rule`` on one layer (codes, scales, zero points, survivors)."""
    return layer_bits(rule, info.out_features, info.in_features) / info.numel


def stored_type(rule: Rule, info: LayerInfo) -> str | None:
    """The llama.cpp type a GGUF rule is really stored as on this layer (its row fallback), else ``None``."""
    if rule.gguf is None:
        return None
    return _gguf.effective_type(rule.gguf, info.in_features)


def rule_text(rule: Rule, info: LayerInfo) -> str:
    """The rule's label, with llama-quantize's fallback when the layer's rows do not fit the type
    (``Q4_K->Q5_0``): what is scored and charged is the fallback type."""
    stored = stored_type(rule, info)
    if stored is None or stored == rule.gguf:
        return rule.label()
    return f"{rule.label()}->{stored}"


def fallbacks(layers: Iterable[LayerInfo], recipe: Mapping[str, Rule]) -> dict[str, str]:
    """``{layer: "Q4_K->Q5_0"}`` for every layer whose GGUF type falls back on its row length."""
    out = {}
    for info in layers:
        rule = recipe.get(info.name)
        if rule is not None and rule.gguf is not None and stored_type(rule, info) != rule.gguf:
            out[info.name] = rule_text(rule, info)
    return out


#: layer kinds of one block that read the same (normalised) input tensor
SHARED_INPUT_KINDS: tuple[frozenset[str], ...] = (frozenset({"q", "k", "v"}), frozenset({"gate", "up"}))


def input_groups(layers: Iterable[LayerInfo]) -> dict[str, tuple[str, ...]]:
    """``{layer: names of the layers reading the same input, in forward order}`` (q/k/v, gate/up of a block).

    AWQ's input-channel scale folds into the op that produces the input (the norm before q/k/v or
    gate/up) only when every layer reading that input uses the same scale.
    """
    groups: dict[tuple[int, int], list[str]] = {}
    for info in layers:
        for g, kinds in enumerate(SHARED_INPUT_KINDS):
            if info.kind in kinds and info.block >= 0:
                groups.setdefault((info.block, g), []).append(info.name)
    return {name: tuple(members) for members in groups.values() for name in members}


def unfoldable_scales(layers: Iterable[LayerInfo], recipe: Mapping[str, Rule]) -> list[str]:
    """Layers whose ``act_scale`` cannot fold into the previous op, because another layer reading the
    same input uses a different scale (layers kept in fp16 take any scale into their weights)."""
    layers = list(layers)
    out = []
    for name, members in input_groups(layers).items():
        rule = recipe.get(name, KEEP)
        if rule.keeps or rule.act_scale <= 0:
            continue
        others = [recipe.get(m, KEEP) for m in members if m != name]
        if any(not o.keeps and o.act_scale != rule.act_scale for o in others):
            out.append(name)
    return out


def recipe_bits(layers: Iterable[LayerInfo], recipe: Mapping[str, Rule]) -> int:
    """Total storage bits of the targeted layers under ``recipe`` (unnamed layers stay fp16).

    A layer whose AWQ scale cannot fold (:func:`unfoldable_scales`) is charged its extra per-channel
    multiply: one fp16 value per input channel.
    """
    layers = list(layers)
    by_name = {info.name: info for info in layers}
    extra = sum(FP16_BITS * by_name[name].in_features for name in unfoldable_scales(layers, recipe))
    return extra + sum(layer_bits(recipe.get(info.name, KEEP), info.out_features, info.in_features) for info in layers)


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
