"""The SB3 callbacks of a training run (as ``stable_baselines3.common.callbacks``):
:class:`QuantEpisodeCallback` feeds the episode tracker and TensorBoard from SB3's ``infos``,
:class:`AtomicCheckpointCallback` saves checkpoints at rollout boundaries and
:class:`TqdmProgressCallback` draws the progress bar. The evaluation callback is in
:mod:`qenv.training.evaluation`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qenv.training.episodes import EpisodeTracker, is_terminal_info
from qenv.training.logger import TBLogger, hparam_value, purge_tensorboard, sb3_tensorboard_writer

try:  # SB3 is a dependency; keep the module importable for the plain tracker without it
    from stable_baselines3.common.callbacks import BaseCallback
except ImportError:  # pragma: no cover
    BaseCallback = object  # type: ignore[misc,assignment]


class QuantEpisodeCallback(BaseCallback):
    """Records every finished episode (from the vec env's ``infos``) and logs it to TensorBoard.

    Args:
        tracker: where episodes and the best recipe are kept.
        best_path: ``best_recipe.json``, rewritten (atomically) whenever the best improves.
        hparams: logged once as TensorBoard HParams at the start of training.
        layer_sizes: ``{layer: (out, in)}`` for the bpw column of the best-recipe text.
        best_extra: extra fields stored in ``best_recipe.json``.
        multi_model, multi_budget: also log each model's (budget's) episodes under its own tags.
    """

    def __init__(self, tracker: EpisodeTracker, best_path: str | Path | None = None,
                 hparams: Mapping[str, Any] | None = None, layer_sizes: Mapping[str, tuple[int, int]] | None = None,
                 multi_model: bool = False, best_extra: Mapping[str, Any] | None = None, multi_budget: bool = False,
                 purge_step: int | None = None, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.purge_step = purge_step
        self.tracker = tracker
        self.best_path = None if best_path is None else Path(best_path)
        self.hparam_dict = dict(hparams or {})
        self.layer_sizes = dict(layer_sizes or {})
        self.multi_model = multi_model
        self.multi_budget = multi_budget
        self.best_extra = dict(best_extra or {})
        self.tb: TBLogger | None = None
        self._returns: np.ndarray | None = None

    def _on_training_start(self) -> None:
        writer = sb3_tensorboard_writer(self.logger)
        self.tb = None if writer is None else TBLogger(writer, self.multi_model, self.multi_budget)
        if writer is not None and self.purge_step is not None:
            purge_tensorboard(writer, self.purge_step)
        self._returns = np.zeros(self.training_env.num_envs, dtype=np.float64)
        if self.tb is not None and self.hparam_dict:
            from stable_baselines3.common.logger import HParam

            metrics = {"episode/reward": 0.0, "episode/kl": 0.0, "episode/bpw": 0.0}
            self.logger.record("hparams", HParam({k: hparam_value(v) for k, v in self.hparam_dict.items()}, metrics),
                               exclude=("stdout", "log", "json", "csv"))
            self.logger.dump(self.num_timesteps)

    def _on_step(self) -> bool:
        rewards = np.asarray(self.locals.get("rewards", []), dtype=np.float64).reshape(-1)
        dones = np.asarray(self.locals.get("dones", []), dtype=bool).reshape(-1)
        infos = self.locals.get("infos", [])
        if self._returns is None or self._returns.shape[0] != rewards.shape[0]:
            self._returns = np.zeros(rewards.shape[0], dtype=np.float64)
        self._returns += rewards
        for i in np.flatnonzero(dones):
            info = infos[i] if i < len(infos) else {}
            total = float(self._returns[i])
            self._returns[i] = 0.0
            if not is_terminal_info(info):
                continue
            if isinstance(info.get("episode"), Mapping) and "r" in info["episode"]:
                total = float(info["episode"]["r"])  # Monitor's return: raw rewards, whatever wraps the env
            self.record(info, total, self.num_timesteps)
        return True

    def record(self, info: Mapping[str, Any], reward: float, timestep: int) -> None:
        record, is_best = self.tracker.add(info, reward, timestep)
        if self.tb is not None:
            self.tb.episode(record, info)
        if is_best:
            if self.tb is not None and self.tracker.best is not None:
                self.tb.best_text(self.tracker.best, self.layer_sizes)
            if self.best_path is not None:
                self.tracker.write_best(self.best_path, **self.best_extra)


class AtomicCheckpointCallback(BaseCallback):
    """Calls ``save(num_timesteps)`` every ``save_freq`` timesteps, at the start of a rollout.

    At a rollout's start the policy holds every update so far and, for on-policy algorithms,
    ``num_timesteps`` is a whole number of rollouts, so a resumed run ends on the same total.
    ``last_rollout_start`` is where an interrupted on-policy run can be rewound to (the partial
    rollout is lost anyway: on-policy algorithms only learn from complete rollouts).
    """

    def __init__(self, save_freq: int, save: Callable[[int], Any], verbose: int = 0) -> None:
        super().__init__(verbose)
        self.save_freq = max(1, int(save_freq))
        self.save = save
        self.last_saved: int | None = None
        self.last_rollout_start: int | None = None

    def _on_training_start(self) -> None:
        if self.last_saved is None:
            self.last_saved = self.num_timesteps

    def _on_rollout_start(self) -> None:
        self.last_rollout_start = self.num_timesteps
        if self.last_saved is not None and self.num_timesteps - self.last_saved >= self.save_freq:
            self.save(self.num_timesteps)
            self.last_saved = self.num_timesteps

    def _on_step(self) -> bool:
        return True



class TqdmProgressCallback(BaseCallback):
    """A progress bar over the whole run (starts at the resumed step count): :func:`qenv.progress.progress_bar`."""

    def __init__(self, total: int, initial: int = 0, desc: str = "training", disable: bool = False) -> None:
        super().__init__(0)
        self.total, self.initial, self.desc, self.disable = int(total), int(initial), desc, disable
        self.bar: Any = None

    def _on_training_start(self) -> None:
        from qenv.progress import progress_bar

        # a tqdm bar on a terminal; a line per tenth of the run in a log (no carriage returns)
        self.bar = progress_bar(self.total, self.desc, "step", initial=self.initial, show=not self.disable)

    def _on_step(self) -> bool:
        if self.bar is not None:
            self.bar.update(self.model.num_timesteps - self.bar.n)
        return True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _on_training_end(self) -> None:
        self.close()
