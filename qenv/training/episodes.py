"""Episode records: what a training run keeps of each finished episode, and the best recipe.

Everything kept here comes from the environment's terminal ``info`` of each episode, i.e. from
the evaluator: reward, KL, perplexity, top-1, bits per weight, model size, the number of actions
the hard budget lowered, and the recipe itself.

- :class:`EpisodeTracker` keeps one small record per episode and the best-reward recipe (also
  per model); its state round-trips through JSON so a resumed run continues the same history.
- :class:`EpisodeRecorder` wraps an env that an agent steps itself (searchers, plug-ins), so
  their episodes reach the same tracker as an SB3 agent's (:mod:`qenv.training.callbacks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qenv.quant.rules import Recipe, Rule

#: terminal-info keys copied into each episode record
EPISODE_KEYS: tuple[str, ...] = ("kl", "ppl", "top1", "bpw", "model_mb", "clamped_actions", "fidelity_reward",
                                  "budget_bpw")
#: terminal-info keys kept with the best recipe
BEST_KEYS: tuple[str, ...] = (
    "kl", "ppl", "top1", "bpw", "model_bytes", "model_mb", "clamped_actions", "fidelity_reward", "budget_bpw",
    "reference_kl", "reference_ppl", "reference_top1", "reference",
)


def finite_float(value: Any) -> float | None:
    """``value`` as a float, or None when it is not a finite number (a record keeps no NaN)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def is_terminal_info(info: Mapping[str, Any]) -> bool:
    return "recipe_rules" in info and "kl" in info


class EpisodeTracker:
    """Episode records and the best-reward recipe seen so far (overall and per model).

    With ``budget_bpw``, only episodes at that budget can be the best (an env with ``budgets``
    samples others, whose rewards are measured against other references and whose recipes are
    other sizes); every episode is still recorded.
    """

    def __init__(self, budget_bpw: float | None = None) -> None:
        self.budget_bpw = budget_bpw
        self.episodes: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.best_by_model: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.episodes)

    def add(self, info: Mapping[str, Any], reward: float, timestep: int) -> tuple[dict[str, Any], bool]:
        """Record a finished episode; returns the record and whether it is the new overall best."""
        record: dict[str, Any] = {"n": len(self.episodes) + 1, "t": int(timestep), "model": str(info.get("model", "")),
                                  "reward": float(reward)}
        for key in EPISODE_KEYS:
            if key in info:
                record[key] = finite_float(info[key]) if key != "clamped_actions" else int(info[key])
        self.episodes.append(record)
        full = {**record, "metrics": {k: info[k] for k in BEST_KEYS if k in info},
                "rules": {name: dict(rule) for name, rule in info["recipe_rules"].items()}}
        budget = info.get("budget_bpw")
        if self.budget_bpw is not None and budget is not None and abs(float(budget) - self.budget_bpw) > 1e-9:
            return record, False
        model_best = self.best_by_model.get(record["model"])
        if model_best is None or reward > model_best["reward"]:
            self.best_by_model[record["model"]] = full
        is_best = self.best is None or reward > self.best["reward"]
        if is_best:
            self.best = full
        return record, is_best

    def best_recipe(self) -> Recipe | None:
        return None if self.best is None else Recipe({n: Rule.from_dict(r) for n, r in self.best["rules"].items()})

    def mean_reward(self, first: bool, fraction: float = 0.1, minimum: int = 5) -> float | None:
        """Mean episode reward of the first (or last) ``fraction`` of episodes (at least ``minimum``)."""
        if not self.episodes:
            return None
        n = max(minimum, int(len(self.episodes) * fraction))
        chosen = self.episodes[:n] if first else self.episodes[-n:]
        return float(np.mean([e["reward"] for e in chosen]))

    def write_best(self, path: str | Path, **extra: Any) -> Path | None:
        """``best_recipe.json``: the rules (loadable with ``Recipe.load``), metrics and where it was found."""
        if self.best is None:
            return None
        recipe = self.best_recipe()
        assert recipe is not None
        best = self.best
        by_model = {m: {"reward": b["reward"], "timestep": b["t"], "episode": b["n"], "metrics": b["metrics"],
                        "rules": b["rules"]} for m, b in self.best_by_model.items()}
        return recipe.save(path, model=best["model"], reward=best["reward"], timestep=best["t"], episode=best["n"],
                           metrics=best["metrics"], by_model=by_model, **extra)

    def state_dict(self) -> dict[str, Any]:
        return {"episodes": self.episodes, "best": self.best, "best_by_model": self.best_by_model}

    def truncate(self, timestep: int) -> int:
        """Forget the episodes that ended after ``timestep``; returns how many.

        An interrupted on-policy run is rewound to its last whole rollout and resumed from there, so
        the episodes of the partial rollout are played again: kept, they would be counted twice.
        The best recipe stays even if one of them found it: it was measured, and is still the best.
        """
        kept = [e for e in self.episodes if int(e["t"]) <= int(timestep)]
        dropped = len(self.episodes) - len(kept)
        self.episodes = kept
        return dropped

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.episodes = list(state.get("episodes", []))
        self.best = state.get("best")
        self.best_by_model = dict(state.get("best_by_model", {}))



try:
    import gymnasium as _gym

    _Wrapper = _gym.Wrapper
except ImportError:  # pragma: no cover
    _Wrapper = object  # type: ignore[misc,assignment]


class EpisodeRecorder(_Wrapper):
    """A wrapper that reports every finished episode: ``on_episode(info, return, length)``.

    For agents that step a single environment themselves (searchers, plug-ins), so their
    episodes reach the same tracker and TensorBoard logging as an SB3 agent's.
    """

    def __init__(self, env: Any, on_episode: Callable[[dict[str, Any], float, int], Any] | None = None) -> None:
        super().__init__(env)
        self.on_episode = on_episode
        self._return = 0.0
        self._length = 0

    def reset(self, **kwargs: Any) -> Any:
        self._return, self._length = 0.0, 0
        return self.env.reset(**kwargs)

    def step(self, action: Any) -> Any:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._return += float(reward)
        self._length += 1
        if (terminated or truncated) and self.on_episode is not None and is_terminal_info(info):
            self.on_episode(info, self._return, self._length)
        return obs, reward, terminated, truncated, info


def report_scored_episode(env: Any, info: dict[str, Any], reward: float, length: int) -> None:
    """Tell the :class:`EpisodeRecorder` wrapping ``env`` (if any) about a recipe that was scored without
    stepping the env (``score_recipe``: e.g. a llama.cpp mix, whose rules the action space cannot
    express), so that it reaches the same tracker, TensorBoard and ``best_recipe.json`` as played ones."""
    layer = env
    while layer is not None:
        if isinstance(layer, EpisodeRecorder):
            if layer.on_episode is not None:
                layer.on_episode(info, float(reward), int(length))
            return
        layer = getattr(layer, "env", None)
