"""Apply a recipe to a model and take it back, without ever copying the model.

Quantized matrices are computed once per ``(layer, rule)`` and cached; applying a recipe swaps
each targeted parameter's storage for the cached tensor, and restoring swaps the original
storage back, so the original weights return bit for bit and nothing is reloaded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from qenv.errors import QenvError
from qenv.models.layers import LayerInfo, get_module, get_weight, to_storage_layout, weight_parameter
from qenv.quant import gguf as _gguf
from qenv.quant.quantizer import LayerCalibration, quantize_matrix
from qenv.quant.rules import Rule

CalibrationSource = Callable[[str], "LayerCalibration | None"]


class QuantizedWeights:
    """Swaps quantized weights in and out of a model; an LRU cache keyed by ``(layer, rule)``."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[LayerInfo],
        calibration: CalibrationSource | None = None,
        max_cache_bytes: int = 2 << 30,
    ) -> None:
        self.model = model
        self.layers = {info.name: info for info in layers}
        self.calibration = calibration
        self.max_cache_bytes = max_cache_bytes
        self._params = {name: weight_parameter(model, info) for name, info in self.layers.items()}
        self._originals = {name: param.data for name, param in self._params.items()}
        self._cache: OrderedDict[tuple[str, Rule], torch.Tensor] = OrderedDict()
        self._cache_bytes = 0
        # layers under a GGUF rule round their inputs as llama.cpp's CPU matmul does: {name: (type, hook)}
        self._act_hooks: dict[str, tuple[str, torch.utils.hooks.RemovableHandle]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def original(self, name: str) -> torch.Tensor:
        return self._originals[name]

    def weight_for(self, name: str, rule: Rule) -> torch.Tensor:
        """The quantized tensor of layer ``name`` under ``rule``, in the parameter's own layout."""
        if rule.keeps:
            return self._originals[name]
        key = (name, rule)
        cached = self._cache.get(key)
        if cached is not None:
            self.hits += 1
            self._cache.move_to_end(key)
            return cached
        self.misses += 1
        info = self.layers[name]
        param = self._params[name]
        current = param.data
        param.data = self._originals[name]
        try:
            matrix = get_weight(self.model, info)
            if not torch.isfinite(matrix).all():
                raise QenvError(f"Layer {name} holds NaN or inf weights; it cannot be quantized.",
                                "check the checkpoint: its weights overflowed or are corrupt.")
            calib = self.calibration(name) if self.calibration is not None and rule.needs_calibration else None
            if rule.needs_calibration and calib is None and self.calibration is not None:
                raise QenvError(
                    f"Rule {rule.label()} needs activation statistics of layer {name}, but that layer never ran "
                    "as a module during the calibration pass (its weight is used directly, or it is an embedding).",
                    "give this layer a rule without GPTQ, act_scale, mse_clip or activation-based salience.")
            quantized = to_storage_layout(info, quantize_matrix(matrix, rule, calib)).contiguous()
        finally:
            param.data = current
        size = quantized.numel() * quantized.element_size()
        self._cache[key] = quantized
        self._cache_bytes += size
        while self._cache_bytes > self.max_cache_bytes and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cache_bytes -= evicted.numel() * evicted.element_size()
        return quantized

    def apply(self, rules: Mapping[str, Rule]) -> None:
        """Put the quantized weights of ``rules`` into the model (other layers are untouched).

        A layer under a GGUF rule also gets its input rounded as llama.cpp's CPU backend rounds it
        (:func:`qenv.quant.gguf.round_activations`), so the score is the one llama.cpp computes.
        """
        for name, rule in rules.items():
            if name not in self._params:
                continue
            self._params[name].data = self.weight_for(name, rule)
            self._set_activation_rounding(name, rule)

    def _set_activation_rounding(self, name: str, rule: Rule) -> None:
        info = self.layers[name]
        kind = None
        if rule.gguf is not None and info.kind != "embed":
            kind = _gguf.VEC_DOT_TYPE[_gguf.effective_type(rule.gguf, info.in_features)]
        current = self._act_hooks.get(name)
        if current is not None and current[0] == kind:
            return
        if current is not None:
            current[1].remove()
            del self._act_hooks[name]
        if kind is None:
            return
        module = get_module(self.model, name)

        def hook(mod: nn.Module, args: tuple, kind: str = kind) -> tuple:
            return (_gguf.round_activations(args[0], kind), *args[1:])

        self._act_hooks[name] = (kind, module.register_forward_pre_hook(hook))

    def restore(self, names: list[str] | None = None) -> None:
        """Put the original weights back (all targeted layers unless ``names`` is given)."""
        for name in self._params if names is None else names:
            self._params[name].data = self._originals[name]
            hooked = self._act_hooks.pop(name, None)
            if hooked is not None:
                hooked[1].remove()

    @contextmanager
    def applied(self, rules: Mapping[str, Rule]) -> Iterator[None]:
        self.apply(rules)
        try:
            yield
        finally:
            self.restore(list(rules))
