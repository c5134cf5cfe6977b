"""Observation features: a fixed-size description of a layer that does not depend on the model.

Static features (position, kind, size, weight and input-activation statistics, and the measured
output error of the layer at each candidate bit width — the sensitivity signal that lets one
policy transfer across models) are computed once per model and evaluator and cached on disk.
Episode features (budget left, progress, previous action) are appended at every step.

Raw sensitivities differ by orders of magnitude between models, so the observation also says
where a layer stands *within its model*: its error at each width z-scored over the model's
layers, the bits that a greedy allocation of the budget left gives it, how much one more bit
would remove here relative to the model's median, and its share of the sensitivity left. These
are what greedy's advantage comes from, and they mean the same thing on every model.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qenv.cache_files import read_table, write_table
from qenv.envs.allocation import LagrangianSuffix, lagrangian_allocation
from qenv.eval.evaluator import Evaluator, layer_table_path
from qenv.eval.sensitivity import rule_errors
from qenv.models.layers import LAYER_KINDS, LayerInfo
from qenv.quant.rules import Rule

SENSITIVITY_BITS: tuple[int, ...] = (2, 3, 4, 6, 8)
STATIC_NAMES: tuple[str, ...] = (
    ("depth",) + tuple(f"kind_{k}" for k in LAYER_KINDS)
    + ("log_fan_in", "log_fan_out", "log_numel", "param_share", "w_log_std", "w_log_kurtosis", "w_log_peak",
       "x_log_rms", "x_log_peak_ratio")
    + tuple(f"log_err_w{b}" for b in SENSITIVITY_BITS)
    + tuple(f"z_log_err_w{b}" for b in SENSITIVITY_BITS)
)
EPISODE_NAMES: tuple[str, ...] = (
    "budget_bpw", "bpw_left_for_rest", "budget_used", "params_left", "prev_bits", "prev_rule", "layers_left",
    "greedy_bits", "greedy_minus_even", "gain_vs_median", "sensitivity_share_left",
)
#: the width whose error measures a layer's share of the sensitivity left
SHARE_BITS = 3
OBS_DIM = len(STATIC_NAMES) + len(EPISODE_NAMES)
OBS_LIMIT = 10.0
#: the environment's observation kinds (``QuantLLMEnv(observation=...)``): ``full`` and ``relative``
#: have the same entries, read differently
OBSERVATION_KINDS: tuple[str, ...] = ("full", "relative")


def observation_size(kind: str) -> int:
    """The length of an observation of this kind (every kind has the same entries)."""
    return OBS_DIM


#: static entries that are logs of a size, a weight or activation statistic or an error: ``relative``
#: centres each on its median over the model's layers
_CENTRED = ("log_fan_in", "log_fan_out", "log_numel", "w_log_std", "w_log_kurtosis", "w_log_peak", "x_log_rms",
            "x_log_peak_ratio") + tuple(f"log_err_w{b}" for b in SENSITIVITY_BITS)
#: fused layers in the ``relative`` kind's kind entries: the parts they fuse (GPT-2's c_fc and c_proj are
#: its MLP's up and down projections), so a policy trained on one layout reads another's layers
_FUSED_KINDS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up"), "fc_in": ("up",), "fc_out": ("down",)}


def ladder_rules() -> list[Rule]:
    """The rules whose errors describe a layer's sensitivity: round-to-nearest at each of ``SENSITIVITY_BITS``."""
    return [Rule(bits=b) for b in SENSITIVITY_BITS]


def _static_row(evaluator: Evaluator, info: LayerInfo, total_params: int, errors: np.ndarray) -> list[float]:
    w = evaluator.weights.original(info.name).float()
    std = float(w.std().clamp_min(1e-12))
    centered = w - w.mean()
    kurtosis = float((centered**4).mean() / (centered.square().mean() ** 2).clamp_min(1e-30))
    peak = float(w.abs().max()) / std
    calib = evaluator.calibration_of(info.name)
    if calib is not None:
        rms = calib.act_rms.float()
        x_rms = float(rms.square().mean().sqrt().clamp_min(1e-12))
        x_peak = float(rms.max()) / x_rms
    else:
        x_rms, x_peak = 1.0, 1.0
    depth = layer_depth(info)
    kind = [1.0 if info.kind == k else 0.0 for k in LAYER_KINDS]
    errors = [math.log10(max(float(e), 1e-12)) / 4.0 for e in errors]
    return [depth, *kind, math.log2(info.in_features) / 16, math.log2(info.out_features) / 16,
            math.log10(info.numel) / 10, info.numel / total_params, math.log10(std), math.log10(kurtosis) / 2,
            math.log10(peak) / 2, math.log10(x_rms) / 2, math.log10(x_peak) / 2, *errors]


def layer_depth(info: LayerInfo) -> float:
    """Where the layer's block sits in the model, in (0, 1) (0 for a layer outside the blocks):
    the observation's ``depth``."""
    return 0.0 if info.block < 0 else min(1.0, (info.block + 0.5) / max(info.n_blocks, 1))


def static_features(evaluator: Evaluator, layers: list[LayerInfo]) -> np.ndarray:
    """``[n_layers, len(STATIC_NAMES)]`` float32, cached on disk beside the reference."""
    # the batch count is part of the key, as for the reference: calibration statistics summed per batch
    # differ in the last float bits between batchings, and a cache must not make runs differ
    path = layer_table_path(evaluator, layers, "features-v3")
    cached = read_table(path, (len(layers), len(STATIC_NAMES)))
    if cached is not None:
        return cached.astype(np.float32)
    total = sum(info.numel for info in layers)
    errors = rule_errors(evaluator, layers, ladder_rules())
    with torch.inference_mode():
        rows = np.asarray([_static_row(evaluator, info, total, e) for info, e in zip(layers, errors)],
                          dtype=np.float64)
    # where each layer stands within its model: its log error at each width, z-scored over the layers
    log_err = np.log10(np.maximum(errors, 1e-12))
    z = (log_err - log_err.mean(axis=0)) / np.maximum(log_err.std(axis=0), 1e-6)
    rows = np.concatenate([rows, z / 2.0], axis=1).astype(np.float32)
    rows = np.clip(np.nan_to_num(rows, nan=0.0, posinf=OBS_LIMIT, neginf=-OBS_LIMIT), -OBS_LIMIT, OBS_LIMIT)
    write_table(path, rows)
    return rows


def relative_static(static: np.ndarray, layers: list[LayerInfo]) -> np.ndarray:
    """The ``relative`` observation's static entries: the same layout as :func:`static_features`,
    with nothing that tells one model's scale from another's.

    A policy trained on 14–42-layer models with 64–256 hidden units met SmolLM2-135M's layers (576
    and 1536 wide, larger weight and activation peaks) with every size and statistic entry outside
    anything it had seen, and left greedy's plan on half of them. Here each size, statistic and
    log-error entry is centred on its model's median (a log ratio to the typical layer),
    ``param_share`` becomes ``log2(layer size / mean layer size) / 4``, and a fused layer's kind
    entries mark the layers it fuses (``qkv`` → q, k, v; ``fc_in`` → up; ``fc_out`` → down). Depth
    and the z-scored errors are relative already.

    So that a fused layout looks like a separate one (issue 25 item 6), a fused layer counts as the
    layers it fuses (:func:`layer_parts`) in the medians, the mean layer size and the error
    z-scores, and its ``log_fan_out`` and ``log_numel`` are those of one part; ``param_share`` keeps
    its whole size (what one decision spends). A model without fused layers reads exactly as before.
    """
    out = np.array(static, dtype=np.float64, copy=True)
    parts = np.array([layer_parts(info) for info in layers])
    # a fused layer's shape is read per part: GPT-2's c_attn [3h, h] is three [h, h] projections
    out[:, STATIC_NAMES.index("log_fan_out")] -= np.log2(parts) / 16
    out[:, STATIC_NAMES.index("log_numel")] -= np.log10(parts) / 10
    if (parts > 1).any():  # the z-scores too, over the parts (static_features z-scores over the layers)
        log_err = 4.0 * out[:, [STATIC_NAMES.index(f"log_err_w{b}") for b in SENSITIVITY_BITS]]
        mean = np.average(log_err, axis=0, weights=parts)
        std = np.sqrt(np.average((log_err - mean) ** 2, axis=0, weights=parts))
        z_cols = [STATIC_NAMES.index(f"z_log_err_w{b}") for b in SENSITIVITY_BITS]
        out[:, z_cols] = (log_err - mean) / np.maximum(std, 1e-6) / 2.0
    for name in _CENTRED:
        j = STATIC_NAMES.index(name)
        out[:, j] -= parts_median(out[:, j], parts)
    numel = np.array([info.numel for info in layers], dtype=np.float64)
    out[:, STATIC_NAMES.index("param_share")] = np.log2(numel / (numel.sum() / parts.sum())) / 4.0
    for row, info in zip(out, layers):
        for part in _FUSED_KINDS.get(info.kind, ()):
            row[STATIC_NAMES.index(f"kind_{info.kind}")] = 0.0
            row[STATIC_NAMES.index(f"kind_{part}")] = 1.0
    return np.clip(out, -OBS_LIMIT, OBS_LIMIT).astype(np.float32)


def layer_parts(info: LayerInfo) -> int:
    """How many of a separate-projection layout's layers this one is: 3 for a fused qkv, 2 for a fused
    gate_up, else 1 (GPT-2's c_fc is one MLP input, as a non-gated MLP has)."""
    return len(_FUSED_KINDS[info.kind]) if info.kind in ("qkv", "gate_up") else 1


def parts_median(values: np.ndarray, parts: np.ndarray) -> float:
    """The median of ``values`` with each layer counted as its :func:`layer_parts`: the median layer
    of a fused layout is then that of the same model with separate projections. (A plain median
    over GPT-2's 4 layers a block, 2 of them reading the normalised hidden state, sat between the
    two kinds of input; over Llama's 7, 5 of them reading it, on it: the same q/k/v input read 0.27
    apart in ``x_log_rms``.) Equals ``np.median`` when no layer is fused."""
    return float(np.median(np.repeat(values, parts)))


def _median(values: np.ndarray) -> float:
    """``np.median`` of a non-empty 1-D array, the same float, without its per-call overhead (this runs
    at every step of every episode)."""
    s = np.sort(values)
    n = s.shape[0]
    return float(s[n // 2]) if n % 2 else float((s[n // 2 - 1] + s[n // 2]) / 2.0)


def rung_gains(costs: np.ndarray, sensitivity: np.ndarray) -> np.ndarray:
    """``[n_layers, n_rungs]``: the error one more rung removes per extra bit at each layer and rung
    (0 at the top rung); :func:`model_relative` reads it at every step."""
    m = costs.shape[1]
    nxt = np.minimum(np.arange(m) + 1, m - 1)
    d_err = sensitivity - sensitivity[:, nxt]
    d_bits = np.maximum(costs[:, nxt] - costs, 1.0)
    return np.where((nxt > np.arange(m))[None, :], d_err / d_bits, 0.0)


def model_relative(costs: np.ndarray, sensitivity: np.ndarray, index: int, bits_left: float,
                   bpw_left: float, numel: np.ndarray, table: LagrangianSuffix | None = None,
                   gains: np.ndarray | None = None) -> list[float]:
    """The episode's model-relative features of layer ``index`` (see :data:`EPISODE_NAMES`).

    ``costs`` / ``sensitivity`` are ``[n_layers, len(SENSITIVITY_BITS)]``: storage bits and
    ``error × layer size`` of the ladder rules. The layers from ``index`` on share ``bits_left``;
    the (Lagrangian) greedy allocation of it gives this layer ``greedy_bits``. ``table``, a
    :class:`~qenv.envs.allocation.LagrangianSuffix` of ``costs`` and ``sensitivity`` built once
    per model, computes that allocation faster with the same result; ``gains``, the
    :func:`rung_gains` of ``costs`` and ``sensitivity``, saves recomputing them (the same floats).
    """
    n = costs.shape[0]
    if index >= n:
        return [0.0, 0.0, 0.0, 0.0]
    c, e = costs[index:], sensitivity[index:]
    plan = table.allocate(index, bits_left) if table is not None else lagrangian_allocation(c, e, bits_left)
    bits = float(SENSITIVITY_BITS[int(plan[0])])
    # the error one more rung removes per extra bit, at each layer's planned rung
    if gains is None:
        gains = rung_gains(costs, sensitivity)
    gain = gains[np.arange(index, n), plan]
    positive = gain[gain > 0]
    median = _median(positive) if positive.size else 1.0
    rel_gain = math.log10(max(float(gain[0]), 1e-12 * max(median, 1e-30)) / max(median, 1e-30)) / 2.0
    share_col = SENSITIVITY_BITS.index(SHARE_BITS)
    share = float(e[0, share_col] / max(float(e[:, share_col].sum()), 1e-30))
    return [bits / 16, (bits - bpw_left) / 4, rel_gain, share]
