"""Action kinds: one class each, and the one :data:`KINDS` registry the env reads them from.

A kind says what an action means in a running episode (:class:`~qenv.envs.episode.EpisodeState`):

- :meth:`ActionKind.decode`: the rule an action asks for at this layer (and its menu index);
- :meth:`ActionKind.masks`: which actions keep the budget reachable (the maskable kinds);
- :meth:`ActionKind.after_step`: the kind's own bookkeeping once the layer's rule is fixed (the
  residual kind re-plans the layers left after a deviation);
- :meth:`ActionKind.finish`: the last step's work before the recipe is scored (the allocation
  kind's projection), and :meth:`ActionKind.final_info` its entries of the last ``info``.

The space itself is built by :class:`~qenv.envs.spaces.ActionMapper` (the kinds that name a rule
whatever the state share it with the searchers). Adding a kind is one class registered in
:data:`KINDS` (``register_kind``); a kind's own options (the residual kind's deviation limit and
re-plan) are its constructor's arguments, read from the env's config.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from gymnasium import spaces

from qenv.envs.allocation import fill_budget, project_preferences
from qenv.envs.episode import EpisodeState
from qenv.envs.spaces import RELATIVE_DELTAS, RESIDUAL_SHIFTS
from qenv.errors import QenvError
from qenv.quant.rules import Rule, layer_bits


class ActionKind:
    """A kind whose action names one rule whatever the state (``discrete``, ``multidiscrete``,
    ``continuous``, ``rule``): the mapper decodes it. Subclasses read it against the state."""

    #: the gymnasium space family an algorithm must handle
    family: ClassVar[str] = "discrete"
    #: whether the env exposes ``action_masks()`` for it
    maskable: ClassVar[bool] = True
    #: whether an action always names the same rule (searchers replay recipes through these kinds)
    fixed_rule: ClassVar[bool] = True
    #: whether blocks are streamed as their layers are fixed (False: the recipe exists only at the end)
    streams: ClassVar[bool] = True
    #: whether the episode starts from a plan at the budget: the best start (``ModelTask.start_plan``)
    plans: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        if options:
            raise QenvError(f"{', '.join(sorted(options))} applies to the residual action kind, not {self.name!r}.",
                            "use action_kind='residual', or leave it unset.")

    def space(self, menu: tuple[Rule, ...]) -> spaces.Space | None:
        """The action space of a kind added beyond the built-in ones (which
        :class:`~qenv.envs.spaces.ActionMapper` builds: ``None``)."""
        return None

    @classmethod
    def from_config(cls, config: Any) -> ActionKind:
        """The kind with its own options from an :class:`~qenv.envs.config.EnvConfig` (none by default)."""
        return cls()

    @property
    def name(self) -> str:
        return next((name for name, kind in KINDS.items() if kind is type(self)), type(self).__name__)

    def decode(self, state: EpisodeState, action: Any) -> tuple[Rule, int, float, dict[str, Any]]:
        """``(asked rule, its menu index or -1, the step's reward from the kind, info entries)``."""
        return state.mapper.to_rule(action), -1, 0.0, {}

    def choice(self, state: EpisodeState, action: Any) -> int:
        """The menu index an action asks for at this layer (the kinds that choose from the menu)."""
        raise QenvError(f"A {self.name!r} action names a rule, not a menu index.")

    def masks(self, state: EpisodeState, allowed: float) -> np.ndarray:
        """The allowed actions when ``allowed`` bits fit this layer (a flat bool array)."""
        return knob_masks(state, allowed)

    def after_step(self, state: EpisodeState, choice: int, clamped: bool) -> None:
        """The kind's bookkeeping once this layer's rule is in the recipe (nothing by default)."""

    def finish(self, state: EpisodeState) -> None:
        """The last step's work before the recipe is scored (nothing by default)."""

    def final_info(self, state: EpisodeState) -> dict[str, Any]:
        """The kind's entries of the last step's ``info`` (none by default)."""
        return {}


class DiscreteKind(ActionKind):
    """An index into the menu."""

    def masks(self, state: EpisodeState, allowed: float) -> np.ndarray:
        return state.task.costs[state.index] <= allowed


class MultiDiscreteKind(ActionKind):
    """One index per knob: bits, group, outlier fraction, rounding (with ``menu="gguf"``: type, imatrix)."""

    family = "multidiscrete"


class ContinuousKind(ActionKind):
    """Every knob of a rule, HAQ-style bins of [-1, 1]."""

    family = "continuous"
    maskable = False


class RuleKind(ActionKind):
    """Every knob of a rule by index."""

    family = "multidiscrete"


class RelativeKind(ActionKind):
    """Bits per weight above the even share of the budget left; the most accurate menu rule at or under it."""

    fixed_rule = False

    def decode(self, state: EpisodeState, action: Any) -> tuple[Rule, int, float, dict[str, Any]]:
        state.mapper.check_action(action)
        choice = self.choice(state, action)
        return state.mapper.rules[choice], choice, 0.0, {}

    def choice(self, state: EpisodeState, action: Any) -> int:
        task = state.task
        i = state.index
        index = _index(state, action)
        # the most accurate menu rule at or under the even share left plus the delta
        remaining = float(task.rest_numel[i])
        target = (state.budget_bits - state.spent) / remaining + RELATIVE_DELTAS[index]
        bpw = task.costs[i] / float(task.numel[i])
        sens = task.menu_sensitivity()[i]
        ok = np.flatnonzero(bpw <= target + 1e-9)
        if ok.size == 0:
            return int(np.lexsort((sens, task.costs[i]))[0])
        return int(ok[np.argmin(sens[ok])])

    def masks(self, state: EpisodeState, allowed: float) -> np.ndarray:
        n_total = int(state.action_space.n)
        mask = np.array([state.task.costs[state.index, self.choice(state, a)] <= allowed for a in range(n_total)],
                        dtype=bool)
        if not mask.any():  # cannot happen (action 0 of residual always fits); be safe
            mask[0] = True
        return mask


class ResidualKind(RelativeKind):
    """A shift along the layer's cost-sorted menu from the best start
    (:meth:`~qenv.envs.task.ModelTask.start_plan`); 0 everywhere is the best start's recipe.

    Its own option: ``max_deviations`` (at most this many steps per episode leave the plan). After
    a deviation the layers left are re-planned by greedy's convex-hull form (Lagrangian, then filled)."""

    plans = True

    def __init__(self, max_deviations: int | None = None) -> None:
        self.max_deviations = max_deviations

    @classmethod
    def from_config(cls, config: Any) -> ResidualKind:
        return cls(config.max_deviations)

    def deviations_spent(self, state: EpisodeState) -> bool:
        return self.max_deviations is not None and state.deviations >= self.max_deviations

    def decode(self, state: EpisodeState, action: Any) -> tuple[Rule, int, float, dict[str, Any]]:
        state.mapper.check_action(action)
        choice = self.choice(state, action)
        capped, reward = False, 0.0
        if state.plan is not None and choice != int(state.plan[state.index]):
            if self.deviations_spent(state):  # an agent without masks asked for one more: the plan instead
                choice, capped = int(state.plan[state.index]), True
            else:
                state.deviations += 1
        return state.mapper.rules[choice], choice, reward, {"deviation_capped": capped}

    def choice(self, state: EpisodeState, action: Any) -> int:
        task = state.task
        i = state.index
        index = _index(state, action)
        assert state.plan is not None
        order, position = task.menu_ladder()
        k = int(np.clip(position[i, state.plan[i]] + RESIDUAL_SHIFTS[index], 0, order.shape[1] - 1))
        return int(order[i, k])

    def masks(self, state: EpisodeState, allowed: float) -> np.ndarray:
        if self.deviations_spent(state):  # max_deviations reached: the plan only
            return np.arange(int(state.action_space.n)) == 0
        return super().masks(state, allowed)

    def after_step(self, state: EpisodeState, choice: int, clamped: bool) -> None:
        task = state.task
        if state.plan is not None and (clamped or choice != int(state.plan[state.index])):
            # a deviation: the layers left are re-planned on what is left
            rest = slice(state.index + 1, len(task.layers))
            costs, sens, left = task.costs[rest], task.menu_sensitivity()[rest], state.budget_bits - state.spent
            # Lagrangian greedy, then filled (greedy's convex-hull form)
            state.plan[rest] = fill_budget(costs, sens, task.menu_table.allocate(state.index + 1, left), left)

    def final_info(self, state: EpisodeState) -> dict[str, Any]:
        return {"deviations": state.deviations}


class AllocationKind(ActionKind):
    """A preference in [-1, 1] per layer; after the last layer a projection turns them into a recipe
    within the budget: the moves the preferences make in greedy's plan (greedy on the
    preference-weighted sensitivities), applied to the best start, and the bits left spent on the
    layers it favours. All-zero preferences play the best start."""

    family = "continuous"
    maskable = False
    fixed_rule = False
    streams = False
    plans = True

    def decode(self, state: EpisodeState, action: Any) -> tuple[Rule, int, float, dict[str, Any]]:
        state.mapper.check_action(action)
        assert state.plan is not None
        choice = int(state.plan[state.index])
        value = float(np.asarray(action, dtype=np.float64).reshape(-1)[0])
        state.preferences.append(float(np.clip(value, -1.0, 1.0)))
        return state.mapper.rules[choice], choice, 0.0, {}

    def finish(self, state: EpisodeState) -> None:
        """The projection, anchored at the best start (``state.plan``):
        :func:`~qenv.envs.allocation.project_preferences` of the episode's preferences (all-zero
        preferences give the best start itself)."""
        task = state.task
        assert state.plan is not None
        choice = project_preferences(task.costs, task.menu_sensitivity(), state.plan, state.preferences,
                                     state.budget_bits, base=task.greedy_plan(state.budget_bpw))
        state.allocation_choice = choice  # type: ignore[attr-defined]  # the menu index of each layer
        state.recipe = {}
        state.inherited = 0
        for layer, j in zip(task.layers, choice):  # layers sharing an input share one AWQ scale, as in step()
            state.recipe[layer.name] = state._fold_act_scale(layer, state.mapper.rules[int(j)])[0]
        state.spent = float(task.costs[np.arange(len(task.layers)), choice].sum())
        state.clamped = 0
        state.stream = task.evaluator.stream()


#: every action kind by name (``action_kind=``); the string tables of :mod:`qenv.envs.spaces` are read from it
KINDS: dict[str, type[ActionKind]] = {
    "discrete": DiscreteKind, "multidiscrete": MultiDiscreteKind, "continuous": ContinuousKind,
    "relative": RelativeKind, "allocation": AllocationKind, "residual": ResidualKind, "rule": RuleKind,
}


def register_kind(name: str, kind: type[ActionKind]) -> None:
    """Add an action kind under ``name`` (``action_kind=name``): one class is the whole kind.
    A kind beyond the built-in ones reads its actions against the state and chooses from the
    menu; its :meth:`ActionKind.space` gives its action space."""
    if not (isinstance(kind, type) and issubclass(kind, ActionKind)):
        raise QenvError(f"{kind!r} is not an ActionKind class.", "subclass qenv.envs.kinds.ActionKind.")
    if name in KINDS and KINDS[name] is not kind:
        raise QenvError(f"The action kind {name!r} exists already.", "register the new kind under another name.")
    KINDS[name] = kind


def _index(state: EpisodeState, action: Any) -> int:
    index = int(np.asarray(action).reshape(-1)[0])
    if not 0 <= index < state.action_space.n:
        raise QenvError(f"Action {index} is outside the space of {state.action_space.n} actions.")
    return index


def knob_masks(state: EpisodeState, allowed: float) -> np.ndarray:
    """MultiDiscrete masks: a box of knob values whose costliest combination fits, so every
    combination the masks allow fits. Cost grows with bits, smaller groups, more outliers and
    asymmetric zero points; values are dropped from the costliest end (outliers first, then
    group, zero point and bits) until the box fits."""
    info = state.task.layers[state.index]
    mapper = state.mapper
    knobs = mapper.knobs
    if mapper.gguf:  # (type, imatrix): a type is allowed when each of its rules fits
        costs = state.task.costs[state.index]
        worst = {t: max(c for r, c in zip(mapper.rules, costs) if r.gguf == t) for t in knobs[0]}
        types = np.array([worst[t] <= allowed for t in knobs[0]])
        if not types.any():
            types[int(np.argmin([worst[t] for t in knobs[0]]))] = True
        return np.concatenate([types, np.ones(len(knobs[1]), dtype=bool)])
    keep = [list(range(len(k))) for k in knobs]
    group_cost = {g: (info.in_features if g == -1 else g) for g in knobs[1]}

    def costliest(keep: list[list[int]]) -> Rule:
        bits = max(knobs[0][j] for j in keep[0])
        group = min((knobs[1][j] for j in keep[1]), key=lambda g: group_cost[g])
        outliers = max(knobs[2][j] for j in keep[2])
        symmetric = all(knobs[9][j] for j in keep[9]) if len(knobs) > 9 else False
        return Rule(bits=bits, group_size=group, outlier_fraction=outliers, symmetric=symmetric)

    def drop(dim: int) -> bool:
        if len(keep[dim]) <= 1:
            return False
        if dim == 0:
            worst = max(keep[0], key=lambda j: knobs[0][j])
        elif dim == 1:
            worst = min(keep[1], key=lambda j: group_cost[knobs[1][j]])
        elif dim == 2:
            worst = max(keep[2], key=lambda j: knobs[2][j])
        else:
            worst = min(keep[9], key=lambda j: knobs[9][j])  # asymmetric (False) costs more
        keep[dim].remove(worst)
        return True

    order = (2, 1, 9, 0) if len(knobs) > 9 else (2, 1, 0)
    while layer_bits(costliest(keep), info.out_features, info.in_features) > allowed:
        if not any(drop(dim) for dim in order):
            break
    masks = [np.zeros(len(k), dtype=bool) for k in knobs]
    for mask, kept in zip(masks, keep):
        mask[kept] = True
    return np.concatenate(masks)


def keeps_knobs(kind: ActionKind, state: EpisodeState) -> bool:
    """Whether a rule lowered to fit the budget keeps the asked rule's other knobs (the continuous
    and rule kinds over qenv's own rules)."""
    return isinstance(kind, (ContinuousKind, RuleKind)) and not state.mapper.gguf


__all__ = ["KINDS", "ActionKind", "AllocationKind", "ContinuousKind", "DiscreteKind", "MultiDiscreteKind",
           "RelativeKind", "ResidualKind", "RuleKind", "keeps_knobs", "knob_masks", "register_kind"]
