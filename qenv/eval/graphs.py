"""Decoder blocks replayed as CUDA graphs, with each episode's quantized weights copied in.

Why: on a GPU a small model's block is a few dozen short kernels, and launching them from
Python costs more host time than the GPU spends running them. An episode on SmolLM2-135M (210
layers, 30 blocks) runs the env's Python between blocks on the same host thread, so the launch
time and the env's time add up (BENCHMARKS.md, "Where a warm SmolLM2 episode's time goes"). A
captured block is one launch; its kernels then run while the env's Python goes on.

How: a graph reads fixed addresses, so each graphed block gets its own weight buffers, and the
rules' quantized weights (from the weight cache) are copied into them before a replay: one copy
kernel per layer. The block's input is copied into the graph's input buffer and its output is
cloned out (the prefix cache keeps it). Blocks whose layers need forward hooks (GGUF rules round
their activations) run eagerly, as does everything on a CPU.

Every graph is checked once, when it is captured, against the same block run eagerly with the
same weights. A difference beyond the last bits (1e-5 of the output's largest value in float32,
1e-2 in 16-bit types), or a block that cannot be captured (a host sync inside its forward, say),
turns graphs off for the evaluator with one warning, and the eager path goes on. Set
``QENV_CUDA_GRAPHS=0`` to never use them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from qenv.eval.blocks import BlockCall, run_block

ENV_SWITCH = "QENV_CUDA_GRAPHS"


def graphs_wanted(device: torch.device) -> bool:
    """Graphs by default on CUDA devices, unless ``QENV_CUDA_GRAPHS=0``."""
    return device.type == "cuda" and os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


class _Graph:
    """One captured block for one input shape and one call's arguments."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static_in: torch.Tensor, static_out: torch.Tensor,
                 call: BlockCall) -> None:
        self.graph = graph
        self.static_in = static_in
        self.static_out = static_out
        self.call = call  # held: the graph reads its tensors (masks, position embeddings) by address


class BlockGraphs:
    """The CUDA graphs of one model's blocks (see the module docstring)."""

    def __init__(self, blocks: nn.ModuleList, params: dict[str, nn.Parameter], block_layers: dict[int, list[str]]) -> None:
        self.blocks = blocks
        self.params = params
        self.block_layers = block_layers
        self.enabled = True
        self.replays = 0
        self.captures = 0
        self.max_rel_diff = 0.0  # the largest difference from the eager block seen at capture (0: identical)
        self._graphs: dict[tuple[int, int, tuple[int, ...]], _Graph] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._pool = None
        self._loaded: dict[str, torch.Tensor] = {}  # layer -> the cached tensor its buffer holds now

    def _buffer(self, name: str) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = torch.empty_like(self.params[name].data)
        return buf

    def _load(self, block: int, weights: dict[str, torch.Tensor]) -> None:
        """Copy the block's weights into its buffers (skipped where the buffer already holds that tensor)."""
        for name in self.block_layers.get(block, ()):
            w = weights[name]
            if self._loaded.get(name) is not w:
                self._buffer(name).copy_(w)
                self._loaded[name] = w

    def _capture(self, block: int, hidden: torch.Tensor, call: BlockCall) -> _Graph:
        module = self.blocks[block]
        names = self.block_layers.get(block, ())
        saved = {name: self.params[name].data for name in names}
        try:
            for name in names:  # the graph must read the buffers, whatever the layer holds now
                self.params[name].data = self._buffer(name)
            static_in = hidden.clone()
            side = torch.cuda.Stream(device=hidden.device)
            side.wait_stream(torch.cuda.current_stream(hidden.device))
            with torch.cuda.stream(side):  # warm-up off the capture stream, as torch's documentation asks
                for _ in range(2):
                    run_block(module, static_in, call)
            torch.cuda.current_stream(hidden.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                static_out = run_block(module, static_in, call)
        finally:
            for name, data in saved.items():
                self.params[name].data = data
        self.captures += 1
        return _Graph(graph, static_in, static_out, call)

    def run(self, block: int, hidden: Sequence[torch.Tensor], calls: Sequence[BlockCall],
            weights: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
        """The block's outputs for each batch, or None when this block must run eagerly.

        ``weights`` maps each of the block's layers to the tensor the eager path would put in it.
        The caller has *not* applied them to the model (a graph ignores the module's parameters).
        """
        if not self.enabled:
            return None
        outs: list[torch.Tensor] = []
        self._load(block, weights)
        for i, (h, call) in enumerate(zip(hidden, calls)):
            key = (block, i, tuple(h.shape))
            g = self._graphs.get(key)
            if g is None or g.call is not call:
                try:
                    g = self._capture(block, h, call)
                    ok, why = self._check(block, g, h, call, weights)
                except Exception as exc:  # noqa: BLE001 - any capture failure: fall back to the eager path
                    ok, why = False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                if not ok:
                    self.disable(why)
                    return None
                self._graphs[key] = g
            g.static_in.copy_(h)
            g.graph.replay()
            outs.append(g.static_out.clone())
            self.replays += 1
        return outs

    def _check(self, block: int, g: _Graph, hidden: torch.Tensor, call: BlockCall,
               weights: dict[str, torch.Tensor]) -> tuple[bool, str]:
        """The new graph against the eager block with the same weights: equal, or graphs go off."""
        g.static_in.copy_(hidden)
        g.graph.replay()
        names = self.block_layers.get(block, ())
        saved = {name: self.params[name].data for name in names}
        try:
            for name in names:
                self.params[name].data = weights[name]
            eager = run_block(self.blocks[block], hidden, call)
        finally:
            for name, data in saved.items():
                self.params[name].data = data
        got = g.static_out
        if got.shape != eager.shape:
            return False, f"block {block}'s graph gave shape {tuple(got.shape)}, eager {tuple(eager.shape)}"
        if torch.equal(got, eager):
            return True, ""
        # a kernel may pick another algorithm under capture; a last-bits difference is kept (and reported)
        scale = max(float(eager.float().abs().max()), 1e-30)
        rel = float((got.float() - eager.float()).abs().max()) / scale
        self.max_rel_diff = max(self.max_rel_diff, rel)
        tol = 1e-5 if eager.dtype == torch.float32 else 1e-2
        if rel <= tol:
            return True, ""
        return False, f"block {block}'s graph differs from the eager block by {rel:.3g} of its largest value"


    def disable(self, why: str) -> None:
        self.enabled = False
        self._graphs.clear()
        self._buffers.clear()
        self._loaded.clear()
        warnings.warn(f"CUDA graphs are off for this model ({why}); its blocks run eagerly. "
                      f"Set {ENV_SWITCH}=0 to skip trying them.", stacklevel=3)
