"""Progress that tells the truth, in a terminal and in a log.

Every progress report qenv and its programs show goes through this module:

- :func:`progress_bar`: a tqdm bar on a terminal (stderr is a TTY); in a redirected log, a
  :class:`LineProgress` that writes one plain line (no carriage return) at each tenth of the work
  and one when it is done, to stdout beside the programs' own lines.
- :func:`stage`: one line when a set-up stage starts (loading a model, the reference pass, the
  menu) and one with its time when it ends.

The library shows nothing unless asked (``show=True``) or unless a program turned progress on
with :func:`enable` (``train_agent.py`` and ``eval_agent.py`` do, unless ``--no-progress``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

_ENABLED = False


def enable(on: bool = True) -> None:
    """Turn the stages' and the library's progress reports on (the programs do) or off."""
    global _ENABLED
    _ENABLED = bool(on)


def enabled() -> bool:
    return _ENABLED


@contextmanager
def shown(on: bool = True) -> Iterator[None]:
    """Progress on (or off) for the ``with`` block, then back as it was (a program run in-process)."""
    before = _ENABLED
    enable(on)
    try:
        yield
    finally:
        enable(before)


def interactive() -> bool:
    """True when stderr is a terminal: bars may redraw themselves there, never in a log."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """tqdm's ``update`` / ``close`` / ``n`` / ``total`` for a log: a line per tenth (at most one per
    ``min_interval`` seconds) and one at the end, each a whole line: no carriage returns."""

    def __init__(self, total: float, desc: str, unit: str = "it", initial: float = 0,
                 stream: TextIO | None = None, show: bool = True, min_interval: float = 1.0) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream, self.show, self.min_interval = stream, show, min_interval
        self.start = self._last = time.perf_counter()
        self._tenth = self._tenths()
        self.closed = False

    def _tenths(self) -> int:
        return int(10 * self.n / self.total) if self.total else 0

    def _write(self, text: str) -> None:
        if self.show:
            stream = self.stream or sys.stdout
            stream.write(text + "\n")
            stream.flush()

    def _count(self, value: float) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    def update(self, n: float = 1) -> None:
        self.n += n
        tenth = self._tenths()
        now = time.perf_counter()
        # a line per tenth, but not for work that ends within a second or two (its "done" line says it all)
        if tenth > self._tenth and self.n < self.total and now - self._last >= self.min_interval:
            self._tenth, self._last = tenth, now
            elapsed = now - self.start
            self._write(f"{self.desc}: {10 * tenth}% ({self._count(self.n)}/{self._count(self.total)} {self.unit}, "
                        f"{elapsed:.1f} s)")

    def refresh(self) -> None:
        """Nothing to redraw in a log."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        elapsed = time.perf_counter() - self.start
        self._write(f"{self.desc}: done, {self._count(self.n)} {self.unit} in {elapsed:.1f} s")


def progress_bar(total: float, desc: str, unit: str = "it", *, initial: float = 0, leave: bool = True,
                 show: bool | None = None) -> Any:
    """A progress bar over ``total`` units: tqdm on a terminal, :class:`LineProgress` in a log.

    ``show`` ``None`` follows :func:`enable`; ``False`` gives a bar that writes nothing."""
    visible = _ENABLED if show is None else bool(show)
    if visible and interactive():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                    mininterval=0.5, smoothing=0.05)
    return LineProgress(total, desc, unit, initial=initial, show=visible)


def shrink_to_done(bar: Any) -> None:
    """A bar that ends early (a searcher that needed fewer evaluations than granted) ends at 100%:
    its total becomes what was done, so it never shows an ETA for work that will not happen."""
    if bar.n < (bar.total or 0):
        bar.total = bar.n
        bar.refresh()


def note(text: str, show: bool | None = None) -> None:
    """One line of information (what a cache holds, why a process waits), when progress is shown:
    beside the stages' lines (stderr on a terminal, stdout in a log)."""
    if _ENABLED if show is None else bool(show):
        stream = sys.stderr if interactive() else sys.stdout
        stream.write(text + "\n")
        stream.flush()


@contextmanager
def stage(desc: str, show: bool | None = None) -> Iterator[None]:
    """One line as ``desc`` starts and one with its wall time as it ends (when progress is shown)."""
    visible = _ENABLED if show is None else bool(show)
    stream = sys.stderr if interactive() else sys.stdout
    start = time.perf_counter()
    if visible:
        stream.write(f"{desc} ...\n")
        stream.flush()
    yield
    if visible:
        stream.write(f"{desc}: done in {time.perf_counter() - start:.1f} s\n")
        stream.flush()


__all__ = ["LineProgress", "enable", "enabled", "interactive", "note", "progress_bar", "shown", "shrink_to_done", "stage"]
