"""Quantization grids: per-group scales and zero points, and fake quantization on them.

Shared by the quantizer (:mod:`qenv.quant.quantizer`) and GPTQ's column loop (:mod:`qenv.quant.gptq`);
split from the quantizer for its size. Scales are rounded to fp16 exactly as they would be stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qenv.quant.rules import Rule

#: clip ratios tried per group when ``Rule.mse_clip`` is set
MSE_CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))


@dataclass(frozen=True)
class _Grid:
    """Per-group scale and zero point, expanded to one value per weight."""

    scale: torch.Tensor  # [out, in]
    zero: torch.Tensor  # [out, in]
    maxq: int


def _fp16_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (how scales are stored), avoiding zero and infinity."""
    tiny = torch.finfo(torch.float16).tiny
    return x.clamp(min=tiny, max=65504.0).half().float()


def _group_ranges(
    w: torch.Tensor, valid: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max over valid entries; groups run along the input dimension."""
    out_f, in_f = w.shape
    n_groups = -(-in_f // group)
    pad = n_groups * group - in_f
    inf = torch.tensor(float("inf"), device=w.device)
    lo = torch.where(valid, w, inf)
    hi = torch.where(valid, w, -inf)
    if pad:
        lo = torch.nn.functional.pad(lo, (0, pad), value=float("inf"))
        hi = torch.nn.functional.pad(hi, (0, pad), value=float("-inf"))
    lo = lo.view(out_f, n_groups, group).amin(dim=2)
    hi = hi.view(out_f, n_groups, group).amax(dim=2)
    # Keep zero inside the range (as GPTQ does): all-outlier groups and all-zero groups stay exact.
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo)).clamp(max=0.0)
    hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi)).clamp(min=0.0)
    return lo, hi


def _expand(per_group: torch.Tensor, group: int, in_f: int) -> torch.Tensor:
    return per_group.repeat_interleave(group, dim=1)[:, :in_f]


def _grid_values(lo: torch.Tensor, hi: torch.Tensor, clip: torch.Tensor | float, rule: Rule
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(scale, zero)`` from the groups' ranges and a clip ratio (any broadcastable shapes)."""
    maxq = 2**rule.bits - 1
    if rule.symmetric:
        amax = torch.maximum(-lo, hi) * clip
        scale = _fp16_round(2.0 * amax / maxq)
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        lo, hi = lo * clip, hi * clip
        scale = _fp16_round((hi - lo) / maxq)
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def _grid(lo: torch.Tensor, hi: torch.Tensor, clip: torch.Tensor | float, rule: Rule, group: int, in_f: int) -> _Grid:
    scale, zero = _grid_values(lo, hi, clip, rule)
    return _Grid(_expand(scale, group, in_f), _expand(zero, group, in_f), 2**rule.bits - 1)


def _fake_quant(w: torch.Tensor, grid: _Grid) -> torch.Tensor:
    if isinstance(grid.maxq, torch.Tensor):  # per entry (GPTQ segments of several bit widths): the same values
        q = torch.minimum(torch.clamp(torch.round(w / grid.scale) + grid.zero, min=0), grid.maxq)
        return (q - grid.zero) * grid.scale
    q = torch.clamp(torch.round(w / grid.scale) + grid.zero, 0, grid.maxq)
    return (q - grid.zero) * grid.scale


def _choose_grid(
    w: torch.Tensor, valid: torch.Tensor, rule: Rule, group: int, importance: torch.Tensor | None
) -> _Grid:
    """Scales for ``w``: a fixed clip ratio, or the per-group ratio with the least weighted MSE."""
    out_f, in_f = w.shape
    lo, hi = _group_ranges(w, valid, group)
    if not rule.mse_clip:
        return _grid(lo, hi, rule.clip, rule, group, in_f)
    n_groups = lo.shape[1]
    weight = torch.ones(in_f, device=w.device) if importance is None else importance
    best_err = torch.full((out_f, n_groups), float("inf"), device=w.device)
    best_clip = torch.ones((out_f, n_groups), device=w.device)
    pad = n_groups * group - in_f
    for ratio in MSE_CLIP_GRID:
        err = ((_fake_quant(w, _grid(lo, hi, ratio, rule, group, in_f)) - w) ** 2) * weight * valid
        if pad:
            err = torch.nn.functional.pad(err, (0, pad))
        err = err.view(out_f, n_groups, group).sum(dim=2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_clip = torch.where(better, torch.full_like(best_clip, ratio), best_clip)
    return _grid(lo, hi, best_clip, rule, group, in_f)
