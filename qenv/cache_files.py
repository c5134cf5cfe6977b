"""One on-disk format for every cache file, checked before it is used.

A cache file is input like any other: a power cut can leave it zero-filled, a disk can flip its
bits, another program (or person) can write to it. Whatever qenv caches (references, sampled
tokens, observation features, per-rule errors) is therefore written by :func:`write_cache_file`
and read by :func:`read_cache_file`, which trust nothing they did not check:

- the file is a safetensors file whose header carries the full cache key (what it was computed
  from; the file name only holds a hash of it) and a SHA-256 of every tensor's name, dtype, shape
  and bytes, verified on every read;
- the caller's semantic check (shapes, finiteness, token ids below the vocabulary, ...) passes.

A file that fails any check is removed, a :class:`CacheWarning` says so once, and the caller
recomputes it (a file with no checksum at all, written by a qenv before checksums, is stale: it is
recomputed without a warning): a damaged cache costs time, never a wrong number or a misleading error. Files are
written whole and durably (:func:`qenv.io.atomic_path` syncs the data and the folder before and
after its rename).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qenv.io import atomic_path

#: header metadata entries of a cache file
KEY_FIELD = "qenv.key"
DIGEST_FIELD = "qenv.sha256"

#: a semantic check: ``None`` when the tensors are usable, else what is wrong with them
Check = Callable[[dict[str, torch.Tensor]], "str | None"]


class CacheWarning(UserWarning):
    """A cache file was damaged or stale and is being recomputed."""


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (in name order): any flipped bit,
    zeroed page or truncated payload changes it."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def write_cache_file(path: Path, tensors: dict[str, torch.Tensor], key: str) -> None:
    """Write ``tensors`` to ``path`` with ``key`` and their checksum in the header, whole or not at all."""
    from safetensors.torch import save_file

    cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp), metadata={KEY_FIELD: key, DIGEST_FIELD: tensors_digest(cpu)})


def read_cache_file(path: Path | None, key: str, check: Check | None = None) -> dict[str, torch.Tensor] | None:
    """The tensors cached at ``path`` (on the CPU), or ``None`` when there is no usable file.

    A file that cannot be read, was written for another key, fails its checksum or ``check`` is
    deleted with one :class:`CacheWarning` naming the problem; the caller then recomputes it.
    """
    if path is None or not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    problem: str | None = None
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    except (OSError, ValueError, RuntimeError, SafetensorError, MemoryError) as exc:
        problem = f"it cannot be read ({type(exc).__name__}: {str(exc)[:120]})"
    else:
        if DIGEST_FIELD not in metadata:  # written by a qenv before checksums: stale, not damaged
            path.unlink(missing_ok=True)
            return None
        if metadata.get(KEY_FIELD) != key:
            problem = "it was written for other inputs than its name says"
        elif tensors_digest(tensors) != metadata[DIGEST_FIELD]:
            problem = "its checksum does not match its contents"
        elif check is not None:
            try:
                problem = check(tensors)
            except (KeyError, IndexError, ValueError, RuntimeError, TypeError) as exc:
                problem = f"its contents are malformed ({type(exc).__name__}: {exc})"
    if problem is None:
        return tensors
    warnings.warn(f"The cache file {path} is damaged: {problem}. It is removed and recomputed.",
                  CacheWarning, stacklevel=2)
    path.unlink(missing_ok=True)
    return None


# -- semantic checks, shared by the callers -------------------------------------------------------------
def check_table(tensors: dict[str, torch.Tensor], shape: tuple[int, ...], nonnegative: bool = False) -> str | None:
    """A per-layer table (features, per-rule errors) stored as ``table``: its shape, finite values."""
    table = tensors.get("table")
    if table is None:
        return "it holds no table"
    if tuple(table.shape) != shape:
        return f"its table is {tuple(table.shape)}, not {shape}"
    if not bool(torch.isfinite(table).all()):
        return "its table holds NaN or infinite values"
    if nonnegative and bool((table < 0).any()):
        return "its table holds negative errors"
    return None


def check_token_ids(ids: torch.Tensor | None, shape: tuple[int, ...], vocab: int) -> str | None:
    """Token ids: integers of ``shape``, each in ``[0, vocab)``."""
    if ids is None:
        return "it holds no token ids"
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        return f"its token ids are {ids.dtype}, not integers"
    if tuple(ids.shape) != shape:
        return f"its token ids are {tuple(ids.shape)}, not {shape}"
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        return (f"its token ids span [{int(ids.min())}, {int(ids.max())}], outside the model's vocabulary "
                f"[0, {vocab})")
    return None


# -- per-layer tables (features, per-rule errors) --------------------------------------------------------
def read_table(path: Path | None, shape: tuple[int, ...], nonnegative: bool = False) -> np.ndarray | None:
    """A per-layer table cached at ``path`` (keyed by its name, which hashes its inputs) if it is
    there, intact, of ``shape`` and finite; else ``None``, to be recomputed."""
    cached = read_cache_file(path, "" if path is None else path.name,
                             lambda t: check_table(t, shape, nonnegative=nonnegative))
    return None if cached is None else cached["table"].numpy()


def write_table(path: Path | None, table: np.ndarray) -> None:
    """Cache a per-layer table at ``path`` (nothing when ``path`` is None)."""
    if path is not None:
        write_cache_file(path, {"table": torch.from_numpy(np.ascontiguousarray(table))}, path.name)
