"""The evaluator: how far a recipe moves a model from its full-precision self.

``Evaluator.evaluate`` is the plain path (apply the recipe, run the model, restore).
``Evaluator.stream`` runs the same computation block by block, so an environment can advance
hidden states as an agent fixes each block's rules and pay about one forward pass per episode;
completed prefixes are cached, so recipes that share their first blocks share that work.
Both paths score with the same function and must agree.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qenv.errors import QenvError
from qenv.eval.blocks import BlockCall, block_returns_tuple, capture_block_inputs, run_block, run_head
from qenv.eval.graphs import BlockGraphs, graphs_wanted
from qenv.eval.reference import (Reference, batching_key, cached_reference, check_reference_fits, numerics_key,
                                 resolve_cache_dir)
from qenv.eval.tokens import TokenSet
from qenv.memory import hidden_size, prefix_cache_bytes
from qenv.models.layers import LayerInfo, find_blocks
from qenv.models.loading import LoadedModel, check_context
from qenv.quant.accounting import bits_per_weight, model_bytes, untargeted_params
from qenv.quant.apply import QuantizedWeights
from qenv.quant.quantizer import LayerCalibration
from qenv.quant.rules import KEEP, Rule


@dataclass(frozen=True)
class Metrics:
    """Fidelity and size of one recipe. ``kl`` is mean per-token KL(full precision ‖ quantized)."""

    kl: float
    ppl: float
    top1: float
    bpw: float
    model_bytes: int
    n_tokens: int

    @property
    def model_mb(self) -> float:
        return self.model_bytes / 1e6

    def to_dict(self) -> dict[str, float]:
        data = asdict(self)
        data["model_mb"] = self.model_mb
        return data


@contextmanager
def oom_guard(batch_size: int) -> Iterator[None]:
    """Turn an out-of-memory error into advice instead of a traceback."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise QenvError(f"Out of memory while running batches of {batch_size} sequences.",
                        "use a smaller batch_size (--env-kwargs batch_size=N), fewer or shorter calibration "
                        "sequences (n_tokens, seq_len), "
                        "or a lower-precision dtype.") from None


def first_nonfinite_module(model: torch.nn.Module, ids: torch.Tensor) -> str | None:
    """The first module (in call order) whose output holds NaN or inf, for error messages."""
    found: list[str] = []
    handles = []
    for name, module in model.named_modules():
        def hook(mod: torch.nn.Module, inputs: object, output: object, name: str = name) -> None:
            tensor = output[0] if isinstance(output, tuple) else output
            if not found and isinstance(tensor, torch.Tensor) and tensor.is_floating_point() \
                    and not torch.isfinite(tensor).all():
                found.append(name or type(model).__name__)
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


class NonFiniteLogits(Exception):
    """Raised by scoring when logits are NaN/inf; the evaluator turns it into a QenvError naming the layer."""


#: the largest float32 slice of log-probabilities scoring holds at once on a GPU (few, large kernels)
SCORE_CHUNK_BYTES = 256 << 20
#: ... and on a CPU, where a slice that stays in cache is about twice as fast as a large one
SCORE_CHUNK_BYTES_CPU = 4 << 20


def score_chunk_bytes(device: torch.device) -> int:
    """How many bytes of float32 log-probabilities scoring computes at once on ``device``."""
    return SCORE_CHUNK_BYTES if device.type == "cuda" else SCORE_CHUNK_BYTES_CPU


class _Score:
    """Running sums of KL, NLL and top-1 agreement over scored positions."""

    def __init__(self) -> None:
        self.kl = 0.0
        self.nll = 0.0
        self.top1 = 0
        self.count = 0

    def add(self, logits: torch.Tensor, ref_logprobs: torch.Tensor, ids: torch.Tensor,
            ref_top1: torch.Tensor | None = None, chunk_rows: int | None = None) -> None:
        """Score one batch. Positions are scored ``chunk_rows`` at a time (default: a slice of
        :func:`score_chunk_bytes`), so the float32 log-probabilities never exceed a bounded slice
        even for a large vocabulary (49k tokens x thousands of positions would be gigabytes)."""
        vocab = logits.shape[-1]
        rows = logits[:, :-1].reshape(-1, vocab)
        ref_rows = ref_logprobs.reshape(-1, vocab)
        targets = ids[:, 1:].reshape(-1).to(logits.device)
        top_rows = None if ref_top1 is None else ref_top1.reshape(-1)
        step = chunk_rows or max(1, score_chunk_bytes(logits.device) // (4 * vocab))
        kl = nll = top1 = None
        for start in range(0, rows.shape[0], step):
            end = start + step
            logprobs = torch.log_softmax(rows[start:end].float(), dim=-1)
            ref = ref_rows[start:end].to(logprobs.device)
            # Any NaN/inf log-prob makes the KL sum NaN/inf, so testing the sum is as strict as testing
            # every element, without another pass over the slice (that pass cost ~25% of scoring).
            part = (ref - logprobs).mul_(ref.exp()).sum(dtype=torch.float64)  # in place: one temporary fewer
            nll_part = logprobs.gather(-1, targets[start:end].unsqueeze(-1)).sum(dtype=torch.float64)
            top = ref.max(-1).indices if top_rows is None else top_rows[start:end].to(logprobs.device)
            # max(-1).indices is argmax (first maximum on ties), several times faster on a CPU
            hits = (logprobs.max(-1).indices == top).sum()
            kl, nll, top1 = (part, nll_part, hits) if kl is None else (kl + part, nll + nll_part, top1 + hits)
        # one device-to-host copy per batch (each float() on a GPU waits for the queue to drain)
        if kl is not None:
            kl_v, nll_v, top_v = torch.stack([kl, nll, top1.to(torch.float64)]).tolist()
            if not math.isfinite(kl_v):
                raise NonFiniteLogits
            self.kl += kl_v
            self.nll -= nll_v
            self.top1 += int(top_v)
        self.count += targets.numel()

    def metrics(self, bpw: float, size: int) -> Metrics:
        n = max(self.count, 1)
        return Metrics(kl=max(self.kl / n, 0.0), ppl=math.exp(min(self.nll / n, 700.0)), top1=self.top1 / n,
                       bpw=bpw, model_bytes=size, n_tokens=self.count)


def stage_of(info: LayerInfo) -> int:
    """When a layer's rule takes effect in a block-by-block pass: embeddings (and a head tied to
    them) act before block 0, the lm_head after the last block."""
    if info.kind == "embed" or info.tied_to is not None:
        return -1
    return info.block


def check_tokens_in_vocab(loaded: LoadedModel, tokens: TokenSet) -> None:
    """Refuse token ids the model has no embedding for (they would raise an IndexError mid-pass)."""
    output = loaded.model.get_output_embeddings() if hasattr(loaded.model, "get_output_embeddings") else None
    if output is None or not tokens.ids.numel():
        return
    vocab = int(output.weight.shape[0])
    low, high = int(tokens.ids.min()), int(tokens.ids.max())
    if low < 0 or high >= vocab:
        raise QenvError(f"The token set {tokens.source} holds ids in [{low}, {high}], outside {loaded.name}'s "
                        f"vocabulary [0, {vocab}).", "use tokens made with this model's tokenizer (or sampled from it).")


class Evaluator:
    """Scores recipes on one model and one token set; everything recipe-independent is cached."""

    def __init__(self, loaded: LoadedModel, tokens: TokenSet, *, batch_size: int = 8,
                 cache_dir: str | Path | None | bool = None, max_weight_cache_bytes: int | None = None,
                 max_prefix_cache_bytes: int | None = None, progress: bool = False) -> None:
        if batch_size < 1:
            raise QenvError(f"batch_size={batch_size} must be at least 1.")
        check_context(loaded, int(tokens.ids.shape[-1]))
        check_tokens_in_vocab(loaded, tokens)
        self.loaded = loaded
        self.model = loaded.model
        self.tokens = tokens
        self.layers: list[LayerInfo] = list(loaded.layers)
        self.batch_size = batch_size
        self.batches = [b.to(loaded.device) for b in tokens.batches(batch_size)]
        self.cache_dir = resolve_cache_dir(cache_dir)
        check_reference_fits(self.model, self.layers, int(tokens.ids.shape[0]), int(tokens.ids.shape[-1]),
                             self.cache_dir)
        self.progress = progress
        self._blocks = find_blocks(self.model)[1]
        self._reference: Reference | None = None
        self._reference_top1: list[torch.Tensor] | None = None
        self._block_inputs: dict[tuple, tuple[list[torch.Tensor], list[BlockCall]]] = {}
        self._as_tuple: bool | None = None
        self._streaming_checked = False
        # streamed blocks replay as CUDA graphs on a GPU (qenv.eval.graphs); False runs them eagerly
        self.cuda_graphs = graphs_wanted(loaded.device)
        self._graphs: BlockGraphs | None = None  # built at the first graphed block
        self.weights = QuantizedWeights(self.model, self.layers, self.calibration_of, max_weight_cache_bytes)
        self._prefix: OrderedDict[int, list[torch.Tensor]] = OrderedDict()  # prefix_id -> block outputs
        self._prefix_ids: dict[tuple, int] = {}
        self._next_prefix_id = itertools.count()
        self._prefix_bytes = 0
        if max_prefix_cache_bytes is None:  # a few episodes of this model's block outputs on these tokens
            state = int(tokens.ids.numel()) * hidden_size(self.model) * loaded.dtype.itemsize
            max_prefix_cache_bytes = prefix_cache_bytes(state, len(self._blocks), loaded.device)
        self.max_prefix_cache_bytes = int(max_prefix_cache_bytes)
        self.prefix_hits = 0
        self.blocks_run = 0
        self._untargeted: int | None = None
        self.stages: dict[int, list[LayerInfo]] = {}
        for info in self.layers:
            self.stages.setdefault(stage_of(info), []).append(info)

    # -- recipe-independent pieces, computed once ---------------------------------------------
    @property
    def reference(self) -> Reference:
        if self._reference is None:
            with torch.inference_mode(), oom_guard(self.batch_size):
                self.weights.restore()
                self._reference = cached_reference(
                    self.model, self.layers, self.batches, self.loaded.cache_key, self.tokens.fingerprint,
                    self.cache_dir, progress=self.progress)
        return self._reference

    @property
    def reference_top1(self) -> list[torch.Tensor]:
        """The reference's most likely token at each scored position, per batch (computed once)."""
        if self._reference_top1 is None:
            self._reference_top1 = [lp.argmax(-1) for lp in self.reference.logprobs]
        return self._reference_top1

    @property
    def full_precision_ppl(self) -> float:
        """Perplexity of the unquantized model on the tokens, read off the cached reference."""
        nll, count = 0.0, 0
        for ids, lp in zip(self.batches, self.reference.logprobs):
            targets = ids[:, 1:].to(lp.device)
            nll -= float(lp.gather(-1, targets.unsqueeze(-1)).sum(dtype=torch.float64))  # as _Score sums
            count += targets.numel()
        return math.exp(min(nll / max(count, 1), 700.0))

    def calibration_of(self, name: str) -> LayerCalibration | None:
        return self.reference.calibration.get(name)

    @property
    def n_blocks(self) -> int:
        return len(self._blocks)

    def size(self, recipe: Mapping[str, Rule]) -> tuple[float, int]:
        """(bits per weight over targeted layers, total model bytes) of a recipe."""
        if self._untargeted is None:
            self._untargeted = untargeted_params(self.model, self.layers)
        return bits_per_weight(self.layers, recipe), model_bytes(self.model, self.layers, recipe, self._untargeted)

    # -- plain path ------------------------------------------------------------------------------
    @torch.inference_mode()
    def evaluate(self, recipe: Mapping[str, Rule], max_batches: int | None = None) -> Metrics:
        """Apply the recipe, run the whole model over the tokens, restore the weights.

        ``max_batches`` scores only the first token batches: a cheaper, noisier estimate that
        searchers screen candidates with; ``Metrics.n_tokens`` says how many tokens were scored.
        """
        ref = self.reference
        score = _Score()
        n = len(self.batches) if max_batches is None else max(1, int(max_batches))
        with self.weights.applied(recipe), oom_guard(self.batch_size), self._nonfinite_guard(recipe):
            for ids, ref_lp, top in zip(self.batches[:n], ref.logprobs[:n], self.reference_top1[:n]):
                score.add(self.model(input_ids=ids, use_cache=False).logits, ref_lp, ids, top)
        return score.metrics(*self.size(recipe))

    @contextmanager
    def _nonfinite_guard(self, recipe: Mapping[str, Rule]) -> Iterator[None]:
        try:
            yield
        except NonFiniteLogits:
            with self.weights.applied(recipe):
                where = first_nonfinite_module(self.model, self.batches[0])
            raise QenvError(f"The model produced NaN or inf values, first in module {where or '?'}.",
                            "check that layer's weights, or use float32/bfloat16 (float16 overflows easily).") from None

    # -- streaming path --------------------------------------------------------------------------
    def stage_key(self, recipe: Mapping[str, Rule], stage: int) -> tuple:
        return tuple(recipe.get(info.name, KEEP) for s in sorted(self.stages) if s <= stage for info in self.stages[s])

    def prefix_id(self, previous: int | None, recipe: Mapping[str, Rule], block: int) -> int:
        """The id of "the prefix ``previous`` followed by ``recipe``'s rules for ``block``'s layers":
        equal ids mean equal rules for every layer up to that block, as ``stage_key`` tuples would, but
        each block hashes only its own rules (a key over all earlier layers at every block is
        quadratic in the depth; on a 210-layer model it hashed 7,350 rules per episode)."""
        key = (previous, tuple(recipe.get(info.name, KEEP) for info in self.stages.get(block, ())))
        found = self._prefix_ids.get(key)
        if found is None:
            if len(self._prefix_ids) >= 1 << 20:  # bounded: old ids are never reused, only forgotten
                self._prefix_ids.clear()
            found = self._prefix_ids[key] = next(self._next_prefix_id)
        return found

    def _inputs(self, recipe: Mapping[str, Rule]) -> tuple[list[torch.Tensor], list[BlockCall]]:
        """Hidden states entering block 0 (they depend only on embedding rules)."""
        key = self.stage_key(recipe, -1)
        if key not in self._block_inputs:
            embed_rules = {info.name: recipe.get(info.name, KEEP) for info in self.stages.get(-1, [])}
            with torch.inference_mode(), oom_guard(self.batch_size), self.weights.applied(embed_rules):
                pairs = [capture_block_inputs(self.model, self._blocks, ids) for ids in self.batches]
            self._block_inputs[key] = ([h for h, _ in pairs], [c for _, c in pairs])
        return self._block_inputs[key]

    def _run_graphed(self, block: int, rules: Mapping[str, Rule], hidden: list[torch.Tensor],
                     calls: list[BlockCall]) -> list[torch.Tensor] | None:
        """The block run as CUDA graphs (:mod:`qenv.eval.graphs`), or None where it must run eagerly:
        off the GPU, with ``QENV_CUDA_GRAPHS=0``, after graphs failed once, or when a rule of the block
        needs forward hooks (GGUF rules round their layers' inputs)."""
        if not self.cuda_graphs:
            return None
        if self._graphs is None:
            params = {name: self.weights.parameter(name) for name in self.weights.layers}
            self._graphs = BlockGraphs(self._blocks, params, {b: [info.name for info in infos]
                                                              for b, infos in self.stages.items()})
        if not self._graphs.enabled or any(rule.gguf is not None for rule in rules.values()):
            return None
        weights = {name: self.weights.weight_for(name, rule) for name, rule in rules.items()}
        with oom_guard(self.batch_size):
            return self._graphs.run(block, hidden, calls, weights)

    def graph_stats(self) -> dict[str, float | int | bool]:
        """Whether streamed blocks run as CUDA graphs, and how often they did (for benchmarks)."""
        g = self._graphs
        return {"wanted": self.cuda_graphs, "enabled": bool(g is not None and g.enabled),
                "captures": 0 if g is None else g.captures, "replays": 0 if g is None else g.replays,
                "max_rel_diff": 0.0 if g is None else g.max_rel_diff}

    def clear_prefix_cache(self) -> None:
        """Forget every cached block output, so that the next streams run every block again (a
        benchmark's replay, or a comparison of two ways of running the same blocks)."""
        self._prefix.clear()
        self._prefix_bytes = 0

    def _remember(self, key: int, hidden: list[torch.Tensor]) -> None:
        size = sum(h.numel() * h.element_size() for h in hidden)
        if size > self.max_prefix_cache_bytes:
            return
        self._prefix[key] = hidden
        self._prefix_bytes += size
        while self._prefix_bytes > self.max_prefix_cache_bytes:
            _, old = self._prefix.popitem(last=False)
            self._prefix_bytes -= sum(h.numel() * h.element_size() for h in old)

    def stream(self) -> Stream:
        # Computing the reference restores every original weight, so it must exist before a stream
        # swaps quantized weights in: built lazily in the middle of applying a block's rules (a
        # calibrated rule asks for it), it silently undid the rules applied so far.
        self.reference  # noqa: B018
        self._check_streaming()
        return Stream(self)

    def _check_streaming(self) -> None:
        """Refuse, clearly and once, an architecture whose blocks cannot be run one at a time.

        Streaming must reproduce the model's own forward pass. Some architectures load and have
        linear layers but pass state between blocks in ways the block runner cannot (RWKV's blocks
        take and return a recurrent state), which would otherwise fail mid-episode with an
        unrelated traceback. One sequence through both paths tells.
        """
        if self._streaming_checked:
            return
        ids = self.batches[0][:1]
        problem = None
        try:
            with torch.inference_mode(), oom_guard(self.batch_size):
                plain = self.model(input_ids=ids, use_cache=False).logits.float()
                hidden, call = capture_block_inputs(self.model, self._blocks, ids)
                as_tuple = self._as_tuple = block_returns_tuple(self._blocks[0], hidden, call)
                for block in self._blocks:
                    hidden = run_block(block, hidden, call)
                streamed = run_head(self.model, self._blocks, ids, hidden, as_tuple).float()
        except QenvError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever breaks, the architecture cannot be streamed
            text = str(exc).strip().splitlines()
            problem = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        else:
            scale = max(1.0, float(plain.abs().nan_to_num(posinf=0.0, neginf=0.0).max()))
            tol = (1e-3 if self.loaded.dtype == torch.float32 else 5e-2) * scale
            if streamed.shape != plain.shape or not torch.allclose(streamed, plain, rtol=0.0, atol=tol, equal_nan=True):
                problem = "block-by-block logits differ from the model's own forward pass"
        if problem is not None:
            raise QenvError(
                f"Architecture {type(self.model).__name__} is not supported: qenv cannot run its decoder blocks "
                f"one at a time ({problem}).",
                "use a model with a supported layout (Llama, Mistral, Qwen2, Gemma, Phi-3, GPT-2, GPT-NeoX, OPT, "
                "Falcon, or similar decoder-only transformers).")
        self._streaming_checked = True

    def evaluate_blockwise(self, recipe: Mapping[str, Rule]) -> Metrics:
        """The streaming path run to the end in one go (reuses cached prefixes)."""
        return self.stream().finish(recipe)


class Stream:
    """One block-by-block pass: ``advance`` runs blocks whose rules are fixed, ``finish`` scores."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.ev = evaluator
        self.done = -1  # blocks < done+1 have been run... -1: nothing run yet
        self.key: int | None = None  # prefix_id of the rules of every layer up to block ``done``
        self.hidden: list[torch.Tensor] | None = None
        self.calls: list[BlockCall] | None = None

    @torch.inference_mode()
    def advance(self, recipe: Mapping[str, Rule], upto_block: int) -> None:
        """Run blocks up to and including ``upto_block`` with ``recipe``'s rules for their layers."""
        ev = self.ev
        if self.hidden is None:
            self.hidden, self.calls = ev._inputs(recipe)
            self.done = -1
            self.key = ev.prefix_id(None, recipe, -1)  # the embedding stage's rules
        upto_block = min(upto_block, ev.n_blocks - 1)
        while self.done < upto_block:
            block = self.done + 1
            key = self.key = ev.prefix_id(self.key, recipe, block)
            cached = ev._prefix.get(key)
            if cached is not None:
                ev._prefix.move_to_end(key)
                ev.prefix_hits += 1
                self.hidden = cached
            else:
                rules = {info.name: recipe.get(info.name, KEEP) for info in ev.stages.get(block, [])}
                assert self.calls is not None
                graphed = ev._run_graphed(block, rules, self.hidden, self.calls)
                if graphed is not None:
                    self.hidden = graphed
                else:
                    with ev.weights.applied(rules), oom_guard(ev.batch_size):
                        self.hidden = [run_block(ev._blocks[block], h, c) for h, c in zip(self.hidden, self.calls)]
                ev.blocks_run += 1
                ev._remember(key, self.hidden)
            self.done = block

    def block_error(self, block: int) -> float:
        """Relative squared error of ``block``'s output against full precision (after advancing)."""
        ref = self.ev.reference.block_outputs
        if ref is None or self.hidden is None or self.done != block:
            raise QenvError("Block errors need reference block outputs and a stream positioned at that block.")
        # every batch's sums read back in one transfer (one host sync a block, not two a batch), then
        # added in the same order as before: the same float
        sums = [(h.float() - r.float()).square().sum() for h, r in zip(self.hidden, ref[block])]
        sums += [r.float().square().sum() for r in ref[block]]
        values = torch.stack(sums).tolist()
        n = len(values) // 2
        num, den = sum(values[:n]), sum(values[n:])
        return num / max(den, 1e-30)

    @torch.inference_mode()
    def finish(self, recipe: Mapping[str, Rule]) -> Metrics:
        """Run the remaining blocks and the head, and score against the reference."""
        ev = self.ev
        self.advance(recipe, ev.n_blocks - 1)
        assert self.hidden is not None and self.calls is not None
        assert ev._as_tuple is not None  # set by the streaming check when the stream was opened
        # A tied head/embedding matrix is applied before block 0 (stage -1) but is also the head, so the
        # head must run with it quantized too, exactly as in the plain path.
        head_rules = {info.name: recipe.get(info.name, KEEP) for info in ev.layers
                      if stage_of(info) == ev.n_blocks or info.tied_to is not None}
        score = _Score()
        with ev.weights.applied(head_rules), oom_guard(ev.batch_size), ev._nonfinite_guard(recipe):
            for ids, h, ref_lp, top in zip(ev.batches, self.hidden, ev.reference.logprobs, ev.reference_top1):
                score.add(run_head(ev.model, ev._blocks, ids, h, ev._as_tuple), ref_lp, ids, top)
        return score.metrics(*ev.size(recipe))


def layer_table_path(evaluator: Evaluator, layers: list[LayerInfo] | tuple[LayerInfo, ...], stem: str,
                     extra: str = "") -> Path | None:
    """Where a per-layer table measured on ``evaluator`` (features, per-rule errors) is cached:
    keyed on the model, the tokens, the layers, the batch split, ``extra`` (e.g. the rules) and
    :func:`numerics_key`; ``None`` when the evaluator has no cache folder."""
    if evaluator.cache_dir is None:
        return None
    text = (evaluator.loaded.cache_key + evaluator.tokens.fingerprint + "|".join(i.name for i in layers)
            + "|b" + batching_key(evaluator.batches) + ("|" + extra if extra else "")
            + "|" + numerics_key(evaluator.loaded.device))
    return Path(evaluator.cache_dir) / f"{stem}-{hashlib.sha1(text.encode()).hexdigest()[:16]}.safetensors"
