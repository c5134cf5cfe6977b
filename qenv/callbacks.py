"""The names of :mod:`qenv.training` under their old home, for code written against ``qenv.callbacks``.

The training bookkeeping is split by concern in :mod:`qenv.training` (episodes, callbacks,
evaluation, logger, plots, checkpoints); import from there in new code.
"""

from __future__ import annotations

from qenv.training.callbacks import AtomicCheckpointCallback, QuantEpisodeCallback, TqdmProgressCallback
from qenv.training.checkpoints import (
    CHECKPOINT_RE,
    Stopwatch,
    best_model_copy,
    checkpoint_paths,
    latest_checkpoint,
    prune_checkpoints,
    save_agent_atomic,
    sigint_deferred,
    write_checkpoint,
)
from qenv.training.episodes import (
    BEST_KEYS,
    EPISODE_KEYS,
    EpisodeRecorder,
    EpisodeTracker,
    is_terminal_info,
    report_scored_episode,
)
from qenv.training.evaluation import DeterministicEvalCallback
from qenv.training.logger import TBLogger, purge_tensorboard, sb3_tensorboard_writer, wait_past_event_files
from qenv.training.plots import pareto_figure, place_labels, recipe_markdown, save_figure

__all__ = [
    "AtomicCheckpointCallback", "BEST_KEYS", "CHECKPOINT_RE", "DeterministicEvalCallback", "EPISODE_KEYS",
    "EpisodeRecorder", "EpisodeTracker", "QuantEpisodeCallback", "Stopwatch", "TBLogger", "TqdmProgressCallback",
    "best_model_copy", "checkpoint_paths", "is_terminal_info", "latest_checkpoint", "pareto_figure", "place_labels",
    "prune_checkpoints", "purge_tensorboard", "recipe_markdown", "report_scored_episode", "save_agent_atomic",
    "save_figure", "sb3_tensorboard_writer", "sigint_deferred", "wait_past_event_files", "write_checkpoint",
]
