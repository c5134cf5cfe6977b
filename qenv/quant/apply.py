"""Apply a recipe to a model and take it back, without ever copying the model.

Quantized matrices are computed once per ``(layer, rule)`` and cached; applying a recipe swaps
each targeted parameter's storage for the cached tensor, and restoring swaps the original
storage back, so the original weights return bit for bit and nothing is reloaded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from qenv.errors import QenvError
from qenv.memory import CACHED_RECIPES, available_memory, check_cache_fits, weight_cache_bytes
from qenv.models.layers import LayerInfo, get_module, get_weight, to_storage_layout, weight_parameter
from qenv.quant import gguf as _gguf
from qenv.quant.quantizer import LayerCalibration, gguf_encode, quantize_matrices, quantize_rules
from qenv.quant.rules import Rule

CalibrationSource = Callable[[str], "LayerCalibration | None"]


def default_batch_bytes(device: torch.device) -> int:
    """Working memory of one prebuild batch: a quarter of the free GPU memory; on a CPU none: there
    the batch is sized by rows instead (:func:`cpu_batch_layers`). Batching by memory was slower on
    a CPU (SmolLM2, ``w3g128a-gptq``: 28.3 s batched vs about 22.6 s layer by layer, BENCHMARKS.md)
    while the column loop strode across rows; it now runs on transposed blocks, capped in rows."""
    if device.type == "cuda":
        return max(256 << 20, (available_memory(device) or 0) // 4)
    return 0


def cpu_batch_layers(out_f: int, rule: Rule) -> int:
    """Layers of one shape quantized as one batch on a CPU: GPTQ and learned rounding run one column
    loop for the batch, whose cost is per column while a block of its rows stays in the CPU's cache
    (:data:`qenv.quant.gptq.GPTQ_LOOP_ROWS` rows); the other rules are vectorised per matrix."""
    from qenv.quant.gptq import GPTQ_LOOP_ROWS

    return max(1, GPTQ_LOOP_ROWS // max(1, out_f)) if rule.uses_hessian else 1


def _working_bytes(out_f: int, in_f: int, rule: Rule) -> int:
    """Rough float32 working memory to quantize one ``[out, in]`` matrix under ``rule``."""
    matrix = 4 * out_f * in_f
    if rule.rounding == "learned":  # GPTQ's, plus the residual, the swept copy and the scale refit's products
        return 10 * matrix + 5 * 4 * in_f * in_f
    if rule.rounding == "gptq":
        return 6 * matrix + 4 * 4 * in_f * in_f  # weights, result, mask, updates; Hessian and its factors
    return (8 if rule.mse_clip else 5) * matrix


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _progress(progress: bool | Callable[[int, int], None], total: int) -> Callable[..., None]:
    """A ``report(n, close=False)`` that advances a tqdm bar, calls the user's callback, or nothing."""
    if callable(progress):
        done = [0]

        def call(n: int, close: bool = False) -> None:
            if n:
                done[0] += n
                progress(done[0], total)
        return call
    if not progress:
        return lambda n, close=False: None
    from qenv.progress import progress_bar

    bar = progress_bar(total, "building menu weights", "layer-rule", leave=False, show=True)

    def advance(n: int, close: bool = False) -> None:
        if n:
            bar.update(n)
        if close:
            bar.close()
    return advance


class QuantizedWeights:
    """Swaps quantized weights in and out of a model; an LRU cache keyed by ``(layer, rule)``."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[LayerInfo],
        calibration: CalibrationSource | None = None,
        max_cache_bytes: int | None = None,
    ) -> None:
        self.model = model
        self.layers = {info.name: info for info in layers}
        self.calibration = calibration
        self._params = {name: weight_parameter(model, info) for name, info in self.layers.items()}
        self._originals = {name: param.data for name, param in self._params.items()}
        one_recipe = self.recipe_bytes()
        device = next(iter(self._originals.values())).device if self._originals else torch.device("cpu")
        if max_cache_bytes is None:  # a few recipes of this model (build_task sizes it from the menu)
            self.max_cache_bytes = weight_cache_bytes(one_recipe, CACHED_RECIPES, device)
        else:
            check_cache_fits(max_cache_bytes / 2**30, device, "weight_cache_gib")
            self.max_cache_bytes = int(max_cache_bytes)
        if self.max_cache_bytes < one_recipe:
            where = "set" if max_cache_bytes is not None else "sized from the model and the free memory"
            raise QenvError(
                f"The quantized-weight cache ({self.max_cache_bytes / 2**30:.3f} GiB, {where}) cannot hold even one "
                f"recipe of this model ({one_recipe / 2**30:.3f} GiB of quantized weights): every step would "
                "quantize again.",
                f"raise weight_cache_gib (--weight-cache-gib) to at least {one_recipe / 2**30:.3f}, or free "
                "memory / use a smaller model or a lower-precision dtype.")
        self._cache: OrderedDict[tuple[str, Rule], torch.Tensor] = OrderedDict()
        self._cache_bytes = 0
        # layers under a GGUF rule round their inputs as llama.cpp's CPU matmul does: {name: (type, hook)}
        self._act_hooks: dict[str, tuple[object, list[torch.utils.hooks.RemovableHandle]]] = {}
        self._mins: dict[tuple[str, Rule], torch.Tensor] = {}  # Q4_1 / Q5_1 block minimums (_block_mins)
        self.hits = 0
        self.misses = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def original(self, name: str) -> torch.Tensor:
        return self._originals[name]

    def parameter(self, name: str) -> nn.Parameter:
        """The model parameter that holds layer ``name``'s weight (whatever is swapped into it)."""
        return self._params[name]

    def _original_matrix(self, name: str) -> torch.Tensor:
        """Layer ``name``'s original ``[out, in]`` matrix, whatever recipe is applied right now."""
        info = self.layers[name]
        param = self._params[name]
        current = param.data
        param.data = self._originals[name]
        try:
            matrix = get_weight(self.model, info)
        finally:
            param.data = current
        if not torch.isfinite(matrix).all():
            raise QenvError(f"Layer {name} holds NaN or inf weights; it cannot be quantized.",
                            "check the checkpoint: its weights overflowed or are corrupt.")
        return matrix

    def _calibration_for(self, name: str, rule: Rule) -> LayerCalibration | None:
        calib = self.calibration(name) if self.calibration is not None and rule.needs_calibration else None
        if rule.needs_calibration and calib is None and self.calibration is not None:
            raise QenvError(
                f"Rule {rule.label()} needs activation statistics of layer {name}, but that layer never ran "
                "as a module during the calibration pass (its weight is used directly, or it is an embedding).",
                "give this layer a rule without GPTQ, act_scale, mse_clip or activation-based salience.")
        return calib

    def _quantize(self, names: Sequence[str], rule: Rule, threads: int | None = None) -> list[torch.Tensor]:
        """Quantized tensors of ``names`` under ``rule`` (one batch per shape; a llama.cpp type's in
        ``threads`` threads), in storage layout. The originals and calibrations are read here, in
        the calling thread: only the quantization itself runs in other threads."""
        matrices = [self._original_matrix(name) for name in names]
        calibs = [self._calibration_for(name, rule) for name in names]
        out = quantize_matrices(matrices, rule, calibs, threads=threads)
        return [to_storage_layout(self.layers[name], q).contiguous() for name, q in zip(names, out)]

    def _insert(self, key: tuple[str, Rule], quantized: torch.Tensor) -> None:
        self._cache[key] = quantized
        self._cache_bytes += quantized.numel() * quantized.element_size()
        while self._cache_bytes > self.max_cache_bytes and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cache_bytes -= evicted.numel() * evicted.element_size()

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
        quantized = self._quantize([name], rule)[0]
        self._insert(key, quantized)
        return quantized

    def weights_for(self, name: str, rules: Sequence[Rule]) -> list[torch.Tensor]:
        """Layer ``name``'s quantized tensors under each of ``rules``: for each, what :meth:`weight_for`
        gives (and it is cached as :meth:`weight_for` caches it), but the rules not cached yet are
        quantized together (:func:`qenv.quant.quantizer.quantize_rules`: the GPTQ rules share one
        inverse-Hessian Cholesky and one column loop), bit for bit what one at a time gives.
        Why: a menu's error table (:func:`qenv.eval.sensitivity.rule_errors`) needs every rule of every
        layer, and GPTQ rule by rule was most of the cold ``quantize`` command (issue 26)."""
        found: dict[Rule, torch.Tensor] = {}
        todo = []
        for rule in dict.fromkeys(rules):
            cached = None if rule.keeps else self._cache.get((name, rule))
            if rule.keeps:
                found[rule] = self._originals[name]
            elif cached is not None:
                self.hits += 1
                self._cache.move_to_end((name, rule))
                found[rule] = cached
            else:
                todo.append(rule)
        if todo:
            matrix = self._original_matrix(name)
            calibrated = [r for r in todo if r.needs_calibration]  # the others never read a calibration
            for part in (calibrated, [r for r in todo if not r.needs_calibration]):
                if not part:
                    continue
                calib = self._calibration_for(name, part[0]) if part is calibrated else None
                for rule, q in zip(part, quantize_rules(matrix, part, calib)):
                    self.misses += 1
                    found[rule] = to_storage_layout(self.layers[name], q).contiguous()
            for rule in todo:
                self._insert((name, rule), found[rule])
        return [found[rule] for rule in rules]

    def recipe_bytes(self) -> int:
        """Bytes of one recipe's quantized weights (every targeted layer, in the model's dtype)."""
        return sum(self.layer_bytes(name) for name in self._originals)

    def layer_bytes(self, name: str) -> int:
        """Bytes of one layer's quantized weight in the cache (the model's dtype)."""
        t = self._originals[name]
        return t.numel() * t.element_size()

    def prebuild(self, rules: Sequence[Rule], *, progress: bool | Callable[[int, int], None] = False,
                 batch_bytes: int | None = None, names: Sequence[str] | None = None,
                 threads: int | None = None) -> int:
        """Quantize every (layer, rule) pair of ``rules`` not cached yet, up front; returns how many.
        ``names`` limits the layers (default: every layer).

        Layers of one shape are quantized together (``quantize_matrices``), in batches of at most
        ``batch_bytes`` of working memory (default: a quarter of the free GPU memory; one layer at a
        time on a CPU). A llama.cpp type's layers of one shape are one batch, quantized by llama.cpp
        on the CPU in ``threads`` threads (default: every CPU, ``QENV_QUANT_THREADS``), the same
        bytes as one by one. A batch that runs out of memory is split in half and retried. When even one
        layer cannot be quantized, or the pairs cannot all fit in the cache, this raises a
        ``QenvError`` saying what to lower, and every entry this call added is taken out again, so
        the cache holds only whole entries from before.
        """
        wanted = [r for r in dict.fromkeys(rules) if not r.keeps]
        layers = self._params if names is None else [n for n in self._params if n in set(names)]
        todo = [(name, rule) for rule in wanted for name in layers if (name, rule) not in self._cache]
        if not todo:
            return 0
        need = sum(self.layer_bytes(name) for name, _ in todo)
        if self._cache_bytes + need > self.max_cache_bytes:
            raise QenvError(
                f"The quantized-weight cache ({self.max_cache_bytes / 2**30:.2f} GiB) cannot hold the menu's "
                f"weights ({(self._cache_bytes + need) / 2**30:.2f} GiB for {len(wanted)} rules x {len(self._params)} "
                "layers).",
                f"raise weight_cache_gib (--weight-cache-gib) to at least {(self._cache_bytes + need) / 2**30:.2f}, "
                "use a shorter menu, or turn prebuilding off (prebuild=False) to quantize on demand.")
        device = next(iter(self._originals.values())).device
        budget = batch_bytes if batch_bytes is not None else default_batch_bytes(device)
        added: list[tuple[str, Rule]] = []
        report = _progress(progress, len(todo))
        try:
            for rule in wanted:
                by_shape: dict[tuple, list[str]] = {}
                for name, r in todo:
                    if r == rule:
                        info = self.layers[name]
                        by_shape.setdefault((info.out_features, info.in_features), []).append(name)
                for (out_f, in_f), names in by_shape.items():
                    per_layer = _working_bytes(out_f, in_f, rule)
                    size = len(names) if rule.gguf is not None else \
                        max(1, min(len(names), budget // max(per_layer, 1)))
                    if device.type == "cpu" and batch_bytes is None and rule.uses_hessian:
                        size = min(len(names), cpu_batch_layers(out_f, rule))
                    start = 0
                    while start < len(names):
                        chunk = names[start:start + size]
                        try:
                            quantized = self._quantize(chunk, rule, threads)
                        except torch.OutOfMemoryError:
                            if size == 1:
                                raise
                            size = max(1, size // 2)
                            _empty_cache(device)
                            continue
                        for name, q in zip(chunk, quantized):
                            self._insert((name, rule), q)
                            added.append((name, rule))
                        start += len(chunk)
                        report(len(chunk))
        except torch.OutOfMemoryError:
            self._drop(added)
            _empty_cache(device)
            raise QenvError(
                f"Out of memory while building the menu's quantized weights on {device} (rule "
                f"{rule.label()}, one layer of shape {out_f}x{in_f}); nothing was kept from this build.",
                "lower weight_cache_gib (--weight-cache-gib), the calibration batch_size or n_tokens, or turn "
                "prebuilding off (prebuild=False).") from None
        except BaseException:
            self._drop(added)
            raise
        finally:
            report(0, close=True)
        return len(added)

    def _drop(self, keys: Sequence[tuple[str, Rule]]) -> None:
        for key in keys:
            tensor = self._cache.pop(key, None)
            if tensor is not None:
                self._cache_bytes -= tensor.numel() * tensor.element_size()

    def apply(self, rules: Mapping[str, Rule]) -> None:
        """Put the quantized weights of ``rules`` into the model (other layers are untouched).

        A layer under a GGUF rule also gets its input rounded as llama.cpp's CPU backend rounds it
        (:func:`qenv.quant.gguf.round_activations`), so the score is the one llama.cpp computes.
        """
        self._quantize_missing(rules)
        for name, rule in rules.items():
            if name not in self._params:
                continue
            self._params[name].data = self.weight_for(name, rule)
            self._set_activation_rounding(name, rule)

    def _quantize_missing(self, rules: Mapping[str, Rule]) -> None:
        """On a CPU, quantize the GPTQ and learned-rounding layers of ``rules`` not cached yet in
        batches of one shape (:func:`cpu_batch_layers`), before :meth:`weight_for` would quantize
        them one by one: the same tensors (a batch's arithmetic is each matrix's), in about half the
        time on SmolLM2's layers (issue 26). What does not fit the cache with the rest of ``rules``
        is left to :meth:`weight_for`."""
        if not self._originals or next(iter(self._originals.values())).device.type != "cpu":
            return  # a GPU batches by memory in prebuild; apply's hot path stays as it was
        missing: dict[tuple[Rule, int, int], list[str]] = {}
        for name, rule in rules.items():
            if name in self._params and rule.uses_hessian and (name, rule) not in self._cache:
                info = self.layers[name]
                missing.setdefault((rule, info.out_features, info.in_features), []).append(name)
        if not missing:
            return
        room = self.max_cache_bytes - sum(self.layer_bytes(name) for name in rules if name in self._params)
        for name, rule in rules.items():  # this recipe's cached layers are the last the batches may evict
            if (name, rule) in self._cache:
                self._cache.move_to_end((name, rule))
        for (rule, out_f, _), names in missing.items():
            size = cpu_batch_layers(out_f, rule)
            if size < 2 or len(names) < 2 or room < 0:
                continue
            for start in range(0, len(names), size):
                chunk = names[start:start + size]
                for name, q in zip(chunk, self._quantize(chunk, rule)):
                    self.misses += 1
                    self._insert((name, rule), q)
                    self.hits -= 1  # weight_for counts the hit on it next; this was the miss

    def _set_activation_rounding(self, name: str, rule: Rule) -> None:
        info = self.layers[name]
        kind = None
        if rule.gguf is not None and info.kind != "embed":
            kind = _gguf.VEC_DOT_TYPE[_gguf.effective_type(rule.gguf, info.in_features)]
        # Q8_1 (Q4_1 / Q5_1 weights) also needs the rule's block minimums, so its hooks are per rule
        key = (kind, rule) if kind == "Q8_1" else kind
        current = self._act_hooks.get(name)
        if current is not None and current[0] == key:
            return
        if current is not None:
            for handle in current[1]:
                handle.remove()
            del self._act_hooks[name]
        if kind is None:
            return
        module = get_module(self.model, name)

        def hook(mod: nn.Module, args: tuple, kind: str = kind) -> tuple:
            return (_gguf.round_activations(args[0], kind), *args[1:])

        if kind != "Q8_1":
            self._act_hooks[name] = (key, [module.register_forward_pre_hook(hook)])
            return
        # llama.cpp adds each block's minimum times the activations' fp16 block sum (q8_1_sum_error)
        mins = self._block_mins(name, rule)
        error: list[torch.Tensor] = []

        def sum_hook(mod: nn.Module, args: tuple) -> tuple:
            error.append(_gguf.q8_1_sum_error(args[0]))
            return hook(mod, args)

        def add_hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            return out + (error.pop() @ mins.t().to(device=out.device, dtype=torch.float32)).to(out.dtype)

        self._act_hooks[name] = (key, [module.register_forward_pre_hook(sum_hook),
                                       module.register_forward_hook(add_hook)])

    def _block_mins(self, name: str, rule: Rule) -> torch.Tensor:
        """The ``[out, in/32]`` block minimums of layer ``name`` under a Q4_1 / Q5_1 rule (cached)."""
        key = (name, rule)
        if key not in self._mins:
            qtype, data = gguf_encode(self._original_matrix(name), rule, self._calibration_for(name, rule))
            self._mins[key] = torch.from_numpy(_gguf.block_mins(data, qtype))
        return self._mins[key]

    def restore(self, names: list[str] | None = None) -> None:
        """Put the original weights back (all targeted layers unless ``names`` is given)."""
        for name in self._params if names is None else names:
            self._params[name].data = self._originals[name]
            hooked = self._act_hooks.pop(name, None)
            if hooked is not None:
                for handle in hooked[1]:
                    handle.remove()

    @contextmanager
    def applied(self, rules: Mapping[str, Rule]) -> Iterator[None]:
        self.apply(rules)
        try:
            yield
        finally:
            self.restore(list(rules))
