"""Checkpoints of a run: atomic saves of the agent and its state, their names, pruning, finding
the latest complete one to resume from, and the wall time carried across sessions."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qenv.io import atomic_path, write_json_atomic
from qenv.signals import stop_signals_deferred

CHECKPOINT_RE = re.compile(r"step_(\d+)\.zip")  # matched with fullmatch ("$" passes a final newline)


def save_agent_atomic(agent: Any, path: str | Path) -> Path:
    """``agent.save`` into a temporary file beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        written = agent.save(tmp)
        if tmp.stat().st_size == 0 and written is not None and Path(written).is_file() and Path(written) != tmp:
            Path(written).replace(tmp)  # an agent that insisted on its own suffix
    return path


def checkpoint_paths(folder: str | Path, step: int) -> tuple[Path, Path]:
    folder = Path(folder)
    return folder / f"step_{int(step):010d}.zip", folder / f"step_{int(step):010d}.json"


def write_checkpoint(folder: str | Path, agent: Any, step: int, state: Mapping[str, Any]) -> Path:
    """The agent as ``step_<N>.zip`` and the run state as ``step_<N>.json`` (written last: it marks
    the checkpoint complete)."""
    model_path, state_path = checkpoint_paths(folder, step)
    save_agent_atomic(agent, model_path)
    write_json_atomic(state_path, {**state, "num_timesteps": int(step)})
    return model_path


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (``keep`` <= 0: keep all)."""
    folder = Path(folder)
    if keep <= 0 or not folder.is_dir():
        return
    steps = sorted(int(m.group(1)) for p in folder.iterdir() if (m := CHECKPOINT_RE.fullmatch(p.name)))
    complete = [s for s in steps if checkpoint_paths(folder, s)[1].is_file()]
    for step in complete[:-keep]:
        model, state = checkpoint_paths(folder, step)
        state.unlink(missing_ok=True)  # first: the state marks the pair complete
        model.unlink(missing_ok=True)
        for extra in Path(folder).glob(f"step_{int(step):010d}.best_model.*"):
            extra.unlink(missing_ok=True)


def best_model_copy(folder: str | Path, step: int, name: str = "best_model.zip") -> Path:
    """Where a checkpoint keeps the run's ``best_model.zip`` of that moment (and, by ``name``, the
    statistics beside it; ``--eval-freq``), so that a resumed run's best model is the one its
    restored evaluations describe."""
    return Path(folder) / f"step_{int(step):010d}.{name}"


def latest_checkpoint(folder: str | Path) -> tuple[int, Path, Path] | None:
    """``(step, model, state)`` of the newest complete checkpoint in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_RE.fullmatch(path.name)
        if match:
            step = int(match.group(1))
            state = checkpoint_paths(folder, step)[1]
            if state.is_file():
                found.append((step, path, state))
    return max(found) if found else None


def sigint_deferred() -> Any:
    """Hold Ctrl-C and SIGTERM back while files are being saved; see :func:`qenv.signals.stop_signals_deferred`."""
    return stop_signals_deferred()


class Stopwatch:
    """Wall time of this session plus what earlier sessions of a resumed run took."""

    def __init__(self, before: float = 0.0) -> None:
        self.before = float(before)
        self.start = time.perf_counter()

    @property
    def total(self) -> float:
        return self.before + time.perf_counter() - self.start
