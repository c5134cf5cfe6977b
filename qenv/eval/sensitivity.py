"""Sensitivity measurements: how much a layer's output moves under a rule, on calibration inputs.

What the observation's features, the greedy allocation and the action kinds' plans all rank
layers by. They are measurements of the evaluator's model, so they live with the evaluator
(``eval``), below the environment that reads them.

- :func:`output_error`: one layer's relative output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` under a rule;
- :func:`rule_errors`: the table of it for every layer and every rule of a list, cached on disk
  beside the reference.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import torch

from qenv.cache_files import read_table, write_table
from qenv.eval.evaluator import Evaluator, layer_table_path
from qenv.models.layers import LayerInfo
from qenv.quant.rules import Rule


#: per evaluator, each layer's ``tr(W H Wᵀ)``: the same for every rule, so computed once (it was half
#: the matrix products of a menu's error table, issue 26)
_OUTPUT_NORMS: weakref.WeakKeyDictionary[Evaluator, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def output_error(evaluator: Evaluator, info: LayerInfo, rule: Rule, quantized: torch.Tensor | None = None) -> float:
    """Relative output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` of one layer on calibration inputs;
    ``quantized``: the layer's tensor under ``rule`` when already at hand (else the evaluator's)."""
    calib = evaluator.calibration_of(info.name)
    original = evaluator.weights.original(info.name).float()
    if quantized is None:
        quantized = evaluator.weights.weight_for(info.name, rule)
    delta = quantized.float() - original
    if info.transposed:
        original, delta = original.T, delta.T
    if calib is None:
        return float(delta.square().sum() / original.square().sum().clamp_min(1e-30))
    norms = _OUTPUT_NORMS.setdefault(evaluator, {})
    den = norms.get(info.name)
    if calib.hessian is not None:
        h = calib.hessian.to(delta.device)
        num = (delta @ h * delta).sum()
        if den is None:
            den = (original @ h * original).sum()
    else:
        d = calib.hessian_diag.to(delta.device)
        num = (delta.square() * d).sum()
        if den is None:
            den = (original.square() * d).sum()
    norms[info.name] = den
    return float(num / den.clamp_min(1e-30))


def rule_errors(evaluator: Evaluator, layers: Sequence[LayerInfo], rules: Sequence[Rule]) -> np.ndarray:
    """``[n_layers, n_rules]`` relative output errors ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` (float64),
    cached on disk under the model, tokens, batching, rules and :func:`numerics_key`."""
    path = layer_table_path(evaluator, layers, "errors-v2", "|".join(r.label() + repr(r) for r in rules))
    cached = read_table(path, (len(layers), len(rules)), nonnegative=True)
    if cached is not None:
        return cached.astype(np.float64)
    from qenv.progress import progress_bar

    bar = progress_bar(len(layers) * len(rules), f"layer errors under {len(rules)} rules", "layer-rule")
    rows = []
    with torch.inference_mode():
        for info in layers:  # a layer's rules quantized together: the GPTQ ones share one column loop
            images = evaluator.weights.weights_for(info.name, rules)
            rows.append([output_error(evaluator, info, rule, q) for rule, q in zip(rules, images)])
            bar.update(len(rules))
    bar.close()
    err = np.array(rows, dtype=np.float64)
    err = np.nan_to_num(err, nan=1e30, posinf=1e30)
    write_table(path, err)
    return err
