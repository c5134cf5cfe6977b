"""One protocol for everything that picks rules: RL algorithms, searchers and plug-ins.

An agent follows Stable-Baselines3's surface, so SB3 models, searchers and your own classes
are used the same way by the programs::

    agent = make_agent("greedy", env, seed=0)          # or "ppo", "mypkg.module:Class", ...
    agent.learn(total_timesteps=35 * 64)
    recipe, info = rollout_recipe(agent, env)          # one deterministic episode
    agent.save("runs/x/agent")

This module also holds the small helpers every agent shares: turning a rule back into an action
of the environment's action space, and scoring a recipe with the environment's own reward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from qenv.envs.episodes import (LAYERS_LEFT_INDEX, action_kind, base_env, layer_index_of, play_episode, recipe_of,
                                rollout_recipe, rule_to_action, score_recipe)

__all__ = ["LAYERS_LEFT_INDEX", "Agent", "action_kind", "base_env", "layer_index_of", "play_episode", "recipe_of",
           "rollout_recipe", "rule_to_action", "score_recipe"]


@runtime_checkable
class Agent(Protocol):
    """What the programs need from an agent (the signatures of SB3's algorithms).

    Agents are built as ``make_agent(name, env, seed=0, **hyperparams)``, i.e. a class or factory
    called as ``factory(env, seed=seed, **hyperparams)``. A class attribute ``action_kinds``
    (a subset of ``("discrete", "multidiscrete", "continuous")``) says which action spaces it handles.
    """

    def learn(self, total_timesteps: int, callback: Any = None, progress_bar: bool = False) -> Agent:
        """Train or search for ``total_timesteps`` environment steps; returns ``self``."""
        ...

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> tuple[Any, Any]:
        """The action for ``observation`` (and the next recurrent state, ``None`` if unused)."""
        ...

    def save(self, path: str | Path) -> Any:
        ...

    @classmethod
    def load(cls, path: str | Path, env: Any = None) -> Agent:
        ...


