"""TensorBoard output of a run: per-episode scalars, the recipe histogram and text, HParams, and
the purge that lets a resumed run replace what the interrupted session logged after its checkpoint."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qenv.training.plots import recipe_markdown


def hparam_value(value: Any) -> bool | int | float | str:
    """A setting as a value TensorBoard's HParams take (a type by its name, anything else as text)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if value is None:
        return "None"
    if isinstance(value, type):
        return value.__name__
    return str(value)


class TBLogger:
    """Writes training records to a TensorBoard ``SummaryWriter``: every episode under ``episode/``,
    and with several models (budgets) also under ``episode/<model>/`` (``episode/budget_<b>/``), since
    one curve over episodes of different models or sizes mixes their scales."""

    def __init__(self, writer: Any, multi_model: bool = False, multi_budget: bool = False) -> None:
        self.writer = writer
        self.multi_model = multi_model
        self.multi_budget = multi_budget

    def episode(self, record: Mapping[str, Any], info: Mapping[str, Any]) -> None:
        step = int(record["t"])
        w = self.writer
        prefixes = ["episode"] + ([f"episode/{record['model']}"] if self.multi_model and record.get("model") else [])
        if self.multi_budget and record.get("budget_bpw") is not None:
            prefixes.append(f"episode/budget_{record['budget_bpw']:g}")
        for prefix in prefixes:
            w.add_scalar(f"{prefix}/reward", record["reward"], step)
            for key, tag in (("kl", "kl"), ("ppl", "perplexity"), ("top1", "top1"), ("bpw", "bpw"),
                             ("model_mb", "model_mb"), ("clamped_actions", "clamped_actions"),
                             ("fidelity_reward", "fidelity_reward")):
                if record.get(key) is not None:
                    w.add_scalar(f"{prefix}/{tag}", record[key], step)
        rules = info.get("recipe_rules", {})
        if rules:
            bits = np.array([float(r.get("bits", 16)) for r in rules.values()], dtype=np.float64)
            w.add_histogram("recipe/bits_per_layer", bits, step, bins=np.arange(1.5, 17.5, 1.0))

    def best_text(self, best: Mapping[str, Any], layer_sizes: Mapping[str, tuple[int, int]] | None = None) -> None:
        self.writer.add_text("recipe/best", recipe_markdown(best, layer_sizes), int(best.get("t", 0)))

    def hparams(self, hparam_dict: Mapping[str, Any], metric_dict: Mapping[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        clean = {k: hparam_value(v) for k, v in hparam_dict.items()}
        experiment, start, end = hparams(clean, metric_dict=dict(metric_dict))
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(start)
        self.writer.file_writer.add_summary(end)

    def figure(self, tag: str, fig: Any, step: int) -> None:
        self.writer.add_figure(tag, fig, int(step), close=False)

    def flush(self) -> None:
        self.writer.flush()


def purge_tensorboard(writer: Any, step: int) -> None:
    """Tell TensorBoard to drop what earlier sessions logged at ``step`` and after.

    A resumed run starts again from its checkpoint: whatever the interrupted (or killed) session
    logged after it is replaced by what the resumed one logs, instead of both showing and the curves
    jumping back. This is what ``SummaryWriter(purge_step=...)`` writes: a session-start event at
    ``step``, on which TensorBoard discards earlier events at that step or later.
    """
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    writer.file_writer.add_event(Event(step=int(step), file_version="brain.Event:2"))
    writer.file_writer.add_event(Event(step=int(step), session_log=SessionLog(status=SessionLog.START)))
    writer.flush()


def wait_past_event_files(folder: str | Path) -> None:
    """Wait (at most a second) until a new TensorBoard event file would sort after every one in ``folder``.

    TensorBoard reads a run's event files in name order, and a name starts with its creation time
    in whole seconds (then host and PID): a resumed session that starts in the same second as the
    session it continues could be read first, and its purge of that session's later steps lost.
    """
    stamps = [int(part) for p in Path(folder).rglob("events.out.tfevents.*")
              if len(parts := p.name.split(".")) > 3 and (part := parts[3]).isdigit()]
    newest = max(stamps, default=0)
    while int(time.time()) <= newest:
        time.sleep(0.02)


def sb3_tensorboard_writer(logger: Any) -> Any | None:
    """The ``SummaryWriter`` of an SB3 logger's TensorBoard output, if it has one."""
    from stable_baselines3.common.logger import TensorBoardOutputFormat

    for fmt in getattr(logger, "output_formats", []):
        if isinstance(fmt, TensorBoardOutputFormat):
            return fmt.writer
    return None
