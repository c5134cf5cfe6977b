"""Searchers: recipes found without training a policy, behind the same agent protocol.

Every searcher scores a recipe with the environment itself: a recipe is played as one episode
(one action per layer), so its reward is exactly the environment's (fidelity against the
uniform frontier ``task.reference(budget)``), computed by the same evaluator with the same
streaming prefix cache. Only recipes that the action space cannot express (the llama.cpp
mixes) and the evolution's screening are scored directly, by
:func:`qenv.agents.base.score_recipe` with the same evaluator and reward formula.

Budgets are comparable: ``learn(total_timesteps)`` grants ``total_timesteps // n_layers``
evaluations (at least one), the number of episodes an RL agent would play with the same steps.
A full evaluation costs 1; the evolution's screening on the first ``screen_batches`` token
batches costs ``screen_batches / n_batches``. ``history`` holds the best reward after each full
evaluation; ``best_recipe`` / ``best_info`` the best recipe and its terminal info.
``predict`` replays the best recipe's action for the current layer, so
:func:`qenv.agents.base.rollout_recipe` works for searchers too; ``search(env)`` returns
``(recipe, info)`` directly.

Every recipe a searcher proposes meets the hard budget (``task.costs`` / ``task.rest_min``),
so the environment never lowers one of its actions (the llama.cpp mix is the one exception:
when neither mix fits, the nearer one is reported with its real bpw and ``budget_met=False``).
Searchers are deterministic for a fixed seed. ``save`` writes the best recipe as JSON.

``pool=`` (an evaluator pool of :mod:`qenv.distributed`, e.g. ``RayEvaluatorPool.from_env(env,
n_actors=4)``) scores the recipes a searcher has in hand at once (random: a round of proposals;
evolution: the initial population, each generation's screening and its survivors; uniform: the
candidates; greedy: its one recipe) in parallel on the pool's workers, each playing the recipe as
an episode of its own copy of the env. Results, records and budgets are those of the default
in-process evaluation (``pool=None``), in the same order.

- ``uniform``: the best single rule (of the environment's candidate rules) that fits the budget
  on every layer; candidates are tried costliest first.
- ``llamacpp``: llama.cpp's own mixes (:mod:`qenv.quant.presets`, quantized by llama.cpp), the
  largest that fits, else the nearest.
- ``greedy``: HAWQ-style allocation: every layer starts at its cheapest rule; the upgrade with the
  largest drop in measured output error (:func:`qenv.eval.sensitivity.output_error` × layer size)
  per extra bit is applied until nothing fits. One evaluation.
- ``random``: random budget-feasible recipes (layers visited in random order, each picking
  uniformly among the rules that leave the rest feasible); keeps the best.
- ``evolution``: EvoPress-like. A population starts from the best-fitting uniform rule and
  random recipes, each filled up to the budget. Offspring come from block-wise crossover and
  mutations: moving bits between layers at (nearly) constant size (raise one layer a cost level,
  lower others until the recipe fits, then fill any slack), and switching one other knob of a
  layer's rule at the same bit width (group size, outlier fraction, salience, rounding, AWQ
  scaling: whatever the environment's candidate rules vary; the search stays inside the action
  space, so ``predict`` can replay what it finds). Offspring are screened on the first token
  batch(es); the best ``survivors`` get a full evaluation; the ``population`` best of parents
  and children survive.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from qenv.agents.base import base_env, layer_index_of, play_episode, recipe_of, rule_to_action, score_recipe
from qenv.callbacks import report_scored_episode
from qenv.envs.allocation import greedy_allocation
from qenv.envs.spaces import RULE_KINDS
from qenv.errors import QenvError
from qenv.eval.sensitivity import rule_errors
from qenv.io import read_json, write_json_atomic
from qenv.quant.presets import LLAMACPP_PRESETS, preset
from qenv.quant.rules import Recipe, Rule

FORMAT = "qenv-searcher"
_TOL = 1e-9
_SUMMARY_KEYS = ("model", "bpw", "model_mb", "kl", "ppl", "top1", "reference_kl", "reference_ppl", "reference_top1",
                 "reference", "fidelity_reward", "budget_bpw", "episode_return", "budget_met", "mix")


def _to_json(action: Any) -> Any:
    arr = np.asarray(action)
    return arr.item() if arr.ndim == 0 else arr.tolist()


class Searcher:
    """Base class: budget bookkeeping, env evaluation, replay, save/load."""

    name: ClassVar[str] = "searcher"
    action_kinds: ClassVar[tuple[str, ...]] = RULE_KINDS
    #: evaluations of ``search()`` when no budget is given
    default_evaluations: ClassVar[int] = 32

    def __init__(self, env: Any, seed: int = 0, verbose: int = 0, pool: Any = None) -> None:
        self._kwargs: dict[str, Any] = {"verbose": verbose}
        self.seed = int(seed)
        self.verbose = int(verbose)
        self.pool = pool  # None: evaluate here, one recipe at a time
        self._reset_state()
        self._bind(env)

    # -- setup -----------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.history: list[float] = []
        self.evaluations = 0  # full evaluations (episodes or direct)
        self.screenings = 0  # cheap evaluations (evolution)
        self.spent = 0.0  # evaluation budget used, in full evaluations
        self.num_timesteps = 0
        self.best_reward = -math.inf
        self.best_recipe: Recipe | None = None
        self.best_info: dict[str, Any] | None = None
        self.best_actions: list[Any] | None = None
        self._seen: dict[tuple[int, ...], float] = {}
        self._pooled: dict[tuple[int, ...], dict[str, Any]] = {}  # scored by the pool, not yet recorded
        self._pooled_screens: dict[tuple[int, ...], float] = {}
        self._step = np.zeros(1, dtype=np.int64)
        self._limit = 0.0
        self._stop = False
        self._callback: Any = None
        self._bar: Any = None

    def _bind(self, env: Any) -> None:
        inner = base_env(env)
        if len(inner.tasks) > 1:
            raise QenvError(f"Searcher {self.name!r} optimizes a recipe for one model, and this env holds "
                            f"{len(inner.tasks)}.", "make the environment with a single model.")
        self.env = env
        self.inner = inner
        self.task = inner.task
        self.layer_names = [info.name for info in self.task.layers]
        self.n_layers = len(self.layer_names)
        self.rules: list[Rule] = list(inner.mapper.rules)
        self.actions = [rule_to_action(inner.mapper, rule) for rule in self.rules]
        self.costs = np.asarray(self.task.costs, dtype=np.float64)
        self.budget_bits = float(inner.budget_bits)
        self.numel = np.array([info.numel for info in self.task.layers], dtype=np.float64)
        self.action_kind = inner.mapper.kind
        self._sensitivity: np.ndarray | None = None

    # -- budget ----------------------------------------------------------------------------------
    def evaluations_for(self, total_timesteps: int) -> int:
        """Evaluations granted by a step budget: one per episode an RL agent could play."""
        return max(1, int(total_timesteps) // self.n_layers)

    def _can_spend(self, cost: float = 1.0) -> bool:
        return not self._stop and self.spent + cost <= self._limit + 1e-9

    def _total(self, choice: np.ndarray) -> float:
        return float(self.costs[np.arange(self.n_layers), choice].sum())

    def feasible(self, choice: np.ndarray) -> bool:
        """True when the recipe (rule indices per layer) meets the hard budget."""
        return self._total(choice) <= self.budget_bits + _TOL

    # -- evaluation ------------------------------------------------------------------------------
    def _evaluate(self, choice: np.ndarray) -> float:
        """Play the recipe as one episode; its return is the environment's reward."""
        key = tuple(int(i) for i in choice)
        if key in self._seen:
            return self._seen[key]
        if key in self._pooled:  # already played in the pool's env (see _prefetch)
            info = dict(self._pooled.pop(key))
            total = float(info.pop("reward"))
        else:
            info = play_episode(self.env, [self.actions[i] for i in key])
            total = float(info.pop("reward"))
        self.num_timesteps += self.n_layers
        self._seen[key] = total
        self._record(total, info, recipe_of(info), [self.actions[i] for i in key])
        return total

    def _recipe_of(self, choice: tuple[int, ...]) -> Recipe:
        return Recipe({name: self.rules[j] for name, j in zip(self.layer_names, choice)})

    def _batch_size(self) -> int:
        """Recipes proposed before evaluating: one here, two rounds of the pool's workers with a pool."""
        if self.pool is None:
            return 1
        return max(1, min(2 * int(getattr(self.pool, "n_workers", 1)), int(self._limit - self.spent + 1e-9)))

    def _prefetch(self, choices: Any) -> None:
        """With a ``pool``: score at once, in parallel, the new recipes among ``choices`` that a loop
        evaluating them in order would reach within the budget; ``_evaluate`` then records their
        results (the same episode, played in the pool's env) instead of playing them here."""
        if self.pool is None:
            return
        spent, batch = self.spent, []
        for choice in choices:
            if self._stop or spent + 1.0 > self._limit + 1e-9:
                break
            key = tuple(int(i) for i in choice)
            if key not in self._seen and key not in self._pooled and key not in batch:
                batch.append(key)
                spent += 1.0
        if batch:
            self._pooled.update(zip(batch, self.pool.evaluate([self._recipe_of(key) for key in batch])))

    def _record(self, reward: float, info: dict[str, Any], recipe: Recipe, actions: list[Any]) -> None:
        self.evaluations += 1
        self.spent += 1.0
        if reward > self.best_reward:
            self.best_reward, self.best_info, self.best_recipe, self.best_actions = reward, info, recipe, actions
            if self.verbose:
                print(f"[{self.name}] evaluation {self.evaluations}: reward {reward:.4f}  "
                      f"kl {info.get('kl', math.nan):.4g}  bpw {info.get('bpw', math.nan):.3f}")
        self.history.append(self.best_reward)
        if self._bar is not None:
            self._bar.update(1)
        if self._callback is not None and self._callback(self) is False:
            self._stop = True

    # -- protocol --------------------------------------------------------------------------------
    def learn(self, total_timesteps: int, callback: Any = None, progress_bar: bool = False) -> Searcher:
        """Search with ``total_timesteps // n_layers`` more evaluations (continues earlier calls).

        ``callback(searcher)`` is called after each full evaluation; returning ``False`` stops.
        """
        if getattr(self, "env", None) is None:
            raise QenvError(f"This {self.name} searcher was loaded without an environment.",
                            "load it with load(path, env=env) to search further.")
        if callback is not None and (hasattr(callback, "init_callback") or not callable(callback)):
            raise QenvError("Searchers take a plain function as callback: callback(searcher) -> bool | None.",
                            "wrap SB3 callbacks' logic in a function, or leave callback unset.")
        n = self.evaluations_for(total_timesteps)
        self._limit = self.spent + n
        self._stop = False
        self._callback = callback
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=n, desc=self.name, unit="eval")
        try:
            with torch.inference_mode():
                self._search()
        finally:
            if self._bar is not None:
                self._bar.close()
            self._bar, self._callback = None, None
        return self

    def _search(self) -> None:
        raise NotImplementedError

    def default_timesteps(self) -> int:
        """The step budget of ``search()`` when none is given: ``default_evaluations`` episodes."""
        return self.default_evaluations * self.n_layers

    def search(self, env: Any = None, total_timesteps: int | None = None) -> tuple[Recipe, dict[str, Any]]:
        """The best recipe and its info, searching first if needed (``default_evaluations``)."""
        if env is not None and getattr(self, "env", None) is not env:
            self._reset_state()
            self._bind(env)
        if self.best_recipe is None or total_timesteps is not None:
            self.learn(total_timesteps if total_timesteps is not None else self.default_timesteps())
        if self.best_recipe is None or self.best_info is None:
            raise QenvError(f"Searcher {self.name!r} found no recipe.", "give it a larger budget.")
        return self.best_recipe, dict(self.best_info)

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The best recipe's action for the current layer of each observation.

        The step index is tracked per observation row (and returned as ``state``); it restarts
        where ``episode_start`` is true or where the observation is the first of an episode.
        """
        if self.best_actions is None:
            raise QenvError(f"Searcher {self.name!r} has no recipe yet.", "call learn() or search() first.")
        obs = np.asarray(observation)
        batched = obs.ndim == 2
        rows = obs.shape[0] if batched else 1
        if state is not None and np.size(state) == rows:
            steps = np.asarray(state, dtype=np.int64).reshape(-1).copy()
        else:
            steps = self._step.copy() if self._step.size == rows else np.zeros(rows, dtype=np.int64)
        if episode_start is not None and np.size(episode_start) == rows:
            steps[np.asarray(episode_start, dtype=bool).reshape(-1)] = 0
        from_obs = layer_index_of(obs.reshape(rows, -1), self.n_layers)
        if from_obs is not None:
            steps[from_obs == 0] = 0
        index = np.clip(steps, 0, self.n_layers - 1)
        actions = np.stack([np.asarray(self.best_actions[i]) for i in index])
        self._step = steps + 1
        return (actions if batched else actions[0]), self._step.copy()

    def save(self, path: str | Path) -> Path:
        """Write the best recipe and the search's record as JSON (``.json`` added if no suffix)."""
        if self.best_recipe is None or self.best_actions is None:
            raise QenvError(f"Searcher {self.name!r} has nothing to save yet.", "call learn() or search() first.")
        path = Path(path)
        if not path.suffix:
            path = path.with_name(path.name + ".json")
        info = self.best_info or {}
        payload = {
            "format": FORMAT, "version": 1, "agent": self.name, "seed": self.seed, "hyperparams": self._kwargs,
            "model": info.get("model"), "budget_bpw": info.get("budget_bpw"), "action_kind": self.action_kind,
            "reward": self.best_reward, "evaluations": self.evaluations, "screenings": self.screenings,
            "history": self.history, "layers": self.layer_names,
            "actions": [_to_json(a) for a in self.best_actions],
            "metrics": {k: info[k] for k in _SUMMARY_KEYS if k in info},
            "rules": self.best_recipe.to_dict(),
        }
        return write_json_atomic(path, payload)

    @classmethod
    def load(cls, path: str | Path, env: Any = None) -> Searcher:
        """Load a saved searcher; with ``env`` it can replay on it (checked) and search further."""
        path = Path(path)
        if not path.is_file() and path.with_name(path.name + ".json").is_file():
            path = path.with_name(path.name + ".json")
        data = read_json(path, "Saved searcher", "pass the JSON file written by searcher.save().")
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise QenvError(f"{path} was not written by a qenv searcher.", "pass the JSON written by searcher.save().")
        klass = SEARCHERS.get(str(data.get("agent")))
        if klass is None or not issubclass(klass, cls):
            raise QenvError(f"{path} holds a {data.get('agent')!r} searcher, not a {cls.name!r} one.",
                            f"load it with the {data.get('agent')!r} agent.")
        recipe = Recipe.from_dict(data["rules"])
        if env is not None:
            obj = klass(env, seed=int(data.get("seed", 0)), **data.get("hyperparams", {}))
            if obj.layer_names != list(data["layers"]):
                raise QenvError(f"{path} was searched on a model whose layers differ from this environment's "
                                f"({data.get('model')!r}).", "load it with an environment of the same model.")
            actions = obj._actions_for(recipe)
        else:
            obj = klass.__new__(klass)
            obj.seed, obj.verbose, obj._kwargs = int(data.get("seed", 0)), 0, dict(data.get("hyperparams", {}))
            obj._reset_state()
            obj.env = None
            obj.layer_names = list(data["layers"])
            obj.n_layers = len(obj.layer_names)
            obj.action_kind = data.get("action_kind")
            actions = [np.asarray(a, dtype=np.float32 if data.get("action_kind") == "continuous" else np.int64)
                       for a in data["actions"]]
        obj.best_recipe, obj.best_actions, obj.best_reward = recipe, actions, float(data.get("reward", -math.inf))
        obj.best_info = {**data.get("metrics", {}), "recipe": {n: r.label() for n, r in recipe.items()},
                         "recipe_rules": recipe.to_dict()}
        obj.history = [float(x) for x in data.get("history", [])]
        obj.evaluations = int(data.get("evaluations", len(obj.history)))
        obj.spent = float(obj.evaluations)
        return obj

    # -- helpers for subclasses ------------------------------------------------------------------
    def _actions_for(self, recipe: Recipe) -> list[Any]:
        """Actions replaying ``recipe``; a rule the space cannot produce maps to the nearest one."""
        return [self.actions[self._nearest_rule(i, recipe.rule_for(name))] for i, name in enumerate(self.layer_names)]

    def _nearest_rule(self, i: int, rule: Rule) -> int:
        if rule in self.rules:
            return self.rules.index(rule)
        info = self.task.layers[i]
        from qenv.quant.rules import layer_bits

        target = layer_bits(rule, info.out_features, info.in_features)
        # act_scale last: the env makes a layer inherit its input group's AWQ scale, so a recipe's rule can
        # differ from the action that produced it in act_scale alone
        names = [f.name for f in fields(Rule) if f.name != "act_scale"]

        def distance(j: int) -> tuple[float, int, bool, int]:
            other = self.rules[j]
            mismatches = sum(getattr(other, n) != getattr(rule, n) for n in names)
            return abs(self.costs[i, j] - target), mismatches, other.act_scale != rule.act_scale, j

        return min(range(len(self.rules)), key=distance)

    def __repr__(self) -> str:
        best = "none" if self.best_reward == -math.inf else f"{self.best_reward:.4f}"
        return f"{type(self).__name__}(seed={self.seed}, evaluations={self.evaluations}, best_reward={best})"


class UniformSearch(Searcher):
    """The best single rule of the env's candidate rules that fits the budget on every layer."""

    name = "uniform"

    def candidates(self) -> list[int]:
        totals = self.costs.sum(axis=0)
        fits = [j for j in range(len(self.rules)) if totals[j] <= self.budget_bits + _TOL]
        if not fits:  # only possible outside the hard budget mode: the cheapest uniform rule
            fits = [int(np.argmin(totals))]
        return sorted(fits, key=lambda j: (-totals[j], j))

    def _search(self) -> None:
        self._prefetch([np.full(self.n_layers, j) for j in self.candidates()])
        for j in self.candidates():
            choice = np.full(self.n_layers, j)
            if tuple(choice) in self._seen:
                continue
            if not self._can_spend():
                break
            self._evaluate(choice)

    def default_timesteps(self) -> int:
        return len(self.candidates()) * self.n_layers


class LlamaCppSearch(Searcher):
    """llama.cpp's own mixes (``llama-quantize`` Q2_K ... Q6_K, IQ2_XS ... IQ4_XS, with the importance
    matrix where it exists): the largest that fits, the imatrix variant on a tie; else the nearest."""

    name = "llamacpp"
    default_evaluations = 1
    MIXES: ClassVar[tuple[str, ...]] = LLAMACPP_PRESETS

    def choose(self) -> tuple[str, Recipe, float]:
        options = []
        for mix in self.MIXES:
            recipe = preset(mix, self.task.layers)
            options.append((mix.upper(), recipe, self.task.evaluator.size(recipe)[0]))
        budget = self.inner.budget_bpw
        fits = [o for o in options if o[2] <= budget + _TOL]
        if fits:
            return max(fits, key=lambda o: (o[2], o[0].endswith("-IM"), o[0]))
        return min(options, key=lambda o: (abs(o[2] - budget), not o[0].endswith("-IM"), o[0]))

    def _search(self) -> None:
        if self.best_recipe is not None or not self._can_spend():
            return
        mix, recipe, _ = self.choose()
        reward, info = score_recipe(self.inner, recipe)
        info["mix"] = mix
        # scored, not played (the mix's rules are not all in the action space): report it to a recorder
        report_scored_episode(self.env, info, reward, self.n_layers)
        self._record(reward, info, recipe, self._actions_for(recipe))


class GreedySearch(Searcher):
    """HAWQ-style: upgrade the layer with the best output-error drop per extra bit, in budget."""

    name = "greedy"
    default_evaluations = 1

    def sensitivity(self) -> np.ndarray:
        """``[n_layers, n_rules]`` measured output error × layer size (computed once, cached on disk)."""
        if self._sensitivity is None:
            err = rule_errors(self.task.evaluator, self.task.layers, self.rules)
            self._sensitivity = err * self.numel[:, None]
        return self._sensitivity

    def allocate(self) -> np.ndarray:
        return greedy_allocation(self.costs, self.sensitivity(), self.budget_bits)

    def _search(self) -> None:
        if self.best_recipe is not None or not self._can_spend():
            return
        choice = self.allocate()
        self._prefetch([choice])
        self._evaluate(choice)


def sample_feasible(costs: np.ndarray, budget_bits: float, rng: np.random.Generator) -> np.ndarray:
    """A random recipe under the budget: layers in random order, each picking uniformly among the
    rules that leave the remaining layers room for their cheapest rules."""
    n = costs.shape[0]
    order = rng.permutation(n)
    cheapest = costs.min(axis=1)[order]
    rest = np.concatenate([np.cumsum(cheapest[::-1])[::-1], [0.0]])
    choice = np.zeros(n, dtype=np.int64)
    spent = 0.0
    for k, i in enumerate(order):
        allowed = budget_bits - spent - rest[k + 1]
        options = np.flatnonzero(costs[i] <= allowed + _TOL)
        if options.size == 0:
            options = np.array([int(np.argmin(costs[i]))])
        j = int(rng.choice(options))
        choice[i] = j
        spent += costs[i, j]
    return choice


class RandomSearch(Searcher):
    """Random budget-feasible recipes; keeps the best."""

    name = "random"
    default_evaluations = 32

    def _search(self) -> None:
        misses = 0
        while self._can_spend() and misses < 1000:
            batch: list[tuple[int, ...]] = []  # one recipe at a time, or a round for the pool
            while len(batch) < self._batch_size() and misses < 1000:
                choice = tuple(int(i) for i in sample_feasible(self.costs, self.budget_bits, self.rng))
                if choice in self._seen or choice in batch:
                    misses += 1
                    continue
                misses = 0
                batch.append(choice)
            self._prefetch(batch)
            for choice in batch:
                if not self._can_spend():
                    break
                self._evaluate(np.array(choice))


class EvolutionSearch(Searcher):
    """EvoPress-like evolutionary search over recipes at (nearly) constant size.

    Args:
        population: parents kept between generations.
        offspring: children proposed per generation (screened cheaply).
        survivors: children per generation that get a full evaluation.
        max_mutations: each child gets 1..max_mutations mutations.
        crossover: probability that a child starts as a block-wise crossover of two parents.
        knob_rate: probability that a mutation switches one knob of a rule (same bit width)
            instead of moving bits.
        screen_batches: token batches of the cheap screening (0 or None: no screening, every
            child gets a full evaluation).
    """

    name = "evolution"
    default_evaluations = 48

    def __init__(self, env: Any, seed: int = 0, verbose: int = 0, population: int = 4, offspring: int = 8,
                 survivors: int = 2, max_mutations: int = 3, crossover: float = 0.25, knob_rate: float = 0.3,
                 screen_batches: int | None = 1, pool: Any = None) -> None:
        for label, value in (("population", population), ("offspring", offspring), ("survivors", survivors),
                             ("max_mutations", max_mutations)):
            if int(value) < 1:
                raise QenvError(f"evolution {label}={value} must be at least 1.")
        for label, value in (("crossover", crossover), ("knob_rate", knob_rate)):
            if not 0.0 <= float(value) <= 1.0:
                raise QenvError(f"evolution {label}={value} must be a probability in [0, 1].")
        self.population_size, self.offspring, self.survivors = int(population), int(offspring), int(survivors)
        self.max_mutations, self.crossover, self.knob_rate = int(max_mutations), float(crossover), float(knob_rate)
        self.screen_batches = int(screen_batches or 0)
        super().__init__(env, seed=seed, verbose=verbose, pool=pool)
        self._kwargs.update(population=population, offspring=offspring, survivors=survivors,
                            max_mutations=max_mutations, crossover=crossover, knob_rate=knob_rate,
                            screen_batches=screen_batches)

    def _reset_state(self) -> None:
        super()._reset_state()
        self.population: list[tuple[float, tuple[int, ...]]] = []  # (reward, rule indices), best first
        self._screened: dict[tuple[int, ...], float] = {}

    def _bind(self, env: Any) -> None:
        super()._bind(env)
        self._prepare_moves()

    # -- structure of the rule set ---------------------------------------------------------------
    def _prepare_moves(self) -> None:
        # the same bit width with one other knob changed (group, outliers, salience, rounding, ...);
        # a rule with no such neighbour may switch to any other rule of its bit width
        names = [f.name for f in fields(Rule) if f.name != "bits"]
        self._knob_neighbours = []
        for rule in self.rules:
            same_bits = [k for k, other in enumerate(self.rules) if other.bits == rule.bits and other != rule]
            one_knob = [k for k in same_bits if sum(getattr(self.rules[k], n) != getattr(rule, n) for n in names) == 1]
            self._knob_neighbours.append(one_knob or same_bits)
        layers = self.task.layers
        self._blocks = np.array([info.block for info in layers])
        n_batches = len(self.task.evaluator.batches)
        self.screen_cost = self.screen_batches / n_batches if 0 < self.screen_batches < n_batches else 0.0

    def _levels(self, i: int, choice: np.ndarray, up: bool) -> np.ndarray:
        """Rules of layer ``i`` one cost level above (or below) its current rule."""
        costs = self.costs[i]
        current = costs[choice[i]]
        other = costs[costs > current + _TOL] if up else costs[costs < current - _TOL]
        if other.size == 0:
            return np.array([], dtype=np.int64)
        level = other.min() if up else other.max()
        return np.flatnonzero(np.abs(costs - level) <= _TOL)

    # -- variation -------------------------------------------------------------------------------
    def _repair(self, choice: np.ndarray, keep: int | None = None) -> np.ndarray:
        """Lower random layers one level at a time until the recipe meets the budget."""
        total = self._total(choice)
        while total > self.budget_bits + _TOL:
            lowerable = [i for i in range(self.n_layers) if i != keep and self._levels(i, choice, up=False).size]
            if not lowerable:
                lowerable = [i for i in range(self.n_layers) if self._levels(i, choice, up=False).size]
            i = int(self.rng.choice(lowerable))
            j = int(self.rng.choice(self._levels(i, choice, up=False)))
            total += self.costs[i, j] - self.costs[i, choice[i]]
            choice[i] = j
        return choice

    def _fill(self, choice: np.ndarray) -> np.ndarray:
        """Raise random layers one level at a time while the budget allows."""
        total = self._total(choice)
        while True:
            ups = []
            for i in range(self.n_layers):
                level = self._levels(i, choice, up=True)
                if level.size and total + self.costs[i, level[0]] - self.costs[i, choice[i]] <= self.budget_bits + _TOL:
                    ups.append((i, level))
            if not ups:
                return choice
            i, level = ups[int(self.rng.integers(len(ups)))]
            j = int(self.rng.choice(level))
            total += self.costs[i, j] - self.costs[i, choice[i]]
            choice[i] = j

    def _mutate(self, choice: np.ndarray) -> np.ndarray:
        i = int(self.rng.integers(self.n_layers))
        knobs = self._knob_neighbours[choice[i]]
        if knobs and self.rng.random() < self.knob_rate:
            choice[i] = int(self.rng.choice(knobs))  # switch one knob of this layer's rule
            return self._fill(self._repair(choice, keep=i))
        ups = [k for k in range(self.n_layers) if self._levels(k, choice, up=True).size]
        if not ups:
            return choice
        i = int(self.rng.choice(ups))  # move bits: raise one layer a level, lower others to pay for it
        choice[i] = int(self.rng.choice(self._levels(i, choice, up=True)))
        return self._fill(self._repair(choice, keep=i))

    def _crossover(self, a: tuple[int, ...], b: tuple[int, ...]) -> np.ndarray:
        blocks = np.unique(self._blocks)
        take_a = dict(zip(blocks.tolist(), (self.rng.random(blocks.size) < 0.5).tolist()))
        child = np.array([a[i] if take_a[int(self._blocks[i])] else b[i] for i in range(self.n_layers)])
        return self._fill(self._repair(child))

    def _parent(self) -> tuple[int, ...]:
        """Rank-biased choice: the best parent is the likeliest."""
        n = len(self.population)
        weights = np.arange(n, 0, -1, dtype=np.float64)
        return self.population[int(self.rng.choice(n, p=weights / weights.sum()))][1]

    def _child(self) -> np.ndarray:
        if len(self.population) > 1 and self.rng.random() < self.crossover:
            a = self._parent()
            b = self._parent()
            child = self._crossover(a, b)
        else:
            child = np.array(self._parent())
        for _ in range(int(self.rng.integers(1, self.max_mutations + 1))):
            child = self._mutate(child)
        return child

    # -- selection -------------------------------------------------------------------------------
    def _screen(self, choice: tuple[int, ...]) -> float:
        if choice in self._pooled_screens:  # screened by the pool (see _prefetch_screens)
            self._screened[choice] = self._pooled_screens.pop(choice)
            self.screenings += 1
            self.spent += self.screen_cost
        elif choice not in self._screened:
            recipe = Recipe({name: self.rules[j] for name, j in zip(self.layer_names, choice)})
            self._screened[choice] = score_recipe(self.inner, recipe, max_batches=self.screen_batches)[0]
            self.screenings += 1
            self.spent += self.screen_cost
        return self._screened[choice]

    def _prefetch_screens(self, children: list[tuple[int, ...]]) -> None:
        """With a ``pool``: screen at once, in parallel, the children the screening loop will reach."""
        if self.pool is None:
            return
        spent, batch = self.spent, []
        for child in children:
            if self._stop or spent + self.screen_cost + 1.0 > self._limit + 1e-9:
                break
            if child not in self._screened and child not in self._pooled_screens and child not in batch:
                batch.append(child)
                spent += self.screen_cost
        if batch:
            results = self.pool.evaluate([self._recipe_of(c) for c in batch], max_batches=self.screen_batches)
            self._pooled_screens.update((c, r["reward"]) for c, r in zip(batch, results))

    def _admit(self, choice: tuple[int, ...], reward: float) -> None:
        if all(c != choice for _, c in self.population):
            self.population.append((reward, choice))
        self.population.sort(key=lambda rc: -rc[0])
        del self.population[self.population_size:]

    def _initial(self) -> list[np.ndarray]:
        totals = self.costs.sum(axis=0)
        fits = [j for j in range(len(self.rules)) if totals[j] <= self.budget_bits + _TOL]
        start = [self._fill(np.full(self.n_layers, max(fits, key=lambda j: (totals[j], -j))))] if fits else []
        while len(start) < self.population_size:
            start.append(self._fill(sample_feasible(self.costs, self.budget_bits, self.rng)))
        return start

    def _search(self) -> None:
        if not self.population:
            initial = self._initial()
            self._prefetch(initial)
            for choice in initial:
                if not self._can_spend():
                    return
                self._admit(tuple(int(i) for i in choice), self._evaluate(choice))
        while self._can_spend():
            children: list[tuple[int, ...]] = []
            tries = 0
            while len(children) < self.offspring and tries < 20 * self.offspring:
                tries += 1
                child = tuple(int(i) for i in self._child())
                if child not in self._seen and child not in children:
                    children.append(child)
            if not children:
                return  # the neighbourhood is exhausted
            if self.screen_cost > 0 and len(children) > self.survivors:
                screened = []
                self._prefetch_screens(children)
                for child in children:
                    if not self._can_spend(self.screen_cost + 1.0):
                        break
                    screened.append((self._screen(child), child))
                screened.sort(key=lambda sc: -sc[0])
                children = [c for _, c in screened[: self.survivors]] or children[:1]
            self._prefetch(children)
            for child in children:
                if not self._can_spend():
                    return
                self._admit(child, self._evaluate(np.array(child)))


SEARCHERS: dict[str, type[Searcher]] = {
    cls.name: cls for cls in (UniformSearch, LlamaCppSearch, GreedySearch, RandomSearch, EvolutionSearch)
}
