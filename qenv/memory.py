"""Memory that fits the model: how big qenv's in-memory caches are, and waiting for a shared GPU.

A 135M-parameter model held 7-10 GB per process when its caches were sized as a share of the free
memory (issue 26): eleven such processes on one H100 ran out of memory. Here the caches are sized
from the model instead, and a process that finds the GPU full waits for it (bounded), then runs
smaller batches, rather than dying with an out-of-memory error in the middle of its work.

- :func:`available_memory`: free bytes on a device (the GPU's free memory, the host's MemAvailable).
- :func:`weight_cache_bytes`: the quantized-weight cache's default, a few recipes of this model's
  quantized layers (the whole menu when it is prebuilt), never more than a share of what is free.
- :func:`prefix_cache_bytes`: the streaming evaluator's cache of block outputs, a few episodes'
  worth of this model's hidden states on these tokens.
- :func:`check_cache_fits`: a size the user asked for that is larger than the free memory is refused.
- :func:`wait_for_memory` / :func:`fit_batch_size`: the gate before batches and workers start.

This module sits below every other layer (it imports only torch and :mod:`qenv.errors`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qenv.errors import QenvError

#: quantized recipes the weight cache holds when nothing else is asked for: the recipe being scored,
#: the best start and the few neighbours a search moves between (a layer's weight under one rule is
#: quantized again only after four other rules of it were used since)
CACHED_RECIPES = 4
#: episodes of block outputs the prefix cache holds: enough for a search's or a policy's neighbouring
#: recipes to share their common first blocks
CACHED_PREFIX_EPISODES = 4
#: the most of the free memory any one cache may take by default (GPU, host), however big the model
CACHE_SHARE_GPU = 0.5
CACHE_SHARE_CPU = 0.25
#: how long a process waits for GPU memory held by other processes before it shrinks its batches;
#: ``QENV_GPU_WAIT_S`` overrides it (0: do not wait)
GPU_WAIT_S = 300.0
GPU_POLL_S = 2.0


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (the GPU's free memory; on the CPU, the kernel's
    MemAvailable); ``None`` when it cannot be told."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    """``n`` bytes in GiB, for messages (``MiB`` below one GiB: a tiny model's caches are small)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _share(device: torch.device) -> float:
    return CACHE_SHARE_GPU if device.type == "cuda" else CACHE_SHARE_CPU


def weight_cache_bytes(recipe_bytes: int, n_rules: int, device: torch.device, *, whole_menu_bytes: int = 0,
                       free: int | None = None) -> int:
    """The quantized-weight cache's size when the user does not set it.

    ``recipe_bytes`` is one recipe of this model's quantized layers (every targeted layer's weight
    in the model's dtype: what the cache stores per rule); ``n_rules`` the menu's quantizing rules.
    The cache holds :data:`CACHED_RECIPES` recipes (fewer when the menu is shorter), or
    ``whole_menu_bytes`` when the menu is prebuilt (a GPU's episodes then only swap tensors), but
    never more than a share of the ``free`` memory (default: what is free on ``device`` now). Less
    than one recipe, which every evaluation needs, is refused by ``QuantizedWeights``.
    """
    want = whole_menu_bytes or recipe_bytes * max(1, min(int(n_rules), CACHED_RECIPES))
    free = available_memory(device) if free is None else free
    return int(want) if free is None else min(int(want), int(free * _share(device)))


def prefix_cache_bytes(state_bytes: int, n_blocks: int, device: torch.device, *, free: int | None = None) -> int:
    """The streaming evaluator's block-output cache when not set: :data:`CACHED_PREFIX_EPISODES`
    episodes of this model on these tokens (``state_bytes``: one block's output hidden states over
    every calibration token; an episode streams ``n_blocks`` of them), within a share of the free
    memory. It was a fixed 1 GiB: 4% of it for a 3M model, and a few prefixes for a 7B one."""
    want = int(state_bytes) * max(1, int(n_blocks)) * CACHED_PREFIX_EPISODES
    free = available_memory(device) if free is None else free
    return want if free is None else min(want, int(free * _share(device) / 2))


def check_cache_fits(size_gib: float, device: torch.device | str, flag: str = "--weight-cache-gib") -> None:
    """Refuse a cache size larger than the memory free on ``device`` now (the host's available RAM,
    or the GPU's free memory): the cache would fill it and the run would die late, out of memory."""
    where = torch.device(device)
    free = available_memory(where)
    if free is not None and size_gib * 2**30 > free:
        what = "GPU memory free on " + str(where) if where.type == "cuda" else "RAM available on this machine"
        raise QenvError(f"{flag}={size_gib:g} is more than the {free / 2**30:.2f} GiB of {what}.",
                        f"pass {flag} at most {max(free / 2**30 * 0.9, 0.01):.2f}, or leave it out to size the "
                        "cache from the model.")


def held_by_others(device: torch.device) -> int:
    """GPU memory in use but not by this process's torch allocator: what other processes (or other
    libraries here) hold, which may be freed while this one waits."""
    try:
        free, total = torch.cuda.mem_get_info(device)
        own = torch.cuda.memory_reserved(device)
    except (RuntimeError, AssertionError):
        return 0
    return max(0, int(total) - int(free) - int(own))


def gpu_wait_seconds() -> float:
    """How long to wait for GPU memory: ``QENV_GPU_WAIT_S`` when set (seconds, 0: never wait)."""
    raw = os.environ.get("QENV_GPU_WAIT_S", "")
    try:
        return max(0.0, float(raw)) if raw.strip() else GPU_WAIT_S
    except ValueError:
        raise QenvError(f"QENV_GPU_WAIT_S={raw!r} is not a number of seconds.",
                        "set it to e.g. 300, or 0 not to wait for GPU memory.") from None


def wait_for_memory(need: int, device: torch.device, *, what: str, timeout_s: float | None = None,
                    poll_s: float = GPU_POLL_S, note: Callable[[str], None] = print) -> bool:
    """Wait until ``need`` bytes are free on the GPU ``device`` (other processes finish or shrink);
    ``True`` once they are, ``False`` after ``timeout_s`` (default :func:`gpu_wait_seconds`), or at
    once when even the memory other processes hold would not make room (:func:`held_by_others`). One
    ``note`` line when it starts waiting, one when it stops, so a queued process says why it is
    idle. On a CPU it returns at once: the host's memory is not shared out by this gate."""
    if device.type != "cuda":
        return True
    free = available_memory(device)
    if free is None or free >= need:
        return True
    limit = gpu_wait_seconds() if timeout_s is None else max(0.0, float(timeout_s))
    if limit <= 0 or free + held_by_others(device) < need:  # waiting cannot help: the GPU is too small
        return False
    note(f"waiting for GPU memory: {what} needs about {gib(need)}, {gib(free)} free on {device} (other "
         f"processes hold the rest); waiting up to {limit:.0f} s")
    start = time.monotonic()
    while time.monotonic() - start < limit:
        time.sleep(min(poll_s, max(0.0, limit - (time.monotonic() - start))))
        free = available_memory(device)
        if free is not None and free >= need:
            note(f"GPU memory free after {time.monotonic() - start:.0f} s: {gib(free)}; starting {what}")
            return True
    note(f"GPU memory still short after {limit:.0f} s ({gib(free or 0)} free of {gib(need)})")
    return False


def fit_batch_size(batch_size: int, fixed_bytes: int, per_sequence_bytes: int, device: torch.device, *,
                   what: str = "the evaluation", timeout_s: float | None = None, poll_s: float = GPU_POLL_S,
                   note: Callable[[str], None] = print) -> int:
    """The batch size to run on a shared GPU: ``batch_size`` once ``fixed_bytes`` (held whatever the
    batch) and ``batch_size`` sequences of ``per_sequence_bytes`` fit the free memory, after waiting
    for them (:func:`wait_for_memory`); if they still do not, the largest batch that fits now (at
    least 1), with a note. Results do not depend on the batch size beyond float noise; its memory
    does. On a CPU, ``batch_size`` as given."""
    if device.type != "cuda" or batch_size <= 1 and per_sequence_bytes <= 0:
        return batch_size
    need = fixed_bytes + batch_size * per_sequence_bytes
    if wait_for_memory(need, device, what=what, timeout_s=timeout_s, poll_s=poll_s, note=note):
        return batch_size
    free = available_memory(device) or 0
    fits = max(1, min(batch_size, (free - fixed_bytes) // max(per_sequence_bytes, 1)))
    if fits < batch_size:
        note(f"running {what} in batches of {fits} sequences instead of {batch_size} to fit the free GPU memory")
    return int(fits)


def hidden_size(model: torch.nn.Module) -> int:
    """The width of the model's hidden states (its input embedding's; else the config's)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None and getattr(embed, "weight", None) is not None:
        return int(embed.weight.shape[-1])
    config = getattr(model, "config", None)
    return int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)


def forward_bytes_per_sequence(model: torch.nn.Module, seq_len: int) -> int:
    """Rough working memory of one sequence's forward pass and scoring: its logits in the model's
    dtype and in float32 (log-probabilities), and a few hidden-state-sized activations of one block
    at a time (no key-value cache: ``use_cache=False``)."""
    config = getattr(model, "config", None)
    hidden = hidden_size(model)
    inner = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = int(output.weight.shape[0]) if output is not None else int(getattr(config, "vocab_size", 0) or 0)
    param = next(model.parameters())
    size = param.element_size()
    return int(seq_len * (vocab * (size + 8) + 8 * max(hidden, inner) * size))


__all__ = ["CACHED_PREFIX_EPISODES", "CACHED_RECIPES", "available_memory", "check_cache_fits", "fit_batch_size",
           "forward_bytes_per_sequence", "gpu_wait_seconds", "hidden_size", "prefix_cache_bytes", "wait_for_memory",
           "weight_cache_bytes"]
