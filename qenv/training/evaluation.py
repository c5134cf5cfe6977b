"""Evaluation while training: :class:`DeterministicEvalCallback`, SB3's ``EvalCallback`` for
qenv's deterministic environment (one episode per model, the best policy kept, observations
normalised as training normalised them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qenv.io import atomic_path
from qenv.training.checkpoints import save_agent_atomic
from qenv.training.episodes import finite_float

try:  # SB3 is a dependency; keep the module importable for the plain tracker without it
    from stable_baselines3.common.callbacks import BaseCallback
except ImportError:  # pragma: no cover
    BaseCallback = object  # type: ignore[misc,assignment]


class DeterministicEvalCallback(BaseCallback):
    """SB3's ``EvalCallback`` for qenv's deterministic environment: one deterministic episode of
    the current policy on each of the eval env's ``n_models`` models (``reset(options={"model_index":
    i})``) at the first rollout start at or after each multiple of ``eval_freq`` timesteps, and at
    the end of training when a multiple falls there (the policy only changes between rollouts, so
    at most one evaluation per rollout); the policy with the best mean episode return is kept.

    Why not SB3's own: its ``n_eval_episodes`` reset a multi-model env to randomly drawn models,
    while here one episode per model is the exact score (the env is deterministic); and the best
    evaluation's recipes (the terminal ``info`` of each episode) are kept, not only its return.
    As SB3 and rl-zoo3 do, the best policy goes to ``<best_model_save_path>/best_model.zip`` and
    the evaluations to ``<log_path>/evaluations.npz`` (``timesteps``, ``results``, ``ep_lengths``),
    ``eval/mean_reward`` and ``eval/mean_kl`` to the logger. A policy trained on ``VecNormalize``d
    observations is asked with the training env's statistics (``normalize_obs``; ``on_new_best``
    can save them beside ``best_model.zip``, as train_agent.py does). Each evaluation
    plays ``n_models`` episodes more than training does: count them in any equal-evaluation
    comparison.
    """

    def __init__(self, eval_env: Any, eval_freq: int, n_models: int = 1, best_model_save_path: str | Path | None = None,
                 log_path: str | Path | None = None, on_new_best: Callable[[], Any] | None = None,
                 verbose: int = 0) -> None:
        super().__init__(verbose)
        if int(eval_freq) < 1 or int(n_models) < 1:
            raise ValueError(f"eval_freq ({eval_freq}) and n_models ({n_models}) must be positive")
        self.eval_env = eval_env
        self.eval_freq = int(eval_freq)
        self.n_models = int(n_models)
        self.best_model_save_path = Path(best_model_save_path) if best_model_save_path is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self.on_new_best = on_new_best  # e.g. the VecNormalize statistics saved beside best_model.zip
        self.next_eval: int | None = None
        self.evaluations: list[dict[str, Any]] = []
        #: the best evaluation: timesteps, mean_reward and each model's terminal info (with its recipe)
        self.best: dict[str, Any] | None = None

    def _on_training_start(self) -> None:
        if self.next_eval is None:
            self.next_eval = (self.num_timesteps // self.eval_freq + 1) * self.eval_freq

    def _due(self) -> None:
        # asked where the policy holds every update so far: at a rollout's start and at the end
        # (SB3's EvalCallback asks mid-rollout, before the last rollout's update)
        assert self.next_eval is not None
        if self.num_timesteps >= self.next_eval:
            self.next_eval = (self.num_timesteps // self.eval_freq + 1) * self.eval_freq
            self.evaluate()

    def _on_rollout_start(self) -> None:
        self._due()

    def _on_training_end(self) -> None:
        self._due()

    def _on_step(self) -> bool:
        return True

    def _predictor(self) -> Any:
        """The policy as ``rollout_recipe`` asks it: masks passed where the algorithm takes them,
        observations normalised where training normalised them."""
        import inspect

        from stable_baselines3.common.vec_env import VecNormalize, unwrap_vec_wrapper

        model = self.model
        vec = unwrap_vec_wrapper(model.get_env(), VecNormalize) if model.get_env() is not None else None
        if vec is None:
            return model
        takes_masks = "action_masks" in inspect.signature(model.predict).parameters

        class Normalized:
            def predict(self, observation: Any, state: Any = None, episode_start: Any = None,
                        deterministic: bool = True, action_masks: Any = None) -> tuple[np.ndarray, Any]:
                extra = {"action_masks": action_masks} if takes_masks and action_masks is not None else {}
                return model.predict(vec.normalize_obs(observation), state=state, episode_start=episode_start,
                                     deterministic=deterministic, **extra)
        return Normalized()

    def write_log(self) -> None:
        """``<log_path>/evaluations.npz`` in SB3's layout (rl-zoo3's plotting scripts read it)."""
        if self.log_path is None:
            return
        with atomic_path(self.log_path / "evaluations.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, timesteps=np.array([e["timesteps"] for e in self.evaluations], dtype=np.int64),
                         results=np.array([e["returns"] for e in self.evaluations], dtype=np.float64),
                         ep_lengths=np.array([e["lengths"] for e in self.evaluations], dtype=np.int64))

    def evaluate(self) -> dict[str, Any]:
        """One deterministic episode per model now; returns this evaluation's record."""
        from qenv.envs.episodes import rollout_recipe

        predictor = self._predictor()
        infos = []
        for i in range(self.n_models):
            options = {"model_index": i} if self.n_models > 1 else None
            infos.append(rollout_recipe(predictor, self.eval_env, deterministic=True, reset_options=options)[1])
        returns = [float(info["episode_return"]) for info in infos]
        record = {"timesteps": int(self.num_timesteps), "mean_reward": float(np.mean(returns)), "returns": returns,
                  "kl": [finite_float(info.get("kl")) for info in infos],
                  "bpw": [finite_float(info.get("bpw")) for info in infos],
                  "lengths": [len(info.get("recipe") or {}) for info in infos]}
        self.evaluations.append(record)
        self.logger.record("eval/mean_reward", record["mean_reward"])
        kls = [k for k in record["kl"] if k is not None]
        if kls:
            self.logger.record("eval/mean_kl", float(np.mean(kls)))
        self.logger.dump(self.num_timesteps)  # as SB3's EvalCallback: now, at this step (the last one too)
        self.write_log()
        if self.best is None or record["mean_reward"] > self.best["mean_reward"]:
            self.best = {"timesteps": record["timesteps"], "mean_reward": record["mean_reward"], "infos": infos}
            if self.best_model_save_path is not None:
                self.best_model_save_path.mkdir(parents=True, exist_ok=True)
                save_agent_atomic(self.model, self.best_model_save_path / "best_model.zip")
            if self.on_new_best is not None:
                self.on_new_best()
            if self.verbose:
                print(f"eval at {record['timesteps']} timesteps: new best mean reward {record['mean_reward']:+.4f}")
        return record
