"""Run a causal LM one decoder block at a time, for any architecture.

The streaming evaluator needs three things no transformers API offers: the exact arguments the
model passes to its first block (position embeddings, masks, ...), a way to call one block on
given hidden states, and a way to turn final hidden states into logits. They are obtained
generically: a pre-hook records block 0's call, blocks are called with the recorded arguments
(the same for every block, as GPTQ implementations do), and the head is run by a full forward in
which every block is temporarily replaced by a pass-through that hands over the given states.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class _Captured(Exception):
    """Raised inside the forward pass once block 0's inputs are recorded, to skip the rest."""


@dataclass
class BlockCall:
    """The positional (after hidden states) and keyword arguments a model passes to its blocks."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _split_hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, BlockCall]:
    kwargs = dict(kwargs)
    if args:
        return args[0], BlockCall(tuple(args[1:]), kwargs)
    return kwargs.pop("hidden_states"), BlockCall((), kwargs)


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor) -> tuple[torch.Tensor, BlockCall]:
    """The hidden states entering block 0 for ``input_ids`` and the call every block receives."""
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["value"] = _split_hidden(args, kwargs)
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured["value"]


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


def block_returns_tuple(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> bool:
    """Whether this architecture's blocks return a tuple (older transformers) or a tensor."""
    return isinstance(block(hidden, *call.args, **call.kwargs), tuple)


@contextmanager
def _blocks_replaced(blocks: nn.ModuleList, final: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    def passthrough(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if as_tuple else hidden

    def hand_over(*args: Any, **kwargs: Any) -> Any:
        return (final,) if as_tuple else final

    for block in blocks:
        block.forward = passthrough
    blocks[len(blocks) - 1].forward = hand_over
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # falls back to the class's forward


def run_head(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, final_hidden: torch.Tensor,
             as_tuple: bool) -> torch.Tensor:
    """Logits from the hidden states leaving the last block (final norm and lm_head applied)."""
    with _blocks_replaced(blocks, final_hidden, as_tuple):
        return model(input_ids=input_ids, use_cache=False).logits
