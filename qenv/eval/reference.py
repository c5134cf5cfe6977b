"""The full-precision reference, computed once per (model, tokens) and cached on disk.

One forward pass over the calibration tokens yields everything that does not depend on a recipe:
the reference log-probabilities (for KL and top-1), each block's output hidden states (for dense
rewards), and each layer's input statistics (``rms(x)`` and ``XᵀX``, for activation-aware rules
and GPTQ). Layers that read the same input tensor (q/k/v, gate/up) share one Hessian.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qenv.cache_files import read_cache_file, write_cache_file
from qenv.memory import available_memory, hidden_size
from qenv.models.layers import LayerInfo, find_blocks, get_module
from qenv.quant.quantizer import LayerCalibration

#: Hessians of layers wider than this are not collected (GPTQ on them raises a clear error).
MAX_HESSIAN_DIM = 16384
# 2: Hessian sharing no longer matches freed addresses (v1 files may be wrong); 3: checksummed, hashed key
CACHE_VERSION = "3"


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
    from qenv.progress import progress_bar

    bar = progress_bar(len(batches), "reference pass (full-precision model)", "batch", leave=False,
                       show=True if progress else None)
    try:
        for ids in batches:
            logits = model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits
            logprobs.append(_log_softmax_chunked(logits[:, :-1]))
            stats.next_batch()
            bar.update(1)
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    calibration = stats.close()
    return Reference(logprobs, outputs if keep_block_outputs else None, calibration)


def reference_bytes(model: nn.Module, layers: list[LayerInfo], n_sequences: int, seq_len: int) -> int:
    """The size of the reference of ``n_sequences`` x ``seq_len`` tokens, estimated before computing
    it: float32 log-probabilities at every scored position (``vocab`` each: the bulk), every block's
    output hidden states, and the layers' input statistics (one ``XᵀX`` per layer at most)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = int(output.weight.shape[0]) if output is not None else 0
    _, blocks = find_blocks(model)
    param = next(model.parameters())
    hidden = hidden_size(model)
    logprobs = n_sequences * (seq_len - 1) * vocab * 4
    block_outputs = len(blocks) * n_sequences * seq_len * hidden * param.element_size()
    stats = sum(4 * (info.in_features + (info.in_features ** 2 if info.in_features <= MAX_HESSIAN_DIM else 0))
                for info in layers if info.kind != "embed")
    return logprobs + block_outputs + stats


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_reference_fits(model: nn.Module, layers: list[LayerInfo], n_sequences: int, seq_len: int,
                         cache_dir: Path | None) -> int:
    """Refuse, before any token is sampled or any batch is run, a token set whose reference cannot
    fit the device's free memory (it is held whole) or the cache folder's free disk (it is written
    whole after the pass). Returns the estimate in bytes."""
    from qenv.errors import QenvError

    need = reference_bytes(model, layers, n_sequences, seq_len)
    per_sequence = max(1, reference_bytes(model, layers, 1, seq_len) - reference_bytes(model, layers, 0, seq_len))
    device = next(model.parameters()).device
    where = None
    free = available_memory(device)
    if free is not None and need > free:
        where = f"more than the {_gib(free)} of memory free on {device}"
    elif cache_dir is not None:
        probe = Path(cache_dir)
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        try:
            disk = shutil.disk_usage(probe).free
        except OSError:
            disk = None
        if disk is not None and need > disk:
            where = f"more than the {_gib(disk)} free on the disk of the cache folder {cache_dir}"
            free = disk
    if where is None:
        return need
    fits = max(0, (int(free * 0.8) - (need - per_sequence * n_sequences)) // per_sequence) * seq_len
    raise QenvError(f"The full-precision reference of {n_sequences * seq_len} tokens needs about "
                    f"{_gib(need)} (log-probabilities over the whole vocabulary at each token, and every block's "
                    f"outputs), {where}.",
                    f"ask for fewer tokens (n_tokens / --n-tokens): about {fits} fit here.")


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


def _cache_file(cache_dir: Path, key: str, model_key: str) -> Path:
    """The reference's file: a readable prefix (the model's fingerprint) and a hash of the whole
    key. The key itself (one entry per batch among others) is unbounded, and a file name is not:
    it is stored in the file's header instead, and checked on reading."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return cache_dir / f"reference-v{CACHE_VERSION}-{model_key[:16]}-{digest}.safetensors"


def reference_tensors(ref: Reference) -> dict[str, torch.Tensor]:
    """The reference as named tensors, as it is cached."""
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
    return tensors


def check_reference(tensors: dict[str, torch.Tensor], batches: list[torch.Tensor], n_blocks: int,
                    vocab: int | None) -> str | None:
    """Cheap checks that cached reference tensors fit these batches: every batch's log-probs of the
    right shape, finite and normalised (a zero-filled or bit-flipped file fails), block outputs and
    layer statistics finite, Hessians square with a non-negative diagonal."""
    for b, ids in enumerate(batches):
        lp = tensors.get(f"logprobs.{b}")
        if lp is None:
            return f"batch {b}'s log-probabilities are missing"
        rows, length = int(ids.shape[0]), int(ids.shape[1])
        if lp.dim() != 3 or tuple(lp.shape[:2]) != (rows, length - 1) or (vocab is not None and lp.shape[2] != vocab):
            return f"batch {b}'s log-probabilities are {tuple(lp.shape)}, not ({rows}, {length - 1}, {vocab})"
        if lp.numel() and not bool(torch.isfinite(lp).all()):
            return f"batch {b}'s log-probabilities hold NaN or infinite values"
        if lp.numel() and float(torch.logsumexp(lp.float(), dim=-1).abs().max()) > 1e-3:
            return f"batch {b}'s log-probabilities do not sum to one"
    if "block.0.0" in tensors:
        for i in range(n_blocks):
            for b, ids in enumerate(batches):
                h = tensors.get(f"block.{i}.{b}")
                if h is None or h.dim() != 3 or tuple(h.shape[:2]) != tuple(ids.shape):
                    return f"block {i}'s output for batch {b} is missing or misshapen"
                if not bool(torch.isfinite(h).all()):
                    return f"block {i}'s output for batch {b} holds NaN or infinite values"
    for key, value in tensors.items():
        if key.startswith("rms."):
            if value.dim() != 1 or not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
                return f"the input statistics of {key[4:]} are malformed or not finite"
            hessian = tensors.get("hessian." + key[4:])
            if hessian is not None and (tuple(hessian.shape) != (value.shape[0],) * 2
                                        or not bool(torch.isfinite(hessian).all())
                                        or bool((hessian.diagonal() < 0).any())):
                return f"the Hessian of {key[4:]} is malformed, not finite or has a negative diagonal"
    return None


def save_reference(path: Path, ref: Reference, key: str = "") -> None:
    write_cache_file(path, reference_tensors(ref), key)


def reference_from_tensors(data: dict[str, torch.Tensor], n_batches: int, n_blocks: int,
                           device: torch.device) -> Reference:
    data = {k: v.to(device) for k, v in data.items()}
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
    """``compute_reference``, read from / written to ``cache_dir`` when one is given.

    The cache key holds everything the reference depends on: the model, the layers hooked, the
    tokens, their split into batches and :func:`numerics_key`. A cached file that fails its
    checksum or :func:`check_reference` is recomputed (:mod:`qenv.cache_files`)."""
    n_blocks = len(find_blocks(model)[1])
    device = next(model.parameters()).device
    layers_key = hashlib.sha1("|".join(info.name for info in layers).encode()).hexdigest()[:8]
    path = key = None
    if cache_dir is not None:
        key = (f"reference-v{CACHE_VERSION}|model={model_key}|layers={layers_key}|tokens={tokens_key}"
               f"|batches={batching_key(batches)}|numerics={numerics_key(device)}")
        path = _cache_file(Path(cache_dir), key, model_key)
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        vocab = int(output.weight.shape[0]) if output is not None else None
        cached = read_cache_file(path, key, lambda t: check_reference(t, batches, n_blocks, vocab))
        if cached is not None:
            return reference_from_tensors(cached, len(batches), n_blocks, device)
    ref = compute_reference(model, layers, batches, progress=progress)
    if path is not None and key is not None:
        save_reference(path, ref, key)
    return ref
