"""The quantizer: one implementation of every survival rule.

``quantize_matrix`` turns an ``[out, in]`` weight matrix into its dequantized image under a
:class:`~qenv.quant.rules.Rule`. Everything in qenv that needs quantized weights (environment,
presets, searchers, exports) goes through here, so there is exactly one definition of what a
rule does. The math runs in float32; scales are rounded to fp16 exactly as they would be stored.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from qenv.errors import QenvError
from qenv.quant import gguf as _gguf
from qenv.quant.gptq import GPTQ_BLOCK, GPTQ_LOOP_ROWS, gptq_segments  # noqa: F401
from qenv.quant.grids import (MSE_CLIP_GRID, _choose_grid, _expand, _fake_quant, _fp16_round,  # noqa: F401
                              _Grid, _grid, _group_ranges)
from qenv.quant.rules import Rule, n_outliers

GPTQ_DAMP = 0.01


@dataclass
class LayerCalibration:
    """What the quantizer may know about a layer's inputs on calibration tokens.

    ``act_rms[j]`` is the root-mean-square of input channel ``j``; ``hessian`` is ``XᵀX / n``
    (``[in, in]``), needed only by the roundings that read it (GPTQ, learned).
    """

    act_rms: torch.Tensor
    hessian: torch.Tensor | None = None

    @property
    def hessian_diag(self) -> torch.Tensor:
        if self.hessian is not None:
            return torch.diagonal(self.hessian)
        return self.act_rms.square()


def salience_scores(w: torch.Tensor, rule: Rule, calib: LayerCalibration | None) -> torch.Tensor:
    """``|w|^a * rms(x)^b * diag(H)^c`` for every weight; ``a, b, c = rule.salience``."""
    a, b, c = rule.salience
    score = w.abs().clamp_min(1e-12) ** a
    if b != 0 or c != 0:
        if calib is None:
            raise QenvError(f"Rule {rule.label()} scores salience from activations but no calibration was given.")
        per_channel = calib.act_rms.clamp_min(1e-12) ** b * calib.hessian_diag.clamp_min(1e-12) ** c
        score = score * per_channel.to(w.device)[None, :]
    return score


def _outlier_mask(w: torch.Tensor, rule: Rule, calib: LayerCalibration | None) -> torch.Tensor:
    k = n_outliers(rule, w.numel())
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    if k:
        top = torch.topk(salience_scores(w, rule, calib).flatten(), k).indices
        mask[top] = True
    return mask.view_as(w)


def _channel_scale(rule: Rule, calib: LayerCalibration | None, device: torch.device) -> torch.Tensor | None:
    if rule.act_scale <= 0:
        return None
    if calib is None:
        raise QenvError(f"Rule {rule.label()} scales by activations but no calibration was given.")
    s = calib.act_rms.to(device).clamp_min(1e-8) ** rule.act_scale
    return s / torch.sqrt(s.max() * s.min())


def _gptq_hinv(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian (:func:`_damped_hessian`), for a batch
    ``[B, in, in]``."""
    h = _damped_hessian(hessian)
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise QenvError("GPTQ failed: the calibration Hessian is not positive definite.",
                        "use more calibration tokens or a rule with rounding='nearest'.") from None


def _gptq(w: torch.Tensor, keep: torch.Tensor, rule: Rule, group: int, hessian: torch.Tensor,
          grids: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """GPTQ on a batch of matrices ``[B, out, in]`` (each with its Hessian ``[B, in, in]``): quantize
    column by column, spreading each column's error over later columns.

    The batch runs one column loop for all its matrices, so quantizing every layer of one shape
    costs the kernel launches of one layer (on a GPU the loop is launch-bound: about ten small
    kernels per column). Each matrix's arithmetic is the per-matrix algorithm's, in the same order
    (lazy block updates of ``GPTQ_BLOCK`` columns), so results agree with one-at-a-time GPTQ
    within float noise. ``grids``, when given, receives each group's ``(scale, zero)`` (``[B, out, 1]``
    each), in column order: the integer codes behind the result (:func:`quantize_codes`).
    """
    return gptq_segments(w, keep, [(rule, group, 0, w.shape[0])], _gptq_hinv(hessian.to(w.device)), grids)


def quantize_threads() -> int:
    """Threads that quantize llama.cpp types in parallel: ``QENV_QUANT_THREADS`` when set, else the
    CPUs this process may run on."""
    raw = os.environ.get("QENV_QUANT_THREADS", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise QenvError(f"QENV_QUANT_THREADS={raw!r} is not a whole number of at least 1.",
                            "set it to e.g. 8, or unset it to use every CPU.")
        return int(raw)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: rounds of ``rounding="learned"`` after GPTQ: each is one coordinate-descent sweep over the codes
#: and one least-squares refit of the group scales (the output error falls fastest in the first rounds)
LEARNED_ROUNDS = 4


def _damped_hessian(hessian: torch.Tensor) -> torch.Tensor:
    """The Hessian GPTQ works with (``[B, in, in]``): dead input channels get a unit diagonal, and
    every diagonal entry is raised by ``GPTQ_DAMP`` of the mean (a small pull towards the weights
    themselves, which keeps the learned codes from fitting the calibration tokens alone)."""
    h = hessian.to(torch.float32).clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    diag.masked_fill_(diag == 0, 1.0)
    diag += (GPTQ_DAMP * diag.mean(dim=-1))[:, None]
    return h


def _row_errors(error: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``e H eᵀ`` of every row of ``error`` (``[B, out, in]``): each output channel's squared error
    summed over the calibration inputs (divided by their count)."""
    return ((error @ h) * error).sum(dim=-1)


def _coordinate_sweep(ws: torch.Tensor, q: torch.Tensor, free: torch.Tensor, scale: torch.Tensor,
                      zero: torch.Tensor, maxq: int, h: torch.Tensor) -> torch.Tensor:
    """One cyclic coordinate-descent sweep over the codes of ``q`` (``[B, out, in]``, on the grid
    ``scale``/``zero`` expanded per weight): each free weight in turn moves to the grid point that
    minimises its row's error ``(ws - q) H (ws - q)ᵀ`` given all the others. That 1-D problem is a
    parabola in the weight, so the nearest grid point to its vertex is exact: no step increases the
    error. Updates of the residual ``(ws - q) H`` are lazy per block of ``GPTQ_BLOCK`` columns, as GPTQ's."""
    q = q.clone()
    in_f = q.shape[-1]
    residual = (ws - q) @ h
    diag = torch.diagonal(h, dim1=-2, dim2=-1)[:, None, :]  # [B, 1, in]
    for start in range(0, in_f, GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, in_f)
        moved = torch.zeros_like(q[:, :, start:end])
        h_block = h[:, start:end, start:end]
        for i in range(end - start):
            col = start + i
            s, z = scale[:, :, col], zero[:, :, col]
            target = q[:, :, col] + residual[:, :, col] / diag[:, :, col]
            best = (torch.clamp(torch.round(target / s) + z, 0, maxq) - z) * s
            step = torch.where(free[:, :, col], best - q[:, :, col], torch.zeros_like(best))
            q[:, :, col] += step
            moved[:, :, i] = step
            residual[:, :, start:end] -= step[:, :, None] * h_block[:, i : i + 1, :]
        if start:
            residual[:, :, :start] -= moved @ h[:, start:end, :start]
        if end < in_f:
            residual[:, :, end:] -= moved @ h[:, start:end, end:]
    return q


def _refit_scales(ws: torch.Tensor, codes: torch.Tensor, free: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor, group: int, h: torch.Tensor) -> torch.Tensor:
    """The fp16 group scales (``[B, out, n_groups]``) that minimise each row's error
    ``(ws - q) H (ws - q)ᵀ`` for fixed integer codes and zero points: per row, a least-squares
    problem in its ``n_groups`` scales (the groups are coupled through ``H``). A group whose codes
    all sit on the zero point, or whose solution is not a positive finite number, keeps its scale."""
    n_b, out_f, in_f = ws.shape
    n_groups = scale.shape[-1]
    padded = n_groups * group
    pad = padded - in_f
    steps = torch.where(free, codes - _expand_last(zero, group, in_f), torch.zeros_like(codes))
    target = torch.where(free, ws, torch.zeros_like(ws))
    hp = h
    if pad:
        steps = torch.nn.functional.pad(steps, (0, pad))
        target = torch.nn.functional.pad(target, (0, pad))
        hp = torch.nn.functional.pad(h, (0, pad, 0, pad))
    by_group = steps.view(n_b, out_f, n_groups, group)
    rhs = ((target @ hp).view(n_b, out_f, n_groups, group) * by_group).sum(dim=-1)
    gram = torch.empty(n_b, out_f, n_groups, n_groups, device=ws.device)
    for g in range(n_groups):
        coupled = by_group[:, :, g, :] @ hp[:, g * group : (g + 1) * group, :]
        gram[:, :, g, :] = (coupled.view(n_b, out_f, n_groups, group) * by_group).sum(dim=-1)
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    used = diag > 0
    ridge = 1e-6 * diag.mean(dim=-1, keepdim=True).clamp_min(1e-30)
    eye = torch.eye(n_groups, device=ws.device)
    system = gram + eye * torch.where(used, ridge, torch.ones_like(diag))[..., None]
    solved = torch.linalg.solve(system, rhs[..., None])[..., 0]
    ok = used & torch.isfinite(solved) & (solved > 0)
    return torch.where(ok, _fp16_round(torch.where(ok, solved, scale)), scale)


def _expand_last(per_group: torch.Tensor, group: int, in_f: int) -> torch.Tensor:
    """``[..., n_groups]`` per-group values as ``[..., in]`` per-weight values."""
    return per_group.repeat_interleave(group, dim=-1)[..., :in_f]


def _learned(ws: torch.Tensor, keep: torch.Tensor, rule: Rule, group: int, hessian: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rounding="learned"`` on a batch ``[B, out, in]``: ``(image, codes, scale, zero)``.

    GPTQ gives the start (its codes, and its groups' scales and zero points); then ``LEARNED_ROUNDS``
    rounds alternate a coordinate-descent sweep over the codes (:func:`_coordinate_sweep`) and a
    least-squares refit of the scales (:func:`_refit_scales`), both on GPTQ's damped Hessian. Every
    step is kept per row only where it lowers that row's error, so no row ends above GPTQ's. The
    result is stored exactly as GPTQ's is (integer codes, fp16 scales, the same zero points), so its
    size is GPTQ's to the bit. Deterministic: no random start, no sampling.
    """
    grids: list[tuple[torch.Tensor, torch.Tensor]] = []
    q = _gptq(ws, keep, rule, group, hessian, grids)
    in_f = ws.shape[-1]
    maxq = 2**rule.bits - 1
    free = ~keep
    scale = torch.cat([g[0] for g in grids], dim=2)
    zero = torch.cat([g[1] for g in grids], dim=2)
    scale_w, zero_w = _expand_last(scale, group, in_f), _expand_last(zero, group, in_f)
    codes = torch.where(free, torch.clamp(torch.round(q / scale_w) + zero_w, 0, maxq), zero_w)
    q = torch.where(free, (codes - zero_w) * scale_w, ws)
    h = _damped_hessian(hessian)
    err = _row_errors(ws - q, h)
    for _ in range(LEARNED_ROUNDS):
        swept = _coordinate_sweep(ws, q, free, scale_w, zero_w, maxq, h)
        swept_err = _row_errors(ws - swept, h)
        better = (swept_err < err)[..., None]
        q, err = torch.where(better, swept, q), torch.minimum(swept_err, err)
        codes = torch.where(free, torch.round(q / scale_w) + zero_w, zero_w)
        refit = _refit_scales(ws, codes, free, scale, zero, group, h)
        refit_w = _expand_last(refit, group, in_f)
        candidate = torch.where(free, (codes - zero_w) * refit_w, ws)
        cand_err = _row_errors(ws - candidate, h)
        better = cand_err < err
        scale = torch.where(better[..., None], refit, scale)
        scale_w = _expand_last(scale, group, in_f)
        q, err = torch.where(better[..., None], candidate, q), torch.where(better, cand_err, err)
    return q, codes, scale, zero


def quantize_matrices(weights: Sequence[torch.Tensor], rule: Rule,
                      calibs: Sequence[LayerCalibration | None] | None = None,
                      threads: int | None = None) -> list[torch.Tensor]:
    """The dequantized images of several ``[out, in]`` matrices under one ``rule`` (same dtype and
    device as each input), exactly what :func:`quantize_matrix` gives for each.

    GPTQ matrices of one shape are quantized as one batch (one column loop for all of them): on a
    GPU that loop is launch-bound, so this is what makes building a whole menu fast. A llama.cpp
    type's matrices are quantized in ``threads`` threads (default :func:`quantize_threads`):
    ``ggml_quantize_chunk`` runs in C through ctypes, which releases the GIL, and each matrix is
    quantized whole by one thread, so the bytes are those of the serial build. Every other rule is
    vectorised within a matrix already and goes through :func:`quantize_matrix` one by one.
    """
    calibs = [None] * len(weights) if calibs is None else list(calibs)
    if len(calibs) != len(weights):
        raise ValueError("quantize_matrices needs one calibration per weight matrix")
    if rule.gguf is not None and len(weights) > 1:
        n = min(len(weights), quantize_threads() if threads is None else max(1, int(threads)))
        if n > 1:
            with ThreadPoolExecutor(max_workers=n, thread_name_prefix="qenv-ggml") as pool:
                return list(pool.map(lambda wc: quantize_matrix(wc[0], rule, wc[1]), zip(weights, calibs)))
    if rule.keeps or not rule.uses_hessian:
        return [quantize_matrix(w, rule, c) for w, c in zip(weights, calibs)]
    results: list[torch.Tensor | None] = [None] * len(weights)
    shapes: dict[tuple, list[int]] = {}
    for index, weight in enumerate(weights):
        shapes.setdefault((tuple(weight.shape), weight.device), []).append(index)
    for indices in shapes.values():
        for i, q in zip(indices, _quantize_batch([weights[i] for i in indices], rule, [calibs[i] for i in indices])):
            results[i] = q
    return [r for r in results if r is not None]


def stacks_with(rule: Rule) -> bool:
    """Whether ``rule`` shares one GPTQ column loop with other such rules on a layer
    (:func:`quantize_rules`): plain GPTQ rounding, no AWQ scale (which changes the Hessian per rule)."""
    return rule.rounding == "gptq" and rule.gguf is None and not rule.keeps and rule.act_scale <= 0


def quantize_rules(weight: torch.Tensor, rules: Sequence[Rule], calib: LayerCalibration | None = None
                   ) -> list[torch.Tensor]:
    """The dequantized images of one ``[out, in]`` matrix under each of ``rules``: exactly what
    :func:`quantize_matrix` gives for each, bit for bit.

    Why: a menu's error table quantizes every layer under every rule (greedy's sensitivities), and
    GPTQ dominates it: per rule, an inverse-Hessian Cholesky (``[in, in]``, the same for every rule
    without an AWQ scale) and a column loop whose cost is its number of columns, not rows. Here the
    GPTQ rules of the list (:func:`stacks_with`) share the Cholesky and one column loop, each rule a
    segment of the batch (:func:`qenv.quant.gptq.gptq_segments`); the others go through :func:`quantize_matrices`.
    """
    out: list[torch.Tensor | None] = [None] * len(rules)
    stacked = [i for i, rule in enumerate(rules) if stacks_with(rule)]
    if len(stacked) < 2:
        stacked = []
    for i, rule in enumerate(rules):
        if i not in stacked:
            out[i] = quantize_matrices([weight], rule, [calib])[0]
    if stacked:
        if calib is None or calib.hessian is None:
            raise QenvError(f"Rule {rules[stacked[0]].label()} uses gptq rounding, which needs the layer's "
                            "calibration Hessian.")
        prepared = [_prepare(weight, rules[i], calib) for i in stacked]
        hinv = _gptq_hinv(prepared[0][4][None])
        per_loop = max(1, GPTQ_LOOP_ROWS // weight.shape[0])
        for first in range(0, len(stacked), per_loop):
            part = list(zip(stacked, prepared))[first:first + per_loop]
            ws = torch.stack([p[1] for _, p in part])
            keep = torch.stack([p[2] for _, p in part])
            segments = [(rules[i], p[3], k, k + 1) for k, (i, p) in enumerate(part)]
            images = gptq_segments(ws, keep, segments, hinv.expand(len(part), -1, -1))
            for (i, (w, _, k, _, _, _, _)), q in zip(part, images.unbind(0)):
                out[i] = torch.where(k, w.half().float(), q).to(weight.dtype)
    return [q for q in out if q is not None]


def _quantize_batch(weights: Sequence[torch.Tensor], rule: Rule,
                    calibs: Sequence[LayerCalibration | None]) -> list[torch.Tensor]:
    """Quantize matrices of one shape under a non-keep rule (GPTQ and learned rounding as one batch)."""
    if rule.uses_hessian:
        for calib in calibs:
            if calib is None or calib.hessian is None:
                raise QenvError(f"Rule {rule.label()} uses {rule.rounding} rounding, which needs the layer's "
                                "calibration Hessian.")
    prepared = [_prepare(w, rule, c) for w, c in zip(weights, calibs)]
    if rule.uses_hessian:
        ws = torch.stack([p[1] for p in prepared])
        keep = torch.stack([p[2] for p in prepared])
        hessian = torch.stack([p[4] for p in prepared])
        if rule.rounding == "learned":
            quantized = list(_learned(ws, keep, rule, prepared[0][3], hessian)[0].unbind(0))
        else:
            quantized = list(_gptq(ws, keep, rule, prepared[0][3], hessian).unbind(0))
    else:
        quantized = []
        for w, ws, keep, group, _, scale, calib in prepared:
            importance = None if calib is None or not rule.mse_clip else calib.hessian_diag.to(w.device).float()
            if importance is not None and scale is not None:
                importance = importance / scale.square()
            quantized.append(_fake_quant(ws, _choose_grid(ws, ~keep, rule, group, importance)))
    out = []
    for weight, (w, _, keep, _, _, scale, _), q in zip(weights, prepared, quantized):
        if scale is not None:
            q = q / scale[None, :]
        q = torch.where(keep, w.half().float(), q)
        out.append(q.to(weight.dtype))
    return out


def _prepare(weight: torch.Tensor, rule: Rule, calib: LayerCalibration | None) -> tuple:
    """Per-matrix set-up shared by both roundings: float32 weights, outlier mask, group size, the
    activation channel scale (AWQ-like) and the Hessian in the scaled coordinates."""
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise QenvError("The weight matrix holds NaN or inf values; it cannot be quantized.")
    out_f, in_f = w.shape
    group = in_f if rule.group_size == -1 else min(rule.group_size, in_f)
    keep = _outlier_mask(w, rule, calib)
    scale = _channel_scale(rule, calib, w.device)
    ws = w if scale is None else w * scale[None, :]
    hessian = None
    if rule.uses_hessian:
        assert calib is not None and calib.hessian is not None
        hessian = calib.hessian.to(w.device).float()
        if scale is not None:
            hessian = hessian / scale[None, :] / scale[:, None]
    return w, ws, keep, group, hessian, scale, calib


def gguf_encode(weight: torch.Tensor, rule: Rule, calib: LayerCalibration | None = None) -> tuple[str, "object"]:
    """``(type, bytes)``: llama.cpp's encoding of an ``[out, in]`` matrix under a GGUF rule.

    ``type`` is what llama-quantize writes for these rows (the rule's type, or its fallback when the
    row length is not a multiple of the type's block); ``bytes`` is the ``[out, row_bytes]`` uint8
    array from ``ggml_quantize_chunk``, with the calibration importance matrix when ``rule.imatrix``.
    """
    if rule.gguf is None:
        raise QenvError(f"Rule {rule.label()} is not a llama.cpp type.", "give the rule gguf='<type>'.")
    w = weight.detach().float().cpu()
    if not torch.isfinite(w).all():
        raise QenvError("The weight matrix holds NaN or inf values; it cannot be quantized.")
    qtype = _gguf.effective_type(rule.gguf, w.shape[1])
    imatrix = None
    if rule.imatrix:
        if calib is None:
            raise QenvError(f"Rule {rule.label()} uses an importance matrix but no calibration was given.")
        imatrix = _gguf.imatrix_from_rms(calib.act_rms)
    if qtype in _gguf.REQUIRES_IMATRIX and imatrix is None:  # cannot happen for a valid rule; ggml would abort
        raise QenvError(f"llama.cpp type {qtype} needs an importance matrix.")
    return qtype, _gguf.quantize_rows(w.numpy(), qtype, imatrix)


@dataclass(frozen=True)
class QuantCodes:
    """A layer's quantized form as integers: ``(codes - zero) * scale`` per group of ``group`` input
    channels is exactly the dequantized image :func:`quantize_matrix` gives (float32 arithmetic).

    ``codes`` is ``[out, in]`` in ``[0, 2**bits - 1]``; ``scale`` (fp16 values held in float32) and
    ``zero`` (whole numbers; ``2**(bits-1)`` for a symmetric rule) are ``[out, n_groups]``. Under an
    AWQ rule the codes are those of the matrix times ``channel_scale`` (``[in]``), and the image
    divides them by it again: a runtime folds ``1 / channel_scale`` into the op before the layer.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group: int
    bits: int
    channel_scale: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[out, in]`` image, computed as the quantizer computes it."""
        in_f = self.codes.shape[1]
        scale = _expand(self.scale, self.group, in_f)
        image = (self.codes.float() - _expand(self.zero, self.group, in_f)) * scale
        return image if self.channel_scale is None else image / self.channel_scale[None, :]


def quantize_codes(weight: torch.Tensor, rule: Rule, calib: LayerCalibration | None = None) -> QuantCodes:
    """The integer codes, scales and zero points behind ``quantize_matrix(weight, rule, calib)``, for
    exports that store integers (a packed checkpoint), from the same grids and the same rounding.

    Only rules whose image is ``(codes - zero) * scale`` (divided by an AWQ channel scale) have codes:
    no fp16 outliers (they replace codes) and no llama.cpp type.
    """
    if rule.keeps or rule.gguf is not None or rule.outlier_fraction > 0:
        raise QenvError(f"Rule {rule.label()} is not stored as integer codes with per-group scales.",
                        "use a rule without fp16 outliers or a llama.cpp type.")
    if rule.uses_hessian and (calib is None or calib.hessian is None):
        raise QenvError(f"Rule {rule.label()} uses {rule.rounding} rounding, which needs the layer's calibration Hessian.")
    w, ws, keep, group, hessian, channel, _ = _prepare(weight, rule, calib)
    out_f, in_f = w.shape
    maxq = 2**rule.bits - 1
    if rule.rounding == "learned":
        _, codes, scale, zero = (t[0] for t in _learned(ws[None], keep[None], rule, group, hessian[None]))
    elif rule.rounding == "gptq":
        grids: list[tuple[torch.Tensor, torch.Tensor]] = []
        image = _gptq(ws[None], keep[None], rule, group, hessian[None], grids)[0]
        scale = torch.cat([g[0][0] for g in grids], dim=1)
        zero = torch.cat([g[1][0] for g in grids], dim=1)
        codes = torch.round(image / _expand(scale, group, in_f)) + _expand(zero, group, in_f)
    else:
        importance = None if calib is None or not rule.mse_clip else calib.hessian_diag.to(w.device).float()
        if importance is not None and channel is not None:  # as _quantize_batch weighs the scaled matrix
            importance = importance / channel.square()
        grid = _choose_grid(ws, ~keep, rule, group, importance)
        codes = torch.clamp(torch.round(ws / grid.scale) + grid.zero, 0, maxq)
        scale, zero = grid.scale[:, ::group], grid.zero[:, ::group]
    return QuantCodes(codes.to(torch.int16), scale.contiguous(), zero.contiguous(), group, rule.bits, channel)


def quantize_matrix(weight: torch.Tensor, rule: Rule, calib: LayerCalibration | None = None) -> torch.Tensor:
    """The dequantized image of an ``[out, in]`` matrix under ``rule`` (same dtype and device)."""
    if rule.keeps:
        return weight.clone()
    if rule.gguf is not None:
        qtype, data = gguf_encode(weight, rule, calib)
        image = _gguf.dequantize_rows(data, qtype, weight.shape[1])
        return torch.from_numpy(image).to(device=weight.device, dtype=weight.dtype)
    return _quantize_batch([weight], rule, [calib])[0]
