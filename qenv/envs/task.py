"""The task of an episode: one model, its calibration tokens, its evaluator and the menu's costs.

Built once per process and shared by every env that asks for the same model, tokens and menu
(:func:`build_task`): one model copy, one reference, one cache of quantized weights. Everything
here is independent of the agent's actions; the env (:mod:`qenv.envs.quant_llm`) reads it.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from pathlib import Path

import numpy as np

from qenv.cache_files import check_token_ids, read_cache_file, write_cache_file
from qenv.envs.allocation import LagrangianSuffix, greedy_allocation
from qenv.envs.features import ladder_rules, relative_static, rung_gains, static_features
from qenv.envs.reward import Reference, bracketing_widths, uniform_frontier
from qenv.envs.spaces import ActionMapper
from qenv.eval.evaluator import Evaluator, Metrics, oom_guard, stage_of
from qenv.eval.reference import check_reference_fits, numerics_key, resolve_cache_dir
from qenv.eval.sensitivity import rule_errors
from qenv.eval.tokens import TokenSet, tokens_from_model, tokens_from_text
from qenv.io import check_output_dir
from qenv.models.layers import LayerInfo
from qenv.models.loading import LoadedModel, check_context, load_model
from qenv.quant.accounting import input_groups
from qenv.quant.presets import rtn, uniform
from qenv.quant.rules import Rule, layer_bits


@dataclass
class ModelTask:
    """Everything an episode needs about one model, built once and shared by envs in a process."""

    loaded: LoadedModel
    evaluator: Evaluator
    layers: list[LayerInfo]
    static: np.ndarray
    costs: np.ndarray  # [n_layers, n_candidate_rules] storage bits
    rest_min: np.ndarray  # [n_layers + 1] cheapest bits of layers i.. end
    stage_end: list[bool]
    rest_numel: np.ndarray  # [n_layers + 1] weights in layers i.. end
    ladder_costs: np.ndarray  # [n_layers, len(SENSITIVITY_BITS)] bits of the ladder rules
    ladder_sens: np.ndarray  # [n_layers, len(SENSITIVITY_BITS)] error x layer size of the ladder rules
    rules: tuple[Rule, ...] = ()
    references: dict[float, Reference] = field(default_factory=dict)
    input_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # layers sharing an input (AWQ folding)
    plans: dict[float, np.ndarray] = field(default_factory=dict)
    block_refs: dict[float, list[float]] = field(default_factory=dict)
    _menu_sens: np.ndarray | None = None
    _ladder: tuple[np.ndarray, np.ndarray] | None = None
    _frontier: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    _ladder_table: LagrangianSuffix | None = None
    _ladder_gains: np.ndarray | None = None
    _menu_table: LagrangianSuffix | None = None
    _numel: np.ndarray | None = None
    _relative_static: np.ndarray | None = None
    in_budget: dict[float, Metrics] = field(default_factory=dict)

    @property
    def total_weights(self) -> int:
        return int(self.rest_numel[0])

    @property
    def name(self) -> str:
        return self.loaded.name

    def reference(self, budget_bpw: float) -> Reference:
        if budget_bpw not in self.references:
            self.references[budget_bpw] = uniform_frontier(self.evaluator, budget_bpw)
        return self.references[budget_bpw]

    @property
    def relative_static(self) -> np.ndarray:
        """The static entries of ``observation="relative"`` (and ``"actions"``): no scale of the model's
        own (:func:`~qenv.envs.features.relative_static`; computed once, kept on the task so that a
        copied or unpickled env finds it with its task)."""
        if self._relative_static is None:
            self._relative_static = relative_static(self.static, self.layers)
        return self._relative_static

    def in_budget_metrics(self, budget_bpw: float) -> Metrics:
        """The metrics of one recipe within the budget that the ``penalty`` budget mode caps every
        over-budget recipe's fidelity at: the widest uniform RTN width at or under the budget, or,
        when none fits, the menu's cheapest rule on every layer (evaluated once per budget)."""
        if budget_bpw not in self.in_budget:
            below, _ = bracketing_widths(self.evaluator, budget_bpw)
            if below is not None:
                recipe = dict(uniform(self.layers, rtn(below[1])))
            else:
                recipe = {info.name: self.rules[int(j)] for info, j in zip(self.layers, self.costs.argmin(axis=1))}
            self.in_budget[budget_bpw] = self.evaluator.evaluate(recipe)
        return self.in_budget[budget_bpw]

    @property
    def numel(self) -> np.ndarray:
        if self._numel is None:  # read at every step: computed once
            self._numel = np.diff(-self.rest_numel).astype(np.float64)
        return self._numel

    @property
    def ladder_table(self) -> LagrangianSuffix:
        """The ladder's :class:`LagrangianSuffix`: the observation's greedy plan of the layers left,
        computed at every step, in a lookup per bisection step (built on first use)."""
        if self._ladder_table is None:
            self._ladder_table = LagrangianSuffix(self.ladder_costs, self.ladder_sens)
        return self._ladder_table

    @property
    def ladder_gains(self) -> np.ndarray:
        """The ladder's :func:`~qenv.envs.features.rung_gains`, read by the observation at every step."""
        if self._ladder_gains is None:
            self._ladder_gains = rung_gains(self.ladder_costs, self.ladder_sens)
        return self._ladder_gains

    @property
    def menu_table(self) -> LagrangianSuffix:
        """The menu's :class:`LagrangianSuffix`: the residual kind's re-plan of the layers left."""
        if self._menu_table is None:
            self._menu_table = LagrangianSuffix(self.costs, self.menu_sensitivity())
        return self._menu_table

    def menu_sensitivity(self) -> np.ndarray:
        """``[n_layers, n_rules]`` measured output error × layer size of the action space's rules
        (what the greedy searcher ranks; computed on first use, cached on disk)."""
        if self._menu_sens is None:
            self._menu_sens = rule_errors(self.evaluator, self.layers, self.rules) * self.numel[:, None]
        return self._menu_sens

    def menu_ladder(self) -> tuple[np.ndarray, np.ndarray]:
        """Each layer's rules sorted by (cost, error, index): ``order[i, k]`` is the k-th rule of layer
        i, ``position[i, j]`` where rule j stands (the residual kind shifts along it)."""
        if self._ladder is None:
            sens = self.menu_sensitivity()
            m = self.costs.shape[1]
            order = np.array([np.lexsort((np.arange(m), sens[i], self.costs[i])) for i in range(len(self.layers))],
                             dtype=np.int64).reshape(len(self.layers), m)
            position = np.empty_like(order)
            rows = np.arange(len(self.layers))[:, None]
            position[rows, order] = np.arange(m)[None, :]
            self._ladder = (order, position)
        return self._ladder

    def frontier_ladder(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each layer's efficient rules: those no other rule matches or beats in both cost and error
        (ties: the first), sorted by cost. ``order[i, :length[i]]`` are layer i's, and
        ``position[i, j]`` is the last of them that costs no more than rule j (the residual kind's
        ``ladder="frontier"`` shifts along it, so +1 always means more bits and less error)."""
        if self._frontier is None:
            sens = self.menu_sensitivity()
            n, m = self.costs.shape
            order = np.zeros((n, m), dtype=np.int64)
            length = np.zeros(n, dtype=np.int64)
            position = np.zeros((n, m), dtype=np.int64)
            for i in range(n):
                keep: list[int] = []
                # by cost, then error, then index: a rule is efficient when it errs less than every
                # cheaper one (one as cheap and more accurate would have come first)
                for j in np.lexsort((np.arange(m), sens[i], self.costs[i])):
                    if not keep or sens[i, j] < sens[i, keep[-1]]:
                        keep.append(int(j))
                length[i] = len(keep)
                order[i, :len(keep)] = keep
                order[i, len(keep):] = keep[-1]
                kept_costs = self.costs[i, keep]
                position[i] = np.searchsorted(kept_costs, self.costs[i] + 1e-9, side="right") - 1
            self._frontier = (order, position.clip(min=0), length)
        return self._frontier

    def greedy_plan(self, budget_bpw: float) -> np.ndarray:
        """The ``greedy`` searcher's recipe at this budget, as rule indices (computed once per budget)."""
        if budget_bpw not in self.plans:
            self.plans[budget_bpw] = greedy_allocation(self.costs, self.menu_sensitivity(),
                                                       budget_bpw * self.total_weights)
        return self.plans[budget_bpw]

    def block_reference(self, budget_bpw: float) -> list[float]:
        """Each block's output error under the uniform RTN width at or under the budget: the scale
        of the potential-based shaping (so that its values mean the same on every model)."""
        if budget_bpw not in self.block_refs:
            below, above = bracketing_widths(self.evaluator, budget_bpw)
            bits = (below or above)[1]  # type: ignore[index]
            recipe = dict(uniform(self.layers, rtn(bits)))
            stream = self.evaluator.stream()
            errors = []
            for block in range(self.evaluator.n_blocks):
                stream.advance(recipe, block)
                errors.append(stream.block_error(block))
            self.block_refs[budget_bpw] = errors
        return self.block_refs[budget_bpw]


_TASKS: dict[tuple, ModelTask] = {}


def make_tokens(loaded: LoadedModel, data: str | Sequence[str] | None, n_tokens: int, seq_len: int, seed: int,
                cache_dir: str | Path | None | bool = None) -> TokenSet:
    """Calibration tokens: from text files when given, else sampled from the model with ``seed``
    (sampled tokens are cached on disk: generation is slow and they depend only on these inputs)."""
    if data:
        return tokens_from_text(loaded.tokenizer, data, n_tokens, seq_len)
    folder = resolve_cache_dir(cache_dir)
    numerics = hashlib.sha1(numerics_key(loaded.device).encode()).hexdigest()[:8]  # sampling reads the logits
    path = None if folder is None else folder / (f"tokens-{loaded.cache_key}-s{seed}-n{n_tokens}-l{seq_len}"
                                                 f"-n{numerics}.safetensors")
    key = str(path.name) if path is not None else ""
    vocab = int(loaded.model.get_output_embeddings().weight.shape[0])
    cached = read_cache_file(path, key, lambda t: check_token_ids(t.get("ids"), (n_tokens // seq_len, seq_len), vocab))
    if cached is not None:
        return TokenSet(cached["ids"].long(), f"sampled:seed={seed}")
    bos = getattr(loaded.tokenizer, "bos_token_id", None) if loaded.tokenizer is not None else None
    tokens = tokens_from_model(loaded.model, n_tokens, seq_len, seed=seed, bos_token_id=bos)
    if path is not None:
        write_cache_file(path, {"ids": tokens.ids}, key)
    return tokens


def build_task(spec: str | LoadedModel, mapper: ActionMapper, *, data: str | Sequence[str] | None, n_tokens: int,
               seq_len: int, batch_size: int, seed: int, device: str | None, dtype: str | None,
               include_lm_head: bool, cache_dir: str | Path | None | bool, weight_cache_gib: float | None = None,
               prebuild: bool | None = None) -> ModelTask:
    """The shared :class:`ModelTask` of these arguments (built once per process; envs that ask for the
    same model, tokens and menu get the same object: one model copy and one weight cache)."""
    key = (str(spec) if not isinstance(spec, LoadedModel) else id(spec), tuple(mapper.rules),
           str(data), n_tokens, seq_len, batch_size, seed, str(device), str(dtype), include_lm_head, str(cache_dir),
           weight_cache_gib)
    if key in _TASKS:
        task = _TASKS[key]
        if prebuild:
            prebuild_menu(task, mapper.rules)
        return task
    folder = resolve_cache_dir(cache_dir)
    if folder is not None:  # checked before the slow part: the first write comes after the reference
        check_output_dir(folder, "The cache folder", "set QENV_CACHE_DIR to a folder you can write to, or pass "
                                                     "cache_dir=False to cache nothing.")
    from qenv.progress import stage

    with stage(f"loading model {spec}", show=False if isinstance(spec, LoadedModel) else None):
        loaded = load_model(spec, device=device, dtype=dtype, include_lm_head=include_lm_head)
    check_context(loaded, seq_len)
    if seq_len >= 2:  # before sampling tokens: a reference that cannot fit is refused at once
        check_reference_fits(loaded.model, loaded.layers, max(n_tokens, 0) // seq_len, seq_len, folder)
    with stage(f"calibration tokens ({n_tokens})"), oom_guard(batch_size):  # sampling them runs the model too
        tokens = make_tokens(loaded, data, n_tokens, seq_len, seed, cache_dir)
    evaluator = Evaluator(loaded, tokens, batch_size=batch_size, cache_dir=cache_dir,
                          max_weight_cache_bytes=None if weight_cache_gib is None else int(weight_cache_gib * 2**30))
    order = sorted(range(len(loaded.layers)), key=lambda i: (stage_of(loaded.layers[i]), i))
    layers = [loaded.layers[i] for i in order]
    costs = np.array([[layer_bits(r, info.out_features, info.in_features) for r in mapper.rules] for info in layers],
                     dtype=np.float64)
    cheapest = costs.min(axis=1)
    rest_min = np.concatenate([np.cumsum(cheapest[::-1])[::-1], [0.0]])
    stages = [stage_of(info) for info in layers]
    stage_end = [i + 1 == len(layers) or stages[i + 1] != stages[i] for i in range(len(layers))]
    numel = np.array([info.numel for info in layers], dtype=np.int64)
    rest_numel = np.concatenate([np.cumsum(numel[::-1])[::-1], [0]])
    with stage(f"reference and layer features ({len(layers)} layers)"):
        static = static_features(evaluator, layers)
    ladder = ladder_rules()
    ladder_costs = np.array([[layer_bits(r, info.out_features, info.in_features) for r in ladder] for info in layers],
                            dtype=np.float64)
    ladder_sens = rule_errors(evaluator, layers, ladder) * numel[:, None].astype(np.float64)
    task = ModelTask(loaded, evaluator, layers, static, costs, rest_min, stage_end, rest_numel, ladder_costs,
                     ladder_sens, tuple(mapper.rules), input_groups=input_groups(layers))
    if prebuild:
        prebuild_menu(task, mapper.rules)
    elif prebuild is None and loaded.device.type == "cuda":
        weights = evaluator.weights
        later, variants = inherited_scale_variants(task, mapper.rules)
        need = weights.recipe_bytes() * sum(not r.keeps for r in mapper.rules) + sum(
            weights.layer_bytes(name) for name in later) * len(variants)
        if need <= weights.max_cache_bytes:
            prebuild_menu(task, mapper.rules)
        else:  # not asked for explicitly: quantize on demand rather than fail
            warnings.warn(f"The menu's quantized weights ({need / 2**30:.1f} GiB) do not fit the weight cache "
                          f"({weights.max_cache_bytes / 2**30:.1f} GiB); they are quantized on demand instead. "
                          "Raise weight_cache_gib or shorten the menu to build them up front.", stacklevel=3)
    _TASKS[key] = task
    return task


def prebuild_menu(task: ModelTask, rules: Sequence[Rule], progress: bool = True) -> int:
    """Quantize every (layer, menu rule) pair of the task up front, layers of one shape in batches.

    On a GPU, episodes then only swap cached tensors in: a warm episode costs about one forward
    pass. Quantizing on demand instead spreads the same work over the first episodes, one layer
    at a time (GPTQ is launch-bound per layer). See ``QuantizedWeights.prebuild``.
    """
    with oom_guard(task.evaluator.batch_size):
        task.evaluator.reference  # noqa: B018  (calibration statistics first, outside the build's OOM handling)
    weights = task.evaluator.weights
    built = weights.prebuild(rules, progress=progress)
    # A later layer of an input group inherits the AWQ scale its group chose (QuantLLMEnv._fold_act_scale),
    # so it can need a menu rule with another menu rule's act_scale: build those variants for those layers.
    later, variants = inherited_scale_variants(task, rules)
    if later and variants:
        built += weights.prebuild(variants, progress=progress, names=later)
    return built


def inherited_scale_variants(task: ModelTask, rules: Sequence[Rule]) -> tuple[list[str], list[Rule]]:
    """``(later layers of input groups, menu rules with another menu rule's act_scale)``: what an
    episode can quantize beyond the menu itself, since a later layer of a group inherits its
    group's AWQ scale."""
    later = [name for name, members in task.input_groups.items() if members and members[0] != name]
    scalable = [r for r in rules if not r.keeps and r.gguf is None]
    scales = sorted({r.act_scale for r in scalable})
    return later, [_replace(r, act_scale=s) for r in scalable for s in scales if s != r.act_scale]
