"""GPTQ's column loop, shared by several rules of a layer (issue 26: a menu's error table).

:func:`qenv.quant.quantizer._gptq` runs here with one segment; :func:`quantize_rules` quantizes one
matrix under a whole list of rules, the GPTQ ones (:func:`stacks_with`) in one loop. Every image is
bit for bit what :func:`qenv.quant.quantizer.quantize_matrix` gives for its rule alone
(``tests/test_gptq_stacked.py`` checks the loop against a copy of the textbook one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qenv.quant.grids import MSE_CLIP_GRID, _fake_quant, _Grid, _grid_values, _group_ranges
from qenv.quant.rules import Rule

GPTQ_BLOCK = 128
#: rows one GPTQ column loop of :func:`qenv.quant.quantizer.quantize_rules` takes at most (several rules of a
#: layer, or layers of one shape): the loop's cost is per column, so more rows are nearly free, until a block
#: of them (128 columns) leaves the CPU's cache; measured on SmolLM2's shapes (issue 26)
GPTQ_LOOP_ROWS = 4096


def _one_group_grid(w: torch.Tensor, valid: torch.Tensor, rule: Rule, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` (``[rows, 1]`` each) of ``w``'s rows as one group of ``group`` columns (or
    fewer: a ragged last group), without importance weights: exactly :func:`_choose_grid`'s values
    for one group, for GPTQ's group starts. Why a second path: :func:`_choose_grid` expands every
    grid to one value per weight and tries the 11 clip ratios one after another, a few dozen small
    operations per group start; here the grids broadcast and the ratios are tried as one batch
    (each ratio's error is the same sum over the same padded group, so the choice is the same)."""
    rows, cols = w.shape
    lo, hi = _group_ranges(w, valid, group)  # [rows, 1]
    maxq = 2**rule.bits - 1
    if not rule.mse_clip:
        return _grid_values(lo, hi, rule.clip, rule)
    ratios = torch.tensor(MSE_CLIP_GRID, device=w.device)[:, None, None]  # [R, 1, 1]
    scale, zero = _grid_values(lo, hi, ratios, rule)  # [R, rows, 1]
    err = ((_fake_quant(w, _Grid(scale, zero, maxq)) - w) ** 2) * valid  # [R, rows, cols]; a weight of 1.0 is exact
    if group > cols:
        err = torch.nn.functional.pad(err, (0, group - cols))
    err = err.sum(dim=2)  # [R, rows]
    best_err = torch.full((rows, 1), float("inf"), device=w.device)
    best_clip = torch.ones((rows, 1), device=w.device)
    for k, ratio in enumerate(MSE_CLIP_GRID):
        better = err[k][:, None] < best_err
        best_err = torch.where(better, err[k][:, None], best_err)
        best_clip = torch.where(better, torch.full_like(best_clip, ratio), best_clip)
    return _grid_values(lo, hi, best_clip, rule)


def gptq_segments(w: torch.Tensor, keep: torch.Tensor, segments: Sequence[tuple[Rule, int, int, int]],
                   hinv: torch.Tensor, grids: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """:func:`_gptq`'s column loop on a batch ``[B, out, in]`` whose entries ``start:stop`` of each
    segment ``(rule, group, start, stop)`` follow that segment's rule and group size, with each
    entry's ``hinv`` (:func:`_gptq_hinv`, ``[B, in, in]``) given.

    Why segments: the column loop's cost is per column (a dozen small tensor operations), hardly
    per row, so one loop over a layer under all of a menu's GPTQ rules (:func:`quantize_rules`)
    costs about what one rule's did. Only the grids are per segment (each at its own group
    starts); every other operation is elementwise per entry or a per-entry matrix product, so
    each entry's result is what a loop of its segment alone gives. ``grids`` needs one segment.
    """
    n_b, out_f, in_f = w.shape
    if grids is not None and len(segments) != 1:
        raise ValueError("gptq_segments returns grids for one segment only")
    w = w.clone()
    # The column loop works on each block transposed, ``[B, columns, out]``: a column is contiguous,
    # so its dozen operations stream memory instead of striding a cache line per row (most of the
    # loop's time on a CPU once several rules share it). Values and operations are those of the
    # ``[B, out, columns]`` form: the rank-1 update is a product per element either way.
    result_t = torch.zeros(n_b, in_f, out_f, device=w.device, dtype=w.dtype)
    keep_t = keep.transpose(1, 2).contiguous()
    valid = ~keep
    scale = zero = None
    maxqs = {2**rule.bits - 1 for rule, _, _, _ in segments}
    if len(maxqs) == 1:
        maxq: int | torch.Tensor = maxqs.pop()
    else:
        maxq = torch.empty(n_b, 1, device=w.device)
        for rule, _, lo, hi in segments:
            maxq[lo:hi] = 2**rule.bits - 1
    for start in range(0, in_f, GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, in_f)
        block_t = w[:, :, start:end].transpose(1, 2).contiguous()  # [B, columns, out]
        err_t = torch.zeros_like(block_t)
        hinv_block = hinv[:, start:end, start:end]
        for i in range(end - start):
            col = start + i
            starting = [seg for seg in segments if col % seg[1] == 0]
            if starting:
                if len(segments) > 1:  # a fresh tensor: earlier grids stay as they were
                    scale = torch.empty(n_b, out_f, 1, device=w.device) if scale is None else scale.clone()
                    zero = torch.empty(n_b, out_f, 1, device=w.device) if zero is None else zero.clone()
                for rule, group, lo, hi in starting:
                    # Scales of a group come from the weights as updated so far (GPTQ's non-static groups).
                    # Rows are independent here, so the batch is flattened to rows for the grid search.
                    g_end = min(col + group, in_f)
                    current = block_t[lo:hi, i : i + g_end - col].transpose(1, 2)
                    if g_end > end:
                        current = torch.cat([current, w[lo:hi, :, end:g_end]], dim=2)
                    n_seg = hi - lo
                    g_scale, g_zero = _one_group_grid(current.reshape(n_seg * out_f, -1),
                                                      valid[lo:hi, :, col:g_end].reshape(n_seg * out_f, -1),
                                                      rule, group)
                    if len(segments) == 1:
                        scale = g_scale.reshape(n_b, out_f, 1)
                        zero = g_zero.reshape(n_b, out_f, 1)
                    else:
                        assert scale is not None and zero is not None
                        scale[lo:hi] = g_scale.reshape(n_seg, out_f, 1)
                        zero[lo:hi] = g_zero.reshape(n_seg, out_f, 1)
                if grids is not None:
                    assert scale is not None and zero is not None
                    grids.append((scale, zero))
                assert scale is not None and zero is not None
                scale_c, zero_c = scale.view(n_b, out_f), zero.view(n_b, out_f)
            wc = block_t[:, i]
            qc = _fake_quant(wc, _Grid(scale_c, zero_c, maxq))  # type: ignore[arg-type]
            qc = torch.where(keep_t[:, col], wc, qc)
            result_t[:, col] = qc
            err = (wc - qc) / hinv_block[:, i, i : i + 1]
            block_t[:, i:] -= hinv_block[:, i, i:, None] * err[:, None, :]
            err_t[:, i] = err
        w[:, :, end:] -= err_t.transpose(1, 2).contiguous() @ hinv[:, start:end, end:]
    return result_t.transpose(1, 2).contiguous()
