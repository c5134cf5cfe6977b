"""The full-precision reference, computed once per (model, tokens) and cached on disk.

One forward pass over the calibration tokens yields everything that does not depend on a recipe:
the reference log-probabilities (for KL and top-1), each block's output hidden states (for dense
rewards), and each layer's input statistics (``rms(x)`` and ``XᵀX``, for activation-aware rules
and GPTQ). Layers that read the same input tensor (q/k/v, gate/up) share one Hessian.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from qenv.io import atomic_path
from qenv.models.layers import LayerInfo, find_blocks, get_module
from qenv.quant.quantizer import LayerCalibration

#: Hessians of layers wider than this are not collected (GPTQ on them raises a clear error).
MAX_HESSIAN_DIM = 16384
CACHE_VERSION = "2"  # 2: Hessian sharing no longer matches freed addresses (v1 files may be wrong)


def default_cache_dir() -> Path:
    return Path(os.environ.get("QENV_CACHE_DIR", Path.home() / ".cache" / "qenv"))


def resolve_cache_dir(cache_dir: str | Path | None | bool) -> Path | None:
    """``None`` means the default cache folder ($QENV_CACHE_DIR or ~/.cache/qenv); ``False`` disables caching."""
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        return default_cache_dir()
    return Path(cache_dir)


@dataclass
class Reference:
    """Recipe-independent outputs of the full-precision model, one entry per token batch."""

    logprobs: list[torch.Tensor]  # [B, T-1, V] float32 log-softmax at positions predicting a token
    block_outputs: list[list[torch.Tensor]] | None  # [block][batch] -> [B, T, d]
    calibration: dict[str, LayerCalibration]


class _StatsCollector:
    """Forward hooks that accumulate ``XᵀX`` and ``Σx²`` of each targeted layer's input."""

    def __init__(self, model: nn.Module, layers: list[LayerInfo]) -> None:
        self.owner: dict[str, str] = {}
        self.hessian: dict[str, torch.Tensor] = {}
        self.sumsq: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        # The input seen by the previous hook and its owner, held alive so that its address cannot be
        # reused by a later tensor: matching freed addresses made unrelated layers share a Hessian.
        self._last: tuple[torch.Tensor, str] | None = None
        self._first_batch = True
        self.handles = []
        for info in layers:
            if info.kind == "embed":
                continue
            module = get_module(model, info.name)
            self.handles.append(module.register_forward_hook(self._hook(info)))

    def _hook(self, info: LayerInfo):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0]
            if self._first_batch:
                last = self._last
                same = last is not None and (last[0] is x or (
                    last[0].data_ptr() == x.data_ptr() and last[0].shape == x.shape
                    and last[0].stride() == x.stride()))
                self.owner[info.name] = last[1] if same else info.name
                self._last = (x, self.owner[info.name])
            if self.owner.get(info.name) != info.name:
                return
            rows = x.reshape(-1, x.shape[-1]).float()
            name = info.name
            if name not in self.sumsq:
                self.sumsq[name] = torch.zeros(rows.shape[1], device=rows.device)
                self.rows[name] = 0
                if rows.shape[1] <= MAX_HESSIAN_DIM:
                    self.hessian[name] = torch.zeros(rows.shape[1], rows.shape[1], device=rows.device)
            self.sumsq[name] += rows.square().sum(0)
            self.rows[name] += rows.shape[0]
            if name in self.hessian:
                self.hessian[name].addmm_(rows.T, rows)

        return hook

    def next_batch(self) -> None:
        self._first_batch = False
        self._last = None

    def close(self) -> dict[str, LayerCalibration]:
        for handle in self.handles:
            handle.remove()
        shared: dict[str, LayerCalibration] = {}
        for owner in set(self.owner.values()):
            n = max(self.rows[owner], 1)
            hessian = self.hessian.get(owner)
            shared[owner] = LayerCalibration(
                act_rms=(self.sumsq[owner] / n).sqrt(), hessian=None if hessian is None else hessian.div_(n)
            )
        return {name: shared[owner] for name, owner in self.owner.items()}


def _log_softmax_chunked(logits: torch.Tensor, chunk_bytes: int | None = None) -> torch.Tensor:
    """float32 log-softmax over the last dimension, converting ``chunk_bytes`` of rows at a time
    (the stored result is float32; the temporaries stay bounded for a large vocabulary)."""
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    out = torch.empty(rows.shape, dtype=torch.float32, device=logits.device)
    if chunk_bytes is None:
        chunk_bytes = (256 << 20) if logits.device.type == "cuda" else (4 << 20)
    step = max(1, chunk_bytes // (4 * vocab))
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = torch.log_softmax(rows[start:start + step].float(), dim=-1)
    return out.view(*logits.shape[:-1], vocab)


@torch.inference_mode()
def compute_reference(model: nn.Module, layers: list[LayerInfo], batches: list[torch.Tensor],
                      keep_block_outputs: bool = True, progress: bool = False) -> Reference:
    """One full-precision pass: reference log-probs, block outputs and layer statistics."""
    _, blocks = find_blocks(model)
    stats = _StatsCollector(model, layers)
    outputs: list[list[torch.Tensor]] = [[] for _ in blocks]
    handles = []
    if keep_block_outputs:
        for i, block in enumerate(blocks):
            def keep(module: nn.Module, inputs: object, out: object, i: int = i) -> None:
                outputs[i].append((out[0] if isinstance(out, tuple) else out).detach().clone())
            handles.append(block.register_forward_hook(keep))
    logprobs = []
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="reference pass", unit="batch", leave=False)
    try:
        for ids in iterator:
            logits = model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits
            logprobs.append(_log_softmax_chunked(logits[:, :-1]))
            stats.next_batch()
    finally:
        for handle in handles:
            handle.remove()
    calibration = stats.close()
    return Reference(logprobs, outputs if keep_block_outputs else None, calibration)


def numerics_key(device: torch.device | str | None = None) -> str:
    """What changes float results on one machine besides the inputs: torch's CPU thread count
    (intra-op reductions split their sums by thread: the reference KL of the default model is
    1.3228236034 with one thread and 1.3228236772 with two), torch's version and the device.
    Caches of measured numbers are keyed on it, so that a cache written by a process with other
    threads is never read: the same command gave bit-identical runs within one set-up and
    different RL runs across set-ups."""
    return f"t{torch.get_num_threads()}-torch{torch.__version__}-{device}"


def batching_key(batches: list[torch.Tensor]) -> str:
    """How the tokens are split into batches: cached per-batch tensors are only valid for the same split."""
    return "x".join(str(int(b.shape[0])) for b in batches)


def _cache_file(cache_dir: Path, model_key: str, tokens_key: str) -> Path:
    return cache_dir / f"reference-v{CACHE_VERSION}-{model_key}-{tokens_key}.safetensors"


def save_reference(path: Path, ref: Reference) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for b, lp in enumerate(ref.logprobs):
        tensors[f"logprobs.{b}"] = lp
    if ref.block_outputs is not None:
        for i, per_block in enumerate(ref.block_outputs):
            for b, h in enumerate(per_block):
                tensors[f"block.{i}.{b}"] = h
    for name, cal in ref.calibration.items():
        tensors[f"rms.{name}"] = cal.act_rms
        if cal.hessian is not None:
            tensors[f"hessian.{name}"] = cal.hessian
    seen: set[int] = set()
    for key, value in list(tensors.items()):  # safetensors refuses shared storage: store copies
        if id(value) in seen:
            tensors[key] = value.clone()
        seen.add(id(value))
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def load_reference(path: Path, n_batches: int, n_blocks: int, device: torch.device) -> Reference:
    data = load_file(str(path), device=str(device))
    logprobs = [data[f"logprobs.{b}"] for b in range(n_batches)]
    block_outputs = None
    if "block.0.0" in data:
        block_outputs = [[data[f"block.{i}.{b}"] for b in range(n_batches)] for i in range(n_blocks)]
    calibration = {}
    for key, rms in data.items():
        if key.startswith("rms."):
            name = key[len("rms."):]
            calibration[name] = LayerCalibration(rms, data.get(f"hessian.{name}"))
    return Reference(logprobs, block_outputs, calibration)


def cached_reference(model: nn.Module, layers: list[LayerInfo], batches: list[torch.Tensor], model_key: str,
                     tokens_key: str, cache_dir: Path | None, progress: bool = False) -> Reference:
    """``compute_reference``, read from / written to ``cache_dir`` when one is given."""
    n_blocks = len(find_blocks(model)[1])
    device = next(model.parameters()).device
    layers_key = hashlib.sha1("|".join(info.name for info in layers).encode()).hexdigest()[:8]
    if cache_dir is not None:
        numerics = hashlib.sha1(numerics_key(device).encode()).hexdigest()[:8]
        path = _cache_file(Path(cache_dir), model_key + "-" + layers_key,
                           tokens_key + "-b" + batching_key(batches) + "-n" + numerics)
        if path.is_file():
            try:
                return load_reference(path, len(batches), n_blocks, device)
            except (KeyError, OSError, RuntimeError, ValueError, SafetensorError):
                path.unlink(missing_ok=True)  # stale or damaged: recompute
    ref = compute_reference(model, layers, batches, progress=progress)
    if cache_dir is not None:
        save_reference(path, ref)
    return ref
