"""The task of an episode: one model, its calibration tokens, its evaluator and the menu's costs.

Built once per process and shared by every env that asks for the same model, tokens and menu
(:func:`build_task`): one model copy, one reference, one cache of quantized weights. Everything
here is independent of the agent's actions; the env (:mod:`qenv.envs.quant_llm`) reads it.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from pathlib import Path

import numpy as np
import torch

from qenv.cache_files import check_table, check_token_ids, read_cache_file, write_cache_file
from qenv.envs.allocation import LagrangianSuffix, greedy_allocation
from qenv.envs.features import ladder_rules, relative_static, rung_gains, static_features
from qenv.envs.reward import Reference, bracketing_widths, uniform_frontier
from qenv.envs.spaces import ActionMapper
from qenv.envs.start import BestStart, StartCandidate, best_start, start_candidates
from qenv.eval.evaluator import Evaluator, Metrics, layer_table_path, oom_guard, stage_of
from qenv.eval.reference import check_reference_fits, numerics_key, reference_bytes, resolve_cache_dir
from qenv.eval.sensitivity import rule_errors
from qenv.eval.tokens import TokenSet, split_tokens, tokens_from_model, tokens_from_text
from qenv.io import check_output_dir
from qenv.memory import (CACHED_PREFIX_EPISODES, CACHED_RECIPES, fit_batch_size, forward_bytes_per_sequence, gib,
                          weight_cache_bytes)
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
    _ladder_table: LagrangianSuffix | None = None
    _ladder_gains: np.ndarray | None = None
    _menu_table: LagrangianSuffix | None = None
    _numel: np.ndarray | None = None
    _relative_static: np.ndarray | None = None
    in_budget: dict[float, Metrics] = field(default_factory=dict)
    starts: dict[float, BestStart] = field(default_factory=dict)
    start_scores: dict[tuple[int, ...], float] = field(default_factory=dict)  # a start candidate's score, any budget
    validation_tokens: TokenSet | None = None  # held back from the evaluator (validation_fraction > 0)
    _validation: Evaluator | None = None

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
        """The static entries of ``observation="relative"``: no scale of the model's
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

    def greedy_plan(self, budget_bpw: float) -> np.ndarray:
        """The ``greedy`` searcher's recipe at this budget, as rule indices (computed once per budget)."""
        if budget_bpw not in self.plans:
            self.plans[budget_bpw] = greedy_allocation(self.costs, self.menu_sensitivity(),
                                                       budget_bpw * self.total_weights)
        return self.plans[budget_bpw]

    def validation_evaluator(self) -> Evaluator | None:
        """An evaluator of the held-back validation tokens (``None`` when none are held back) that
        scores recipes with the task's own quantized weights: GPTQ/AWQ stay calibrated on the fitting
        tokens only, so a recipe's validation KL is on tokens nothing was fitted to. The searchers
        pick their final recipe with it. Built on first use (its reference is computed then)."""
        if self.validation_tokens is None:
            return None
        if self._validation is None:
            ev = self.evaluator
            validation = Evaluator(self.loaded, self.validation_tokens, batch_size=ev.batch_size,
                                   cache_dir=ev.cache_dir if ev.cache_dir is not None else False,
                                   max_weight_cache_bytes=ev.weights.max_cache_bytes)
            validation.weights = ev.weights  # the same quantized weights: calibrated on the fitting tokens
            self._validation = validation
        return self._validation

    def plan_recipe(self, choice: Sequence[int]) -> dict[str, Rule]:
        """The recipe an episode plays from menu indices per layer: each layer's menu rule, a later
        layer of an input group inheriting its group's AWQ scale (:func:`inherit_act_scale`), as
        ``QuantLLMEnv.step`` folds it."""
        recipe: dict[str, Rule] = {}
        for info, j in zip(self.layers, choice):
            recipe[info.name] = inherit_act_scale(self.rules[int(j)], self.input_groups.get(info.name, ()), recipe)
        return recipe

    def start_plan(self, budget_bpw: float) -> BestStart:
        """The best start at this budget (:mod:`qenv.envs.start`): the plan-based action kinds'
        (``residual``, ``allocation``) zero action, so that an untrained or all-zero policy plays the
        best *measured* recipe among greedy's plan, the human presets the menu expresses and the
        uniform rules that fit, never greedy's proxy plan alone (issue 24: at gptq-w4's size on
        stories260K that plan's KL is 2x uniform gptq-w4's).

        Each candidate is measured once by the task's evaluator (streaming path, the calibration
        tokens; KL of the recipe as an episode folds it, whatever the env's reward), and the result
        is cached per budget on the task, so every episode and every env of the process that shares
        the task reuses it: ``len(start.measured)`` evaluations per (model, budget), once. When no
        candidate fits (a budget below the cheapest rules, ``budget_mode="penalty"``), greedy's plan
        stands alone, unmeasured.

        Training over a budget range (issue 25) measures many budgets of each model, and a
        candidate's score does not depend on the budget (only which candidates fit does): each
        recipe is measured once per task (``start_scores``) and a budget then costs about one new
        evaluation (greedy's plan at it). The result is also cached on disk
        (:func:`start_cache_path`), so a later process (the next training run, eval_agent.py) reads
        it. Both caches return exactly what measuring would; the reset still reports
        ``len(start.measured)`` evaluations, what the start costs a method that has no cache."""
        if budget_bpw not in self.starts:
            budget_bits = budget_bpw * self.total_weights
            candidates = start_candidates(self.layers, self.rules, self.costs, budget_bits, self.menu_sensitivity())
            path = start_cache_path(self.evaluator, self.layers, self.rules, budget_bits, candidates)
            found = read_best_start(path, candidates)
            if found is None:
                def score(choice: tuple[int, ...]) -> float:
                    if choice not in self.start_scores:
                        self.start_scores[choice] = -self.evaluator.evaluate_blockwise(self.plan_recipe(choice)).kl
                    return self.start_scores[choice]

                found = best_start(candidates, score)
                if found is not None and found.complete:
                    write_best_start(path, found)
            else:
                self.start_scores.update((c.choice, v) for c, v in found.measured)
            if found is None:
                plan = tuple(int(j) for j in self.greedy_plan(budget_bpw))
                rows = np.arange(len(self.layers))
                found = BestStart(StartCandidate("greedy plan", plan, float(self.costs[rows, list(plan)].sum())),
                                  math.nan, (), complete=False)
            self.starts[budget_bpw] = found
        return self.starts[budget_bpw]

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


#: bump when what a cached best start means changes (the score, the folding of plan_recipe)
START_CACHE_VERSION = 1


def start_cache_path(evaluator: Evaluator, layers: Sequence[LayerInfo], rules: Sequence[Rule], budget_bits: float,
                     candidates: Sequence[StartCandidate]) -> Path | None:
    """Where the best start of these candidates is cached (``None`` without a cache folder).

    Measuring the best start is the costly part of a reset on a budget range (tens of full
    evaluations per model and budget, once per process: most of a CPU training run on the zoo).
    The file is keyed on everything its scores depend on: the model (weights and dtype), the
    calibration tokens, the layers, the batch split and the numerics (:func:`layer_table_path`),
    the menu (every rule's full ``repr``), the budget in bits, and the candidates themselves (label
    and menu indices: greedy's plan and the presets that fit are a function of the rest, so a
    change to either is a new key, never a stale score)."""
    listed = ";".join(f"{c.label}={','.join(map(str, c.choice))}" for c in candidates)
    extra = (f"start-v{START_CACHE_VERSION}|budget={budget_bits!r}|rules=" + "|".join(repr(r) for r in rules)
             + "|cands=" + hashlib.sha1(listed.encode()).hexdigest())
    return layer_table_path(evaluator, list(layers), "start", extra)


def read_best_start(path: Path | None, candidates: Sequence[StartCandidate]) -> BestStart | None:
    """The cached best start of ``candidates`` (every candidate's measured score, in order), or
    ``None`` when there is no intact file for exactly these candidates (it is then measured)."""
    if path is None or not candidates:
        return None
    cached = read_cache_file(path, path.name, lambda t: check_table(t, (len(candidates),)))
    if cached is None:
        return None
    scores = [float(v) for v in cached["table"].double().tolist()]
    replay = iter(scores)  # best_start scores the candidates in order: the cached scores, in order
    return best_start(candidates, lambda _choice: next(replay))


def write_best_start(path: Path | None, found: BestStart) -> None:
    """Cache a complete best start's scores (nothing without a cache folder; NaN scores are not cached)."""
    if path is None or not found.complete:
        return
    scores = np.array([score for _, score in found.measured], dtype=np.float64)
    if np.isfinite(scores).all():
        write_cache_file(path, {"table": torch.from_numpy(scores)}, path.name)


def inherit_act_scale(rule: Rule, group: Sequence[str], recipe: Mapping[str, Rule]) -> Rule:
    """``rule`` with the AWQ scale its input group already chose in ``recipe`` (layers reading one
    input, q/k/v or gate/up, share one scale so that it folds into the norm before them; bits do not
    depend on ``act_scale``). The one folding rule of episodes and of :meth:`ModelTask.plan_recipe`."""
    if rule.keeps or rule.gguf is not None:
        return rule
    chosen = next((recipe[m] for m in group if m in recipe and not recipe[m].keeps and recipe[m].gguf is None), None)
    if chosen is None or chosen.act_scale == rule.act_scale:
        return rule
    return _replace(rule, act_scale=chosen.act_scale)


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
               prebuild: bool | None = None, validation_fraction: float = 0.0) -> ModelTask:
    """The shared :class:`ModelTask` of these arguments (built once per process; envs that ask for the
    same model, tokens and menu get the same object: one model copy and one weight cache).
    ``validation_fraction > 0`` holds that share of the calibration sequences back from the evaluator
    (:func:`~qenv.eval.tokens.split_tokens`, seeded by ``seed``) as ``task.validation_tokens``."""
    key = (str(spec) if not isinstance(spec, LoadedModel) else id(spec), tuple(mapper.rules),
           str(data), n_tokens, seq_len, batch_size, seed, str(device), str(dtype), include_lm_head, str(cache_dir),
           weight_cache_gib, float(validation_fraction))
    if key in _TASKS:
        task = _TASKS[key]
        if prebuild:
            prebuild_menu(task, mapper.rules)
        return task
    folder = resolve_cache_dir(cache_dir)
    if folder is not None:  # checked before the slow part: the first write comes after the reference
        check_output_dir(folder, "The cache folder", "set QENV_CACHE_DIR to a folder you can write to, or pass "
                                                     "cache_dir=False to cache nothing.")
    from qenv.progress import note, stage

    with stage(f"loading model {spec}", show=False if isinstance(spec, LoadedModel) else None):
        loaded = load_model(spec, device=device, dtype=dtype, include_lm_head=include_lm_head)
    check_context(loaded, seq_len)
    n_sequences = max(n_tokens, 0) // seq_len if seq_len >= 1 else 0
    order = sorted(range(len(loaded.layers)), key=lambda i: (stage_of(loaded.layers[i]), i))
    layers = [loaded.layers[i] for i in order]
    groups = input_groups(layers)
    recipe_bytes = sum(info.numel for info in layers) * loaded.dtype.itemsize
    menu_bytes = whole_menu_bytes(layers, mapper.rules, groups, loaded.dtype.itemsize)
    # the whole menu is prebuilt when asked, or on a GPU when it fits the few recipes cached anyway
    whole = bool(prebuild) or (prebuild is None and loaded.device.type == "cuda" and weight_cache_gib is None and
                               menu_bytes <= recipe_bytes * CACHED_RECIPES)
    cache_bytes = int(weight_cache_gib * 2**30) if weight_cache_gib is not None else weight_cache_bytes(
        recipe_bytes, sum(not r.keeps for r in mapper.rules), loaded.device, whole_menu_bytes=menu_bytes if whole else 0)
    if seq_len >= 2 and loaded.device.type == "cuda":  # a GPU shared with other processes: wait, then shrink
        batch_size = fit_batch_size(
            batch_size, reference_bytes(loaded.model, loaded.layers, n_sequences, seq_len) + recipe_bytes,
            forward_bytes_per_sequence(loaded.model, seq_len), loaded.device, what=f"the evaluation of {loaded.name}",
            note=note)
    if seq_len >= 2:  # before sampling tokens: a reference that cannot fit is refused at once
        check_reference_fits(loaded.model, loaded.layers, n_sequences, seq_len, folder)
    with stage(f"calibration tokens ({n_tokens})"), oom_guard(batch_size):  # sampling them runs the model too
        tokens = make_tokens(loaded, data, n_tokens, seq_len, seed, cache_dir)
    validation = None
    if validation_fraction > 0:  # held back: never quantized with, never scored by the episodes
        tokens, validation = split_tokens(tokens, validation_fraction, seed=seed)
    evaluator = Evaluator(loaded, tokens, batch_size=batch_size, cache_dir=cache_dir, max_weight_cache_bytes=cache_bytes)
    note(memory_line(evaluator, len(mapper.rules), recipe_bytes, menu_bytes, whole))
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
                     ladder_sens, tuple(mapper.rules), input_groups=groups, validation_tokens=validation)
    if whole and (prebuild or menu_bytes <= evaluator.weights.max_cache_bytes):
        prebuild_menu(task, mapper.rules)
    elif prebuild is None and loaded.device.type == "cuda" and weight_cache_gib is not None:
        if menu_bytes <= evaluator.weights.max_cache_bytes:  # a cache the user sized for the menu: build it
            prebuild_menu(task, mapper.rules)
        else:  # not asked for explicitly: quantize on demand rather than fail
            warnings.warn(f"The menu's quantized weights ({menu_bytes / 2**30:.1f} GiB) do not fit the weight cache "
                          f"({evaluator.weights.max_cache_bytes / 2**30:.1f} GiB); they are quantized on demand "
                          "instead. Raise weight_cache_gib or shorten the menu to build them up front.", stacklevel=3)
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


def inherited_scale_variants(task: ModelTask | Mapping[str, tuple[str, ...]],
                             rules: Sequence[Rule]) -> tuple[list[str], list[Rule]]:
    """``(later layers of input groups, menu rules with another menu rule's act_scale)``: what an
    episode can quantize beyond the menu itself, since a later layer of a group inherits its
    group's AWQ scale. ``task``: the task, or its input groups (before the task exists)."""
    groups = task.input_groups if isinstance(task, ModelTask) else task
    later = [name for name, members in groups.items() if members and members[0] != name]
    scalable = [r for r in rules if not r.keeps and r.gguf is None]
    scales = sorted({r.act_scale for r in scalable})
    return later, [_replace(r, act_scale=s) for r in scalable for s in scales if s != r.act_scale]


def whole_menu_bytes(layers: Sequence[LayerInfo], rules: Sequence[Rule], groups: Mapping[str, tuple[str, ...]],
                     itemsize: int) -> int:
    """Bytes of every (layer, menu rule) pair's quantized weight, with the AWQ-scale variants that later
    layers of an input group can inherit (what :func:`prebuild_menu` builds), in the model's dtype."""
    numel = {info.name: info.numel for info in layers}
    later, variants = inherited_scale_variants(groups, rules)
    return itemsize * (sum(numel.values()) * sum(not r.keeps for r in rules) +
                       sum(numel.get(name, 0) for name in later) * len(variants))


def memory_line(evaluator: Evaluator, n_rules: int, recipe_bytes: int, menu_bytes: int, whole: bool) -> str:
    """One line saying what the in-memory caches may hold, and why that much (issue 26: a 135M
    model held 7-10 GB unexplained)."""
    weights = evaluator.weights
    recipes = weights.max_cache_bytes / max(recipe_bytes, 1)
    dtype = str(evaluator.loaded.dtype).replace("torch.", "")
    how = (f"the whole menu of {n_rules} rules, prebuilt" if whole else
           f"the menu's {n_rules} rules would need {gib(menu_bytes)}: quantized on demand")
    n_tokens = int(evaluator.tokens.ids.numel())
    return (f"memory: quantized-weight cache up to {gib(weights.max_cache_bytes)} ({recipes:.1f} recipes of "
            f"{gib(recipe_bytes)}: {len(weights.layers)} layers in {dtype}; {how}); block-output cache up to "
            f"{gib(evaluator.max_prefix_cache_bytes)} ({CACHED_PREFIX_EPISODES} episodes of {evaluator.n_blocks} blocks' outputs "
            f"on {n_tokens} tokens)")
