"""Stop signals: SIGTERM is handled like Ctrl-C (SIGINT), and neither lands in the middle of a save.

A program that has work to save (``train_agent.py``) catches :class:`KeyboardInterrupt` to write a
checkpoint and a summary; :func:`terminate_as_interrupt` makes SIGTERM (what ``kill``, ``timeout``,
batch schedulers and container runtimes send) raise :class:`Terminated`, a ``KeyboardInterrupt``,
so the same code runs for both. :func:`stop_signals_deferred` holds either back while files are
written. Exit statuses follow the shell's convention: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises ``KeyboardInterrupt`` (and caught by the same handlers)."""

    signal_name = "SIGTERM"


def signal_name(exc: BaseException) -> str:
    """``"SIGTERM"`` for :class:`Terminated`, else ``"SIGINT"`` (Ctrl-C)."""
    return getattr(exc, "signal_name", "SIGINT")


def exit_status(exc: BaseException) -> int:
    """130 after Ctrl-C, 143 after SIGTERM."""
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only; elsewhere a no-op)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while files are being saved (main thread only).

    A signal that arrives inside the block is not lost: once the block has finished writing it is
    delivered through the handler that was in place before (``KeyboardInterrupt`` or
    :class:`Terminated`; the default action when there was none).
    """
    hits: list[int] = []

    def remember(signum: int, frame: Any) -> None:
        hits.append(signum)

    previous: dict[int, Any] = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, remember)
    except ValueError:  # not the main thread
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(hits):
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                signal.raise_signal(signum)
