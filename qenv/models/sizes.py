"""Declared sizes against what a file holds: a model file (GGUF, a transformers folder) is checked
before any weight is allocated, so a small file that declares a huge model is refused at once.
Both loaders use it (:mod:`qenv.models.gguf`, :mod:`qenv.models.loading`)."""

from __future__ import annotations

from typing import Any

import torch

from qenv.errors import QenvError


def check_declared_size(what: str, config: Any, held: list[int], dtype: torch.dtype, fix: str) -> None:
    """Refuse a model whose config declares more parameters than its weight files hold, before any
    weight is allocated: the model is built on the ``meta`` device (shapes only) and its parameter
    count compared with ``held``, the element counts of the file's tensors (from their headers). An
    untied output layer may reuse the embedding's tensor: one tensor's worth of slack is allowed."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        probe = AutoModelForCausalLM.from_config(config, dtype=dtype)
    declared = sum(p.numel() for p in probe.parameters())  # shared (tied) weights once
    del probe
    if declared > sum(held) + max(held, default=0):
        need = declared * torch.empty((), dtype=dtype).element_size()
        raise QenvError(f"{what} declares a model of {declared:,} parameters ({need / 2**30:,.1f} GiB as "
                        f"{str(dtype).replace('torch.', '')}), but its tensors hold {sum(held):,}; it is not built.",
                        fix)
