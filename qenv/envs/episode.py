"""What an action kind may read and change of a running episode: the :class:`EpisodeState`.

The action kinds (:mod:`qenv.envs.kinds`) decode an action against the episode's state. They
are given this protocol, not the environment class, so that ``kinds`` never imports the env
(no import circle) and a kind sees only what it needs. ``QuantLLMEnv`` is one.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from qenv.envs.spaces import ActionMapper
from qenv.envs.task import ModelTask
from qenv.eval.evaluator import Stream
from qenv.models.layers import LayerInfo
from qenv.quant.rules import Rule


class EpisodeState(Protocol):
    """The episode an action is read against (``QuantLLMEnv`` holds it)."""

    task: ModelTask  # the episode's model, evaluator and menu costs
    mapper: ActionMapper  # the rules an action can name
    action_space: Any
    budget_bpw: float
    budget_mode: str
    index: int  # the layer this step decides
    spent: float  # bits of the layers decided so far
    recipe: dict[str, Rule]  # the rules decided so far
    clamped: int
    inherited: int
    stream: Stream
    plan: np.ndarray | None  # the best start (residual, allocation), re-planned after a deviation
    deviations: int  # residual: steps that left the plan
    preferences: list[float]  # allocation: each decided layer's preference

    @property
    def budget_bits(self) -> float: ...

    def _allowed_bits(self) -> float: ...

    def _fold_act_scale(self, info: LayerInfo, rule: Rule) -> tuple[Rule, bool]: ...
