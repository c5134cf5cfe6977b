"""The process-side half of the Ray backend: one environment (so one model replica) per actor.

:class:`EnvWorker` is a plain class; :mod:`qenv.distributed` turns it into a Ray actor with
``ray.remote``. It serves both :class:`~qenv.distributed.RayVecEnv` (reset/step with SB3's
auto-reset, attribute access) and :class:`~qenv.distributed.RayEvaluatorPool` (scoring recipes with
:func:`qenv.envs.episodes.score_recipe`, the same evaluator and reward code the environment and every
searcher use). It never imports Ray, so it also runs in-process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from qenv.errors import QenvError
from qenv.quant.rules import Recipe, layer_bits


def rng_state(env: gym.Env) -> dict[str, Any]:
    """The bit-generator state of the environment's ``np_random`` (created if still unset), so that
    a restarted worker can reproduce a reset that used no seed."""
    return env.unwrapped.np_random.bit_generator.state


def set_rng_state(env: gym.Env, state: Mapping[str, Any]) -> None:
    generator = np.random.Generator(getattr(np.random, state["bit_generator"])())
    generator.bit_generator.state = dict(state)
    env.unwrapped.np_random = generator


class EnvWorker:
    """Holds ``env_fn()`` and runs what the driver asks, one call at a time."""

    def __init__(self, env_fn: Callable[[], gym.Env], threads: int | None = None, crash: bool = False) -> None:
        if crash:  # fault injection: die while starting, as when a GPU or the node fails at start-up
            os._exit(17)
        # A failing constructor (a wrong model path, an impossible budget) is kept and raised by
        # ready(), so the driver sees the user's QenvError instead of a dead actor.
        self.init_error: BaseException | None = None
        try:
            import qenv  # noqa: F401  (registers QuantLLM-v0 in this process)

            if threads:
                import torch

                torch.set_num_threads(int(threads))
            from stable_baselines3.common.vec_env.patch_gym import _patch_env

            self.env = _patch_env(env_fn())
        except Exception as exc:
            self.init_error = exc

    # -- set-up ------------------------------------------------------------------------------
    def ready(self) -> tuple[gym.Space, gym.Space, int]:
        """``(observation_space, action_space, pid)``, or the constructor's error."""
        if self.init_error is not None:
            raise self.init_error
        return self.env.observation_space, self.env.action_space, os.getpid()

    # -- vectorized-env calls (the protocol of SB3's SubprocVecEnv worker) --------------------------
    def reset(self, seed: int | None, options: dict[str, Any] | None) -> tuple[Any, dict, dict]:
        """``(observation, reset_info, rng_state_before)``."""
        before = rng_state(self.env)
        maybe_options = {"options": options} if options else {}
        obs, info = self.env.reset(seed=seed, **maybe_options)
        return obs, info, before

    def step(self, action: Any) -> tuple[Any, float, bool, dict, dict | None, dict | None]:
        """``(observation, reward, done, info, reset_info, rng_state_before_reset)``; a finished
        episode is reset at once, its last observation in ``info["terminal_observation"]``."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        done = bool(terminated or truncated)
        info["TimeLimit.truncated"] = truncated and not terminated
        reset_info = before = None
        if done:
            info["terminal_observation"] = obs
            before = rng_state(self.env)
            obs, reset_info = self.env.reset()
        return obs, float(reward), done, info, reset_info, before

    def restore(self, attrs: Sequence[tuple[str, Any]], start: Mapping[str, Any] | None,
                actions: Sequence[Any]) -> Any:
        """Bring a fresh worker to where a dead one was: re-apply ``set_attr`` calls, reset as the
        current episode was reset, replay its actions. Returns the observation reached."""
        for name, value in attrs:
            setattr(self.env, name, value)
        if start is None:
            return None
        set_rng_state(self.env, start["rng"])
        obs, _, _ = self.reset(start["seed"], start["options"])
        for action in actions:
            obs, _, terminated, truncated, _ = self.env.step(action)
            if terminated or truncated:  # the log holds only the current episode's actions
                raise QenvError("A restarted worker's replay ended its episode early: the environment is not "
                                "deterministic.", "make the environment depend only on its seed and actions.")
        return obs

    def render(self) -> Any:
        return self.env.render()

    def env_method(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        return self.env.get_wrapper_attr(name)(*args, **kwargs)

    def get_attr(self, name: str) -> Any:
        return self.env.get_wrapper_attr(name)

    def has_attr(self, name: str) -> bool:
        try:
            self.env.get_wrapper_attr(name)
        except AttributeError:
            return False
        return True

    def set_attr(self, name: str, value: Any) -> None:
        setattr(self.env, name, value)

    def is_wrapped(self, wrapper_class: type) -> bool:
        from stable_baselines3.common.env_util import is_wrapped

        return is_wrapped(self.env, wrapper_class)

    def close(self) -> None:
        self.env.close()

    # -- population evaluation -----------------------------------------------------------------
    def evaluate(self, rules: Mapping[str, Mapping[str, Any]], max_batches: int | None = None) -> dict[str, Any]:
        """``{"reward": ..., **info}`` for one recipe, as :func:`qenv.envs.episodes.score_recipe` gives it."""
        if self.init_error is not None:
            raise self.init_error
        return evaluate_recipe(self.env, Recipe.from_dict(rules), max_batches)

    # -- fault injection (tests) ---------------------------------------------------------------
    def crash(self) -> None:
        """End this worker's process at once, as a segfault or an OOM kill would."""
        os._exit(17)


def evaluate_recipe(env: gym.Env, recipe: Recipe, max_batches: int | None = None) -> dict[str, Any]:
    """One recipe scored with ``env``'s own evaluator and reward: ``{"reward": r, **info}``.

    A recipe that the action space can express and that meets the budget is played as one
    episode (one action per layer), so its reward is exactly the environment's return, dense
    terms included, and ``info`` is the terminal info plus ``episode_return`` and ``budget_met``
    (what the searchers record). Any other recipe (rules outside the action space, over a hard
    budget, a multi-model env) and the cheap ``max_batches`` estimate are scored by
    :func:`qenv.envs.episodes.score_recipe`: the same evaluator and terminal reward, without dense terms.
    """
    from qenv.envs.episodes import score_recipe

    if max_batches is None:
        actions = episode_actions(env, recipe)
        if actions is not None:
            from qenv.envs.episodes import play_episode

            return play_episode(env, actions)
    reward, info = score_recipe(env, recipe, max_batches=max_batches)
    return {"reward": reward, **info}


def episode_actions(env: gym.Env, recipe: Recipe) -> list[Any] | None:
    """The actions that make an episode of ``env`` produce exactly ``recipe`` (None if none do)."""
    from qenv.envs.episodes import base_env, rule_to_action

    inner = base_env(env)
    if len(inner.tasks) > 1:
        return None
    rules = [recipe.rule_for(info.name) for info in inner.task.layers]
    if any(name not in {info.name for info in inner.task.layers} for name in recipe):
        return None
    bits = sum(layer_bits(rule, info.out_features, info.in_features) for rule, info in zip(rules, inner.task.layers))
    if inner.budget_mode == "hard" and bits > inner.budget_bits + 1e-9:
        return None  # the env would lower some actions: score the recipe as given instead
    try:
        return [rule_to_action(inner.mapper, rule) for rule in rules]
    except QenvError:
        return None
