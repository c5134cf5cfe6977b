"""Searchers: recipes found without training a policy, behind the same agent protocol.

Every searcher scores a recipe with the environment itself: a recipe is played as one episode
(one action per layer), so its reward is exactly the environment's (fidelity against the
uniform frontier ``task.reference(budget)``), computed by the same evaluator with the same
streaming prefix cache. Only recipes that the action space cannot express (the llama.cpp
mixes) and the screenings (evolution, greedy's refinement) are scored directly, by
:func:`qenv.agents.base.score_recipe` with the same evaluator and reward formula.

Budgets are comparable: ``learn(total_timesteps)`` grants ``total_timesteps // n_layers``
evaluations (at least one), the number of episodes an RL agent would play with the same steps.
A full evaluation costs 1; a screening on the first ``b`` of the ``n`` token batches costs
``b / n``. ``history`` holds the best reward after each full
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
the best start's candidates; evolution and greedy: each screening stage and its survivors; uniform:
the candidates) in parallel on the pool's workers, each playing the recipe as
an episode of its own copy of the env. Results, records and budgets are those of the default
in-process evaluation (``pool=None``), in the same order.

- ``uniform``: the best single rule (of the environment's candidate rules) that fits the budget
  on every layer; candidates are tried costliest first.
- ``llamacpp``: llama.cpp's own mixes (:mod:`qenv.quant.presets`, quantized by llama.cpp), the
  largest that fits, else the nearest.
- ``greedy``: HAWQ-style allocation (the upgrade with the largest drop in measured output error
  per extra bit, until nothing fits), measured first, then corrected end to end: the proxy's
  best-predicted single-layer changes are screened and measured, and only a measured improvement is
  kept (a few evaluations, not one; it stops at a local optimum).
- ``random``: random budget-feasible recipes (layers visited in random order, each picking
  uniformly among the rules that leave the rest feasible); keeps the best.
- ``evolution``: greedy first (its refinement, the same code, until its local optimum), then
  EvoPress-style (1 + λ) evolution from greedy's result: level-switch mutations that move bits between
  layers of one shape at constant size (and knob switches at the same width), multi-step
  selection (every child screened on a few token batches, the best on more, then all of them).

``greedy``, ``random`` and ``evolution`` start from the **best start**
(:mod:`qenv.envs.start`): greedy's plan, every human preset the action space can express at or
under the budget and every uniform rule that fits, each measured end to end and counted as a full
evaluation. With a budget at least the number of these candidates (``len(start_candidates())``),
none of them can return a recipe worse on its calibration tokens than the best human recipe it could
have returned as is; ``self.start`` records what was measured. ``uniform`` and ``llamacpp`` are the
human points themselves and do not search.

**The final pick on tokens the search did not fit** (issue 24 item 6). With ``validation_fraction > 0``
the env holds that share of its calibration sequences back (``task.validation_tokens``: never in an
episode, a screening or GPTQ/AWQ's calibration). At the end of each ``learn`` a searcher compares its
finalists (:meth:`Searcher._finalists`: the best ``finalists`` recipes by calibration reward and the
best start; greedy adds its proxy plan) by KL on the held-back tokens
(:meth:`Searcher._pick_on_validation`, one helper for all) and returns the lowest, so that the pick is
not the recipe that best fits the tokens it was tuned on (at 4 bits a search fits 2048 calibration
tokens rather than the model). These validation evaluations (``validations``; a fraction of the
calibration tokens each) are reported, not charged to the search's budget. ``best_info`` holds the
pick's ``validation_kl`` and each finalist's calibration and validation KL.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from qenv.agents.base import base_env, layer_index_of, play_episode, recipe_of, rule_to_action, score_recipe
from qenv.training.episodes import report_scored_episode
from qenv.envs.allocation import greedy_allocation
from qenv.envs.spaces import RULE_KINDS
from qenv.envs.start import BestStart, StartCandidate, best_start, start_candidates
from qenv.errors import QenvError
from qenv.eval.sensitivity import rule_errors
from qenv.io import read_json, write_json_atomic
from qenv.quant.presets import LLAMACPP_PRESETS, preset
from qenv.quant.rules import Recipe, Rule

FORMAT = "qenv-searcher"
_TOL = 1e-9
_SUMMARY_KEYS = ("model", "bpw", "model_mb", "kl", "ppl", "top1", "reference_kl", "reference_ppl", "reference_top1",
                 "reference", "fidelity_reward", "budget_bpw", "episode_return", "budget_met", "mix", "validation_kl")


def _to_json(action: Any) -> Any:
    arr = np.asarray(action)
    return arr.item() if arr.ndim == 0 else arr.tolist()



def check_saved_searcher(data: dict[str, Any], path: Path, klass: type) -> None:
    """A saved searcher (a file: input) checked field by field before anything is built from it, so
    that damage is one error naming the field, not a ``TypeError``/``KeyError`` from deep inside."""
    from qenv.agents.registry import check_hyperparams

    fix = "pass the model.json written by a searcher (train_agent.py), or run the search again."

    def bad(why: str) -> QenvError:
        return QenvError(f"Saved searcher {path} is damaged ({why}).", fix)

    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise bad(f"seed={seed!r} is not a whole number of at least 0")
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(n, str) for n in layers):
        raise bad("it lists no layers" if not layers else "layers is not a list of layer names")
    actions = data.get("actions")
    if not isinstance(actions, list) or len(actions) != len(layers):
        raise bad(f"actions is not a list of one action per layer ({len(layers)})")
    if not isinstance(data.get("rules"), dict):
        raise bad("rules is not a JSON object of layer rules")
    hyperparams = data.get("hyperparams", {})
    if not isinstance(hyperparams, dict):
        raise bad("hyperparams is not a JSON object")
    if "pool" in hyperparams:  # a worker pool is a live object of the caller, never a file's value
        raise bad("hyperparams names a pool")
    check_hyperparams(str(getattr(klass, "name", data.get("agent"))), hyperparams, f"Saved searcher {path}")
    for key in ("reward", "evaluations"):
        value = data.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"{key}={value!r} is not a number")
    history = data.get("history", [])
    if not isinstance(history, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                for x in history):
        raise bad("history is not a list of numbers")
    metrics = data.get("metrics", {})
    if not isinstance(metrics, dict):
        raise bad("metrics is not a JSON object")


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
        self.start: BestStart | None = None  # what the best start measured (searchers that search)
        self._top = -math.inf  # the best calibration reward so far (what ``history`` tracks)
        self._played: dict[tuple[int, ...], tuple[Recipe, dict[str, Any], list[Any]]] = {}  # evaluated recipes
        self._validated: dict[tuple[int, ...], float] = {}  # recipe -> KL on the held-back validation tokens
        self.validations = 0  # evaluations on the validation tokens (the final pick; not charged to the budget)
        self._seen: dict[tuple[int, ...], float] = {}
        self._pooled: dict[tuple[int, ...], dict[str, Any]] = {}  # scored by the pool, not yet recorded
        self._screened: dict[tuple[tuple[int, ...], int], float] = {}  # (recipe, batches) -> reward
        self._pooled_screens: dict[tuple[tuple[int, ...], int], float] = {}
        self._proposed: set[tuple[int, ...]] = set()  # recipes a search proposed (screened or evaluated)
        self._step = np.zeros(1, dtype=np.int64)
        self._limit = 0.0
        self._stop = False
        self._callback: Any = None
        self._bar: Any = None
        self._bar_mark = 0.0  # budget spent when the bar last moved

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
        self._candidates: list[StartCandidate] | None = None
        self.n_batches = len(self.task.evaluator.batches)

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
        recipe, actions = recipe_of(info), [self.actions[i] for i in key]
        self._played[key] = (recipe, info, actions)
        self._record(total, info, recipe, actions)
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
        if reward > self._top:
            self._top = reward
            self.best_reward, self.best_info, self.best_recipe, self.best_actions = reward, info, recipe, actions
            if self.verbose:
                print(f"[{self.name}] evaluation {self.evaluations}: reward {reward:.4f}  "
                      f"kl {info.get('kl', math.nan):.4g}  bpw {info.get('bpw', math.nan):.3f}")
        self.history.append(self._top)
        self._advance_bar()
        if self._callback is not None and self._callback(self) is False:
            self._stop = True


    # -- the best start (issue 24: every search starts where the humans are) ----------------------
    def sensitivity(self) -> np.ndarray:
        """``[n_layers, n_rules]`` measured output error × layer size (computed once, cached on disk):
        greedy's per-layer proxy."""
        if self._sensitivity is None:
            err = rule_errors(self.task.evaluator, self.task.layers, self.rules)
            self._sensitivity = err * self.numel[:, None]
        return self._sensitivity

    def start_candidates(self) -> list[StartCandidate]:
        """Greedy's plan, the human presets the action space can express and the uniform rules, at or
        under the budget (:func:`qenv.envs.start.start_candidates`)."""
        if self._candidates is None:
            self._candidates = start_candidates(self.task.layers, self.rules, self.costs, self.budget_bits,
                                                self.sensitivity())
        return self._candidates

    def _start(self) -> bool:
        """Measure the best start (:func:`qenv.envs.start.best_start`), each candidate as a full
        evaluation counted like any other; a budget cut short continues at the next ``learn``.
        True once every candidate is measured: from then on no result can be worse than the best
        of them, which ``self.start`` holds."""
        if self.start is not None and self.start.complete:
            return True
        candidates = self.start_candidates()
        self._prefetch([np.array(c.choice) for c in candidates])
        self._proposed.update(c.choice for c in candidates)

        def stop() -> bool:
            return not self._can_spend()

        result = best_start(candidates, lambda choice: self._evaluate(np.array(choice)), should_stop=stop)
        if result is not None:
            self.start = result
        return result is not None and result.complete

    # -- the final pick on tokens the search did not fit (issue 24 item 6) -------------------------
    #: finalists compared on the validation tokens: the best this many recipes by calibration reward
    finalists: ClassVar[int] = 4

    def _finalists(self) -> list[tuple[int, ...]]:
        """The recipes the final pick compares: the ``finalists`` best fully evaluated by calibration
        reward (ties: the first evaluated), then the best start, which a search must never lose to on
        the validation tokens either: the recipes a search tuned past it fit the calibration tokens and
        can be worse than it on tokens they did not see (evolution on stories260K at gptq-w3's size,
        learned menu: four finalists, all below the start on calibration and above it on validation).
        Searchers add other recipes they must never lose to."""
        order = sorted(self._played, key=lambda key: -self._seen[key])  # a stable sort: ties keep their order
        start = [] if self.start is None else [self.start.candidate.choice]
        return list(dict.fromkeys(order[:self.finalists] + start))

    def validation_kl(self, choice: tuple[int, ...]) -> float:
        """KL of an evaluated recipe (as it was played) on the task's validation tokens (cached)."""
        if choice not in self._validated:
            evaluator = self.task.validation_evaluator()
            assert evaluator is not None
            with torch.inference_mode():
                self._validated[choice] = float(evaluator.evaluate(self._played[choice][0]).kl)
            self.validations += 1
        return self._validated[choice]

    def _pick_on_validation(self) -> None:
        """With validation tokens held back (``validation_fraction > 0``): the returned recipe is the
        finalist with the lowest validation KL (ties: the better calibration reward), not the one that
        best fits the calibration tokens the search tuned on. ``best_info`` then holds its
        ``validation_kl`` and every finalist's calibration and validation KL. Without them: unchanged."""
        if self.task.validation_tokens is None or not self._played:
            return
        finalists = list(dict.fromkeys(key for key in self._finalists() if key in self._played))
        self._adopt(self._validation_pick(finalists), finalists)

    def _validation_pick(self, finalists: list[tuple[int, ...]]) -> tuple[int, ...]:
        """The finalist with the lowest validation KL (ties: the better calibration reward, then the
        earlier finalist)."""
        scores = [(self.validation_kl(key), -self._seen[key], rank) for rank, key in enumerate(finalists)]
        return finalists[min(range(len(finalists)), key=lambda k: scores[k])]

    def _adopt(self, pick: tuple[int, ...], finalists: list[tuple[int, ...]]) -> None:
        """Return ``pick`` (an evaluated recipe, validated) from now on; ``best_info`` says how every
        finalist measured on the calibration and the validation tokens."""
        recipe, info, actions = self._played[pick]
        info = dict(info)
        info["validation_kl"] = self._validated[pick]
        info["validation_finalists"] = [{"calibration_kl": self._played[key][1].get("kl"),
                                         "validation_kl": self._validated[key], "picked": key == pick}
                                        for key in finalists]
        self.best_reward, self.best_info, self.best_recipe, self.best_actions = self._seen[pick], info, recipe, actions

    def _best_choice(self) -> tuple[int, ...] | None:
        """The best fully evaluated recipe as menu indices (ties: the first evaluated)."""
        if not self._seen:
            return None
        best = max(self._seen.values())
        return next(key for key, value in self._seen.items() if value == best)

    # -- multi-step selection (EvoPress): many screened on a few tokens, the best on more ----------
    def _stage_batches(self, stages: Any) -> list[tuple[int, int]]:
        """``[(batches, keep), ...]`` of screening stages given as ``(fraction of the calibration
        tokens, keep)``: each fraction becomes whole token batches (at least one); a stage that
        would score every batch is the full evaluation, not a screening, and is dropped; stages that
        round to the same batches merge (the later's ``keep``)."""
        out: list[tuple[int, int]] = []
        for fraction, keep in stages:
            if not 0.0 < float(fraction) <= 1.0 or int(keep) < 1:
                raise QenvError(f"screening stage ({fraction}, {keep}) needs a token fraction in (0, 1] and keep >= 1.",
                                "give stages as (fraction, keep) pairs, e.g. ((0.125, 4), (0.5, 1)).")
            batches = min(self.n_batches, max(1, int(round(float(fraction) * self.n_batches))))
            if batches >= self.n_batches:
                continue
            if out and batches <= out[-1][0]:
                out[-1] = (out[-1][0], int(keep))
            else:
                out.append((batches, int(keep)))
        return out

    def screen_cost(self, batches: int) -> float:
        """The budget a screening on the first ``batches`` token batches costs, in full evaluations."""
        return batches / self.n_batches

    def _screen(self, choice: tuple[int, ...], batches: int) -> float:
        """The reward of a recipe on the first ``batches`` token batches (cached; charged once)."""
        key = (choice, batches)
        if key in self._pooled_screens:  # screened by the pool (see _prefetch_screens)
            self._screened[key] = self._pooled_screens.pop(key)
            self.screenings += 1
            self.spent += self.screen_cost(batches)
        elif key not in self._screened:
            self._screened[key] = score_recipe(self.inner, self._recipe_of(choice), max_batches=batches)[0]
            self.screenings += 1
            self.spent += self.screen_cost(batches)
        self._advance_bar()
        return self._screened[key]

    def _prefetch_screens(self, children: list[tuple[int, ...]], batches: int) -> None:
        """With a ``pool``: screen at once, in parallel, the children the screening loop will reach."""
        if self.pool is None:
            return
        spent, batch, cost = self.spent, [], self.screen_cost(batches)
        for child in children:
            if self._stop or spent + cost + 1.0 > self._limit + 1e-9:
                break
            key = (child, batches)
            if key not in self._screened and key not in self._pooled_screens and child not in batch:
                batch.append(child)
                spent += cost
        if batch:
            results = self.pool.evaluate([self._recipe_of(c) for c in batch], max_batches=batches)
            self._pooled_screens.update(((c, batches), r["reward"]) for c, r in zip(batch, results))

    def _select(self, children: list[tuple[int, ...]], stages: list[tuple[int, int]]) -> list[tuple[int, ...]]:
        """Multi-step selection: at each stage every child left is scored on that stage's first token
        batches and the best ``keep`` go on (ties: the first proposed); what is left gets the full
        evaluation. A stage is skipped when no more children are left than it keeps; the screening
        stops where the budget could no longer pay for one full evaluation after it."""
        for batches, keep in stages:
            if len(children) <= keep:
                continue
            self._prefetch_screens(children, batches)
            scored = []
            for child in children:
                if not self._can_spend(self.screen_cost(batches) + 1.0):
                    break
                scored.append((self._screen(child, batches), child))
            if not scored:
                return children[:1]
            order = sorted(range(len(scored)), key=lambda k: (-scored[k][0], k))
            children = [scored[k][1] for k in order[:keep]]
        return children

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
            from qenv.progress import progress_bar as make_bar

            self._bar = make_bar(self.planned_evaluations(n), desc=f"search {self.name}", unit="eval", show=True)
            self._bar_mark = self.spent
        try:
            with torch.inference_mode():
                self._search()
            self._pick_on_validation()
        finally:
            if self._bar is not None:
                from qenv.progress import shrink_to_done

                shrink_to_done(self._bar)  # stopped early (a converged search): the bar ends where it did
                self._bar.close()
            self._bar, self._callback = None, None
        return self

    def planned_evaluations(self, granted: int) -> float:
        """The budget this search will really spend of the ``granted`` evaluations (full evaluations;
        screenings count as their fraction of one): what its progress bar counts. Searchers that stop
        on their own (greedy, llamacpp: one recipe; uniform: the uniform rules that fit) say so."""
        return granted

    def _advance_bar(self) -> None:
        """Move the progress bar to the budget spent so far (evaluations and screenings)."""
        if self._bar is not None and self.spent > self._bar_mark:
            self._bar.update(self.spent - self._bar_mark)
            self._bar_mark = self.spent

    def _search(self) -> None:
        raise NotImplementedError

    def default_timesteps(self) -> int:
        """The step budget of ``search()`` when none is given: ``default_evaluations`` episodes."""
        return self.default_evaluations * self.n_layers

    def search(self, env: Any = None, total_timesteps: int | None = None,
               progress_bar: bool = False) -> tuple[Recipe, dict[str, Any]]:
        """The best recipe and its info, searching first if needed (``default_evaluations``)."""
        if env is not None and getattr(self, "env", None) is not env:
            self._reset_state()
            self._bind(env)
        if self.best_recipe is None or total_timesteps is not None:
            self.learn(total_timesteps if total_timesteps is not None else self.default_timesteps(),
                       progress_bar=progress_bar)
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
            "start": None if self.start is None else {"label": self.start.candidate.label, "reward": self.start.score,
                                                      "candidates": len(self.start.measured)},
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
        # exactly the class asked for (evolution is a subclass of greedy, and its file is no greedy's)
        if klass is None or not issubclass(klass, cls) or (cls is not Searcher and klass is not cls):
            raise QenvError(f"{path} holds a {data.get('agent')!r} searcher, not a {cls.name!r} one.",
                            f"load it with the {data.get('agent')!r} agent.")
        check_saved_searcher(data, path, klass)
        recipe = Recipe.from_dict(data["rules"])
        if env is not None:
            obj = klass(env, seed=int(data.get("seed", 0)), **data.get("hyperparams", {}))
            if obj.layer_names != list(data["layers"]):
                raise QenvError(f"{path} was searched on a model whose layers differ from this environment's "
                                f"({data.get('model')!r}).", "load it with an environment of the same model.")
            actions = obj._saved_actions(data.get("actions")) or obj._actions_for(recipe)
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
        obj._top = obj.best_reward
        obj.history = [float(x) for x in data.get("history", [])]
        obj.evaluations = int(data.get("evaluations", len(obj.history)))
        obj.spent = float(obj.evaluations)
        return obj

    # -- helpers for subclasses ------------------------------------------------------------------
    def _saved_actions(self, saved: Any) -> list[Any] | None:
        """The saved actions, where this env's space holds every one of them (the env makes a layer
        inherit its input group's AWQ scale, so the recipe alone cannot tell which of two rules that
        differ in ``act_scale`` the search chose); ``None`` otherwise."""
        if not isinstance(saved, list) or len(saved) != self.n_layers:
            return None
        try:
            found = [np.asarray(a, dtype=np.float32 if self.action_kind == "continuous" else np.int64) for a in saved]
        except (TypeError, ValueError):
            return None
        if not all(self.env.action_space.contains(a if a.ndim else a.item()) for a in found):
            return None
        return found

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
    """The best single rule of the env's candidate rules that fits the budget on every layer (a human
    point, not a search: with validation tokens it still returns the best on calibration, and
    reports that recipe's validation KL)."""

    name = "uniform"
    finalists = 1

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

    def planned_evaluations(self, granted: int) -> float:
        todo = [j for j in self.candidates() if tuple(np.full(self.n_layers, j)) not in self._seen]
        return min(granted, len(todo))


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

    def planned_evaluations(self, granted: int) -> float:
        return 0 if self.best_recipe is not None else min(granted, 1)

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
    """HAWQ-style greedy whose per-layer proxy is corrected by end-to-end measurement.

    1. The best start (:meth:`Searcher._start`): greedy's proxy plan, the human presets and the
       uniform rules, each measured end to end. Greedy's plan is measured first, so a budget of one
       evaluation still returns it (the old one-evaluation greedy).
    2. Refinement, because per-layer errors do not add up (issue 24: at gptq-w4's size on stories260K
       greedy's plan is better than uniform gptq-w4 by its summed errors and 2x worse end to end).
       Moves from the best recipe so far are ranked, the ``width`` best not tried yet are screened on
       a few token batches (``stages``, as evolution's multi-step selection), the best is evaluated on
       all the calibration tokens, and it is accepted **only if it measures better**. After
       ``patience`` windows without a measured gain the search stops on its own.

       ``ranking="measured"`` (default): the moves are swaps of one width up and one down between
       two layers of one shape (the size stays), ranked by *measured* marginals: the end-to-end
       reward change of each single-layer step (one width up, one down, the other knobs kept) from
       the current recipe, screened on the first stage's token batches (``2 x n_layers`` screenings,
       cached; after an accepted move only the two changed layers are re-measured). Each swap is
       predicted as the sum of its two marginals: additivity trusted only between two changes.
       ``ranking="proxy"``: every single-layer change re-balanced by greedy's own rule
       (:meth:`moves`), ranked by the summed per-layer errors. Measured on stories260K at gptq-w3's
       and gptq-w4's sizes, no proxy-ranked move measured better than uniform GPTQ (BENCHMARKS.md).

    So greedy costs "a few evaluations" (the start's candidates plus the refinement's screenings and
    evaluations), not one: ``evaluations``, ``screenings`` and ``spent`` say how many. It never ends
    worse than its start.
    """

    name = "greedy"
    default_evaluations = 32
    RANKINGS: ClassVar[tuple[str, ...]] = ("measured", "proxy")

    def __init__(self, env: Any, seed: int = 0, verbose: int = 0, width: int = 8, patience: int = 2,
                 stages: Any = ((0.125, 4), (0.5, 1)), ranking: str = "measured", pool: Any = None) -> None:
        for label, value in (("width", width), ("patience", patience)):
            if int(value) < 1:
                raise QenvError(f"greedy {label}={value} must be at least 1.")
        if ranking not in self.RANKINGS:
            raise QenvError(f"greedy ranking={ranking!r} is unknown.", f"use one of {self.RANKINGS}.")
        self.width, self.patience, self.stages = int(width), int(patience), tuple(tuple(x) for x in stages)
        self.ranking = ranking
        super().__init__(env, seed=seed, verbose=verbose, pool=pool)
        self._kwargs.update(width=width, patience=patience, stages=[list(x) for x in self.stages], ranking=ranking)

    def _bind(self, env: Any) -> None:
        super()._bind(env)
        self._stages = self._stage_batches(self.stages)

    def allocate(self) -> np.ndarray:
        """Greedy's proxy plan (what the start measures first)."""
        return greedy_allocation(self.costs, self.sensitivity(), self.budget_bits)

    def _width_step(self, rule_index: int, up: bool) -> int | None:
        """The menu rule one width up (down) from this one most like it (the fewest other knobs
        changed; ties: menu order), or ``None`` at the end of the menu's widths."""
        rule = self.rules[rule_index]
        widths = sorted({r.bits for r in self.rules})
        level = widths.index(rule.bits) + (1 if up else -1)
        if not 0 <= level < len(widths):
            return None
        names = [f.name for f in fields(Rule) if f.name != "bits"]
        options = [k for k, r in enumerate(self.rules) if r.bits == widths[level]]
        return min(options, key=lambda k: (sum(getattr(self.rules[k], n) != getattr(rule, n) for n in names), k))

    def _marginals(self, choice: tuple[int, ...], known: dict[tuple[int, int], float],
                   stale: set[int] | None) -> dict[tuple[int, int], float]:
        """``{(layer, rule): measured reward change}`` of each single-layer step one width up or down
        from ``choice``, screened on the first stage's token batches (all of them without stages).
        Layers not in ``stale`` keep their ``known`` marginals (``stale=None``: measure all)."""
        batches = self._stages[0][0] if self._stages else self.n_batches
        cost = self.screen_cost(batches) if self._stages else 1.0
        if not self._can_spend(cost):
            return known
        out = {key: value for key, value in known.items() if stale is not None and key[0] not in stale}
        steps: list[tuple[int, int, tuple[int, ...]]] = []
        for i in range(self.n_layers):
            if stale is not None and i not in stale and any(key[0] == i for key in out):
                continue
            for up in (True, False):
                j = self._width_step(choice[i], up)
                if j is not None:
                    steps.append((i, j, tuple(choice[:i]) + (j,) + tuple(choice[i + 1:])))
        if self._stages:  # with a pool: screened at once, in the order the loop below reaches them
            self._prefetch_screens([choice] + [key for _, _, key in steps], batches)
        else:
            self._prefetch([np.array(key) for _, _, key in steps])
        base = self._screen(choice, batches) if self._stages else self._seen[choice]
        for i, j, key in steps:
            if not self._can_spend(cost + 1.0):
                break
            value = self._screen(key, batches) if self._stages else self._evaluate(np.array(key))
            out[(i, j)] = value - base
        return out

    def measured_moves(self, choice: tuple[int, ...],
                       marginals: dict[tuple[int, int], float]) -> list[tuple[float, tuple[int, ...]]]:
        """``[(-predicted reward change, recipe), ...]``, best first: each swap of one width up (layer
        ``i``) and one down (layer ``k`` of ``i``'s shape) that meets the budget, predicted as the sum of
        the two measured marginals."""
        shapes: dict[tuple[int, int], list[int]] = {}
        for i, info in enumerate(self.task.layers):
            shapes.setdefault((info.out_features, info.in_features), []).append(i)
        out = []
        for members in shapes.values():
            for i in members:
                up = self._width_step(choice[i], True)
                if up is None or (i, up) not in marginals:
                    continue
                for k in members:
                    down = None if k == i else self._width_step(choice[k], False)
                    if down is None or (k, down) not in marginals:
                        continue
                    y = np.array(choice)
                    y[i], y[k] = up, down
                    if self.feasible(y):
                        out.append((-(marginals[(i, up)] + marginals[(k, down)]), tuple(int(v) for v in y)))
        return sorted(out, key=lambda item: item[0])

    def moves(self, choice: tuple[int, ...]) -> list[tuple[float, tuple[int, ...]]]:
        """``[(predicted change of the summed proxy error, recipe), ...]``: every single-layer change
        of ``choice`` (layer ``i`` to rule ``j``) re-balanced to the budget by greedy's rule with layer
        ``i`` held, and every swap of one width up and one down between two layers of one shape (the
        bits move, the size stays). Recipes that cannot meet the budget are left out.

        Order: by the prediction, but the best move of each changed layer comes before any layer's
        second best (a proxy that is wrong about one layer would otherwise fill every window with
        that layer's moves); ties: layer, then rule order."""
        sens = self.sensitivity()
        x = np.array(choice, dtype=np.int64)
        rows = np.arange(self.n_layers)
        base = float(sens[rows, x].sum())
        found: dict[tuple[int, ...], tuple[float, int]] = {}

        def add(y: np.ndarray, layer: int) -> None:
            key = tuple(int(k) for k in y)
            if key != tuple(choice) and key not in found and self.feasible(y):
                found[key] = (float(sens[rows, y].sum()) - base, layer)

        for i in range(self.n_layers):
            for j in range(len(self.rules)):
                if j == x[i] or not math.isfinite(sens[i, j]):
                    continue
                held = sens.copy()
                held[i, :] = np.inf  # layer i keeps rule j: no move of it can lower the proxy
                held[i, j] = sens[i, j]
                start = x.copy()
                start[i] = j
                add(greedy_allocation(self.costs, held, self.budget_bits, start=start), i)
        widths = sorted({r.bits for r in self.rules})
        shapes: dict[tuple[int, int], list[int]] = {}
        for i, info in enumerate(self.task.layers):
            shapes.setdefault((info.out_features, info.in_features), []).append(i)

        def step(i: int, up: bool) -> int | None:
            """The menu rule one width up (down) from layer i's with its other knobs (None if none)."""
            rule = self.rules[x[i]]
            level = widths.index(rule.bits) + (1 if up else -1)
            if not 0 <= level < len(widths):
                return None
            same = [k for k, r in enumerate(self.rules) if r.bits == widths[level] and
                    all(getattr(r, f.name) == getattr(rule, f.name) for f in fields(Rule) if f.name != "bits")]
            return same[0] if same else None

        for members in shapes.values():
            for i in members:
                up = step(i, True)
                if up is None:
                    continue
                for k in members:
                    down = step(k, False) if k != i else None
                    if down is not None:
                        y = x.copy()
                        y[i], y[k] = up, down
                        add(y, i)
        ranked = sorted(found.items(), key=lambda item: (item[1][0], item[1][1]))
        first, rest, layers = [], [], set()
        for key, (delta, layer) in ranked:
            (rest if layer in layers else first).append((delta, key))
            layers.add(layer)
        return first + rest

    def _finalists(self) -> list[tuple[int, ...]]:
        """The refined recipes (the best by calibration reward), the best start and greedy's proxy plan."""
        extra = [] if self.start is None else [c.choice for c, _ in self.start.measured if c.label == "greedy plan"]
        return list(dict.fromkeys(super()._finalists() + extra))

    def _search(self) -> None:
        if self._start():
            self._refine()

    def _refine(self) -> bool:
        """Step 2, from the best recipe measured so far: True when it stops at a local optimum (no
        measured improvement among the best-ranked moves), False when the budget ran out first."""
        current = self._best_choice()
        marginals: dict[tuple[int, int], float] = {}
        changed: set[int] | None = None  # layers whose marginals are stale (None: all)
        while current is not None and self._can_spend():
            reward = self._seen[current]
            if self.ranking == "measured":
                marginals = self._marginals(current, marginals, changed)
                moves = self.measured_moves(current, marginals)
            else:
                moves = self.moves(current)
            ranked = [y for _, y in moves if y not in self._proposed and y not in self._seen]
            better = None
            for w in range(self.patience):
                window = ranked[w * self.width:(w + 1) * self.width]
                if not window or not self._can_spend():
                    break
                self._proposed.update(window)
                finalists = self._select(window, self._stages)
                self._prefetch(finalists)
                for y in finalists:
                    if not self._can_spend():
                        break
                    value = self._evaluate(np.array(y))
                    if value > reward and (better is None or value > self._seen[better]):
                        better = y
                if better is not None:
                    break
            if better is None:  # no measured improvement among the best-ranked moves: a local optimum,
                return self._can_spend()  # unless the budget ran out before they were all measured
            changed = {i for i in range(self.n_layers) if better[i] != current[i]}
            current = better
        return False


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
    """Random budget-feasible recipes after the best start; keeps the best."""

    name = "random"
    default_evaluations = 32

    def _search(self) -> None:
        if not self._start():
            return
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


class EvolutionSearch(GreedySearch):
    """EvoPress-style evolutionary search at constant size, started where greedy ends.

    **Greedy first, by design** (issue 24: "evolution is never worse than greedy"). The first part
    of the budget runs :class:`GreedySearch` itself (this class inherits it: the best start, then
    greedy's measured refinement, the same code with the same ``width``, ``patience``, ``ranking``
    and screening stages) until greedy stops at its local optimum. How much of the budget that takes
    depends on the screenings: greedy's measured marginals (two per layer) are screened on the first
    token batch, so with several batches its part is cheap; with one batch (1536 tokens at
    ``batch_size=32``) every marginal is a full evaluation, and greedy can spend all 128 evaluations
    itself, leaving evolution nothing. Greedy is deterministic, so that part is the same for every seed and is exactly what
    ``GreedySearch`` with the same stages spends and returns. Evolution then runs on the rest of
    the budget, its first population every recipe greedy measured (the parent: the best on
    calibration). Hence:

    - on its own calibration tokens evolution's best is never worse than greedy's (it holds every
      recipe greedy evaluated); without validation tokens that is what it returns;
    - with validation tokens (``validation_fraction > 0``) greedy's own final pick (greedy's
      finalists compared on the validation tokens, as ``GreedySearch`` returns it) is kept unless
      an evolved finalist has a validation KL lower by more than ``validation_margin`` (a share of
      greedy's; default 2%): the recipes evolution tunes past greedy fit the calibration tokens, and
      a few hundred validation tokens do not rank recipes 1-3% apart (BENCHMARKS.md, the learned
      menu at w4), so a small validation gain is not taken as a gain. The margin was set before the
      benchmark was re-run, not fitted to it.

    If the budget runs out during greedy's part, the result is greedy's.

    Follows IST-DASLab's EvoPress (``evo_quant_search.py``) where it fits qenv:

    - **(1 + λ) with elitism**: by default one parent (``population=1``), the best recipe measured
      so far, and ``offspring`` children per generation; the parent survives until a child
      measures better. EvoPress starts its parent at the uniform level of the target width; here
      the first population is greedy's (the best start, :meth:`Searcher._start`: greedy's plan, the
      human presets, the uniform rules, all measured; then greedy's refinement), so the search
      never ends below the human recipe or greedy's.
    - **Level-switch mutations at constant size**: a layer's level is its rule's bit width. A flip
      raises one layer a level and lowers another layer *of the same shape* a level (EvoPress's
      ``group_rule="size"``), each to the rule of the new width most like its current one (the
      same family and group when the menu has it), so the bits just move: uniform GPTQ-w4 with one
      layer at w5 and a same-shaped layer at w3 has exactly the size of uniform GPTQ-w4. A flip
      that would exceed the budget is redrawn. A child gets ``min(U(1..3), U(1..3))`` flips
      (EvoPress's bias towards one). Models with no two layers of one shape use EvoPress's
      ``group_rule="none"`` move instead: raise one layer, lower random others until the recipe
      fits, reject a child that needs more than 10 level changes or gives back more than 1/0.8
      of the bits it added.
    - **Multi-step selection**: all children are scored on the first token batches of the first
      stage, the best ``keep`` go on to the next stage's larger share, and what is left gets a full
      evaluation on all the calibration tokens; the fitness is the environment's reward, i.e.
      ``log(KL_ref / KL)`` with the default ``reward="kl"`` (EvoPress's KL fitness). Defaults
      ``stages=((0.125, 4), (0.5, 1))`` mirror EvoPress's 16 → 4 → 1 schedule over growing token
      counts; shares round to whole batches, so with few batches stages merge (2 batches: one
      screening stage on one batch).

    Where it deviates, and why:

    - It starts at greedy's local optimum, not at a uniform level, and keeps greedy's pick unless
      beaten on validation tokens by a margin (above): measured on the learned menu with 128
      evaluations, evolution from the best start alone ended worse than greedy in 3 of 4 sizes by
      1.3-2.6% (held-out KL), its level switches not reaching what greedy's measured refinement
      reached at w3. The refinement's screenings and evaluations count against the same budget.
    - A knob mutation (probability ``knob_rate``) switches a layer to another rule of the same
      width (GPTQ ↔ AWQ ↔ RTN, group size, outliers), when it fits: qenv's menus hold several
      rules per width and issue 24 found the gains come from *which rule* a layer gets. EvoPress's
      database has one method per level.
    - The stages score the *first* token batches, the same each generation, where EvoPress draws a
      fresh random minibatch per stage: the evaluator and the evaluator pools screen prefixes of the
      batches, and the parent keeps an exact full-calibration fitness to be compared with.
    - Budgets are in evaluations (``learn(total_timesteps)`` grants ``total_timesteps // n_layers``;
      a screening on ``b`` of ``n`` batches costs ``b / n``), where EvoPress runs a fixed number of
      generations (150 × 128 offspring on Llama-scale models, far beyond a CPU's budget).
    - Optional block-wise ``crossover`` between parents (EvoPress has none; off by default); a
      crossed child over the budget is redrawn.

    Args:
        population: parents kept between generations (EvoPress: 1).
        offspring: children proposed per generation (EvoPress: 128 for quantization).
        survivors: children per generation that get a full evaluation (the last stage's ``keep``;
            default: that of ``stages``).
        stages: screening stages as ``(share of the calibration tokens, keep)`` pairs.
        screen_batches: shorthand for one screening stage on that many batches keeping
            ``survivors`` (0: no screening, every child gets a full evaluation).
        max_mutations: flips per child are ``min(U(1..max), U(1..max))``.
        knob_rate: probability that a flip switches a rule's knobs instead of moving bits.
        crossover: probability that a child starts as a block-wise crossover of two parents.
        width, patience, ranking: greedy's refinement (:class:`GreedySearch`), run first.
        validation_margin: the share of greedy's validation KL an evolved recipe must be below to
            replace greedy's pick (0: any lower validation KL replaces it).
    """

    name = "evolution"
    default_evaluations = 48

    def __init__(self, env: Any, seed: int = 0, verbose: int = 0, population: int = 1, offspring: int = 16,
                 survivors: int | None = None, stages: Any = ((0.125, 4), (0.5, 1)), screen_batches: int | None = None,
                 max_mutations: int = 3, knob_rate: float = 0.25, crossover: float = 0.0, width: int = 8,
                 patience: int = 2, ranking: str = "measured", validation_margin: float = 0.02,
                 pool: Any = None) -> None:
        if not 0.0 <= float(validation_margin) < 1.0:
            raise QenvError(f"evolution validation_margin={validation_margin} must be in [0, 1).",
                            "give a share of greedy's validation KL, e.g. 0.02.")
        self.validation_margin = float(validation_margin)
        for label, value in (("population", population), ("offspring", offspring), ("max_mutations", max_mutations),
                             ("survivors", 1 if survivors is None else survivors)):
            if int(value) < 1:
                raise QenvError(f"evolution {label}={value} must be at least 1.")
        for label, value in (("crossover", crossover), ("knob_rate", knob_rate)):
            if not 0.0 <= float(value) <= 1.0:
                raise QenvError(f"evolution {label}={value} must be a probability in [0, 1].")
        self.population_size, self.offspring = int(population), int(offspring)
        self.max_mutations, self.crossover, self.knob_rate = int(max_mutations), float(crossover), float(knob_rate)
        self.stages = tuple(tuple(x) for x in stages)
        self.survivors_arg, self.screen_batches = survivors, screen_batches
        super().__init__(env, seed=seed, verbose=verbose, width=width, patience=patience, stages=stages,
                         ranking=ranking, pool=pool)
        self._kwargs.update(population=population, offspring=offspring, survivors=survivors,
                            stages=[list(x) for x in self.stages], screen_batches=screen_batches,
                            max_mutations=max_mutations, knob_rate=knob_rate, crossover=crossover,
                            validation_margin=validation_margin)

    def _reset_state(self) -> None:
        super()._reset_state()
        self.population: list[tuple[float, tuple[int, ...]]] = []  # (reward, rule indices), best first
        self.greedy_done = False  # greedy's part has stopped at its local optimum
        self.greedy_pick: tuple[int, ...] | None = None  # what GreedySearch returns (its validation pick)
        self._greedy_finalists: list[tuple[int, ...]] = []
        self._greedy_played: set[tuple[int, ...]] = set()  # every recipe greedy's part evaluated

    def _bind(self, env: Any) -> None:
        super()._bind(env)
        self._prepare_moves()

    # -- structure of the rule set ---------------------------------------------------------------
    def _prepare_moves(self) -> None:
        if self.screen_batches is not None:
            keep = 1 if self.survivors_arg is None else int(self.survivors_arg)
            b = int(self.screen_batches)
            self._stages = [(b, keep)] if 0 < b < self.n_batches else []
        else:
            self._stages = self._stage_batches(self.stages)
            if self.survivors_arg is not None and self._stages:
                self._stages[-1] = (self._stages[-1][0], int(self.survivors_arg))
        self.survivors = self._stages[-1][1] if self._stages else int(self.survivors_arg or self.offspring)
        names = [f.name for f in fields(Rule) if f.name != "bits"]

        def mismatches(a: Rule, b: Rule) -> int:
            return sum(getattr(a, n) != getattr(b, n) for n in names)

        widths = sorted({r.bits for r in self.rules})
        self._up: list[list[int]] = []  # per rule: the most similar rules one width up
        self._down: list[list[int]] = []
        self._same_width: list[list[int]] = []
        for rule in self.rules:
            level = widths.index(rule.bits)
            for target, store in ((level + 1, self._up), (level - 1, self._down)):
                if not 0 <= target < len(widths):
                    store.append([])
                    continue
                options = [k for k, other in enumerate(self.rules) if other.bits == widths[target]]
                best = min(mismatches(rule, self.rules[k]) for k in options)
                store.append([k for k in options if mismatches(rule, self.rules[k]) == best])
            self._same_width.append([k for k, other in enumerate(self.rules) if other.bits == rule.bits and other != rule])
        shapes: dict[tuple[int, int], list[int]] = {}
        for i, info in enumerate(self.task.layers):
            shapes.setdefault((info.out_features, info.in_features), []).append(i)
        self._groups = [members for members in shapes.values() if len(members) > 1]
        self._blocks = np.array([info.block for info in self.task.layers])

    # -- variation -------------------------------------------------------------------------------
    def _flip(self, child: np.ndarray) -> bool:
        """One level switch at constant size (or a knob switch); False when none was found."""
        budget = self.budget_bits + _TOL
        total = self._total(child)
        if self.rng.random() < self.knob_rate:
            i = int(self.rng.integers(self.n_layers))
            options = [k for k in self._same_width[child[i]]
                       if total + self.costs[i, k] - self.costs[i, child[i]] <= budget]
            if options:
                child[i] = int(self.rng.choice(options))
                return True
        if not self._groups:
            return self._flip_across_sizes(child)
        sizes = np.array([len(g) for g in self._groups], dtype=np.float64)
        for _ in range(20):
            group = self._groups[int(self.rng.choice(len(self._groups), p=sizes / sizes.sum()))]
            ups = [i for i in group if self._up[child[i]]]
            downs = [i for i in group if self._down[child[i]]]
            if not ups or not downs:
                continue
            i = int(self.rng.choice(ups))
            k = int(self.rng.choice([d for d in downs if d != i] or [-1]))
            if k < 0:
                continue
            new_i, new_k = int(self.rng.choice(self._up[child[i]])), int(self.rng.choice(self._down[child[k]]))
            delta = self.costs[i, new_i] - self.costs[i, child[i]] + self.costs[k, new_k] - self.costs[k, child[k]]
            if total + delta <= budget:
                child[i], child[k] = new_i, new_k
                return True
        return False

    def _flip_across_sizes(self, child: np.ndarray) -> bool:
        """EvoPress's ``group_rule="none"`` move: raise one layer a level, lower random others until
        the recipe fits; refused past 10 level changes or when it gives back over 1/0.8 of the bits."""
        ups = [i for i in range(self.n_layers) if self._up[child[i]]]
        if not ups:
            return False
        trial = child.copy()
        i = int(self.rng.choice(ups))
        j = int(self.rng.choice(self._up[trial[i]]))
        added = self.costs[i, j] - self.costs[i, trial[i]]
        trial[i] = j
        removed, changes = 0.0, 1
        while self._total(trial) > self.budget_bits + _TOL:
            downs = [k for k in range(self.n_layers) if k != i and self._down[trial[k]]]
            if not downs or changes > 10:
                return False
            k = int(self.rng.choice(downs))
            j = int(self.rng.choice(self._down[trial[k]]))
            removed += self.costs[k, trial[k]] - self.costs[k, j]
            trial[k] = j
            changes += 1
        if removed > 0 and added / removed < 0.8:
            return False
        child[:] = trial
        return True

    def _crossover(self, a: tuple[int, ...], b: tuple[int, ...]) -> np.ndarray:
        blocks = np.unique(self._blocks)
        take_a = dict(zip(blocks.tolist(), (self.rng.random(blocks.size) < 0.5).tolist()))
        return np.array([a[i] if take_a[int(self._blocks[i])] else b[i] for i in range(self.n_layers)])

    def _parent(self) -> tuple[int, ...]:
        """Rank-biased choice: the best parent is the likeliest (the only one when ``population=1``)."""
        n = len(self.population)
        weights = np.arange(n, 0, -1, dtype=np.float64)
        return self.population[int(self.rng.choice(n, p=weights / weights.sum()))][1]

    def _child(self) -> np.ndarray | None:
        if len(self.population) > 1 and self.rng.random() < self.crossover:
            child = self._crossover(self._parent(), self._parent())
            if not self.feasible(child):
                return None
        else:
            child = np.array(self._parent())
        top = self.max_mutations
        flips = min(int(self.rng.integers(1, top + 1)), int(self.rng.integers(1, top + 1)))
        changed = False
        for _ in range(flips):
            changed = self._flip(child) or changed
        return child if changed else None

    # -- selection -------------------------------------------------------------------------------
    def _admit(self, choice: tuple[int, ...], reward: float) -> None:
        if all(c != choice for _, c in self.population):
            self.population.append((reward, choice))
        self.population.sort(key=lambda rc: -rc[0])
        del self.population[self.population_size:]

    def _finalists(self) -> list[tuple[int, ...]]:
        """Greedy's finalists until greedy's part is done; then greedy's finalists and the ``finalists``
        best evolved recipes (evaluated after greedy's part) by calibration reward."""
        if not self.greedy_done:
            return super()._finalists()
        order = sorted(self._played, key=lambda key: -self._seen[key])
        evolved = [key for key in order if key not in self._greedy_played][:self.finalists]
        return list(dict.fromkeys(self._greedy_finalists + evolved))

    def _pick_on_validation(self) -> None:
        """Greedy's pick, unless an evolved finalist's validation KL is below ``1 - validation_margin``
        of greedy's pick's (then the lowest such one)."""
        if self.task.validation_tokens is None or not self._played or not self.greedy_done:
            super()._pick_on_validation()
            return
        assert self.greedy_pick is not None
        finalists = self._finalists()
        bar = (1.0 - self.validation_margin) * self.validation_kl(self.greedy_pick)
        better = [key for key in finalists if key not in self._greedy_played and self.validation_kl(key) < bar]
        self._adopt(self._validation_pick(better) if better else self.greedy_pick, finalists)

    def _search(self) -> None:
        if not self.greedy_done:
            if not self._start() or not self._refine():
                return  # the budget ran out in greedy's part: the result is greedy's
            self.greedy_done = True
            self._greedy_finalists = GreedySearch._finalists(self)
            self._greedy_played = set(self._played)
            if self.task.validation_tokens is not None:
                self.greedy_pick = self._validation_pick(self._greedy_finalists)
            else:
                self.greedy_pick = self._best_choice()
            for key in self._played:
                self._admit(key, self._seen[key])
        while self._can_spend():
            children: list[tuple[int, ...]] = []
            tries = 0
            while len(children) < self.offspring and tries < 20 * self.offspring:
                tries += 1
                made = self._child()
                if made is None:
                    continue
                child = tuple(int(i) for i in made)
                if child not in self._proposed and child not in children:
                    children.append(child)
            if not children:
                return  # the neighbourhood is exhausted
            self._proposed.update(children)
            children = self._select(children, self._stages)
            self._prefetch(children)
            for child in children:
                if not self._can_spend():
                    return
                self._admit(child, self._evaluate(np.array(child)))

SEARCHERS: dict[str, type[Searcher]] = {
    cls.name: cls for cls in (UniformSearch, LlamaCppSearch, GreedySearch, RandomSearch, EvolutionSearch)
}
