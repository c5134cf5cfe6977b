"""Stop signals: SIGTERM and SIGHUP are handled like Ctrl-C (SIGINT), and none lands in the middle of a save.

A program that has work to save (``train_agent.py``) catches :class:`KeyboardInterrupt` to write a
checkpoint and a summary; :func:`terminate_as_interrupt` makes SIGTERM (what ``kill``, ``timeout``,
batch schedulers and container runtimes send) raise :class:`Terminated`, and SIGHUP (a closed
terminal, a dropped SSH session) :class:`HungUp`, both ``KeyboardInterrupt``, so the same code runs
for all three. :func:`stop_signals_deferred` holds them back while files are written. Exit statuses
follow the shell's convention: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_HUNG_UP = 129  # 128 + SIGHUP
#: the signals that stop a program as Ctrl-C does (SIGHUP does not exist on Windows)
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises ``KeyboardInterrupt`` (and caught by the same handlers)."""

    signal_name = "SIGTERM"


class HungUp(Terminated):
    """SIGHUP (the terminal closed), raised and handled as :class:`Terminated` is."""

    signal_name = "SIGHUP"


def signal_name(exc: BaseException) -> str:
    """``"SIGTERM"`` for :class:`Terminated`, ``"SIGHUP"`` for :class:`HungUp`, else ``"SIGINT"`` (Ctrl-C)."""
    return getattr(exc, "signal_name", "SIGINT")


def exit_status_of(name: str | None) -> int:
    """The shell's exit status after the stop signal ``name``: 130 (SIGINT), 143 (SIGTERM), 129 (SIGHUP)."""
    return {"SIGTERM": EXIT_TERMINATED, "SIGHUP": EXIT_HUNG_UP}.get(str(name), EXIT_INTERRUPTED)


def exit_status(exc: BaseException) -> int:
    """130 after Ctrl-C, 143 after SIGTERM, 129 after SIGHUP."""
    return exit_status_of(signal_name(exc))


def stopped_message(name: str | None) -> str:
    """``"interrupted"`` after Ctrl-C, ``"terminated (SIGTERM)"`` / ``"terminated (SIGHUP)"`` otherwise."""
    return "interrupted" if name in (None, "SIGINT") else f"terminated ({name})"


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _raise_hung_up(signum: int, frame: Any) -> None:
    # the terminal is gone: a write to it would fail (EIO) in the middle of saving the checkpoint, so
    # output meant for it goes nowhere from now on (files and pipes still get theirs)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        devnull = None
    if devnull is not None:
        for fd in (1, 2):
            try:
                if stat.S_ISCHR(os.fstat(fd).st_mode):  # a terminal (or /dev/null already)
                    os.dup2(devnull, fd)
            except OSError:
                pass
        os.close(devnull)
    raise HungUp()


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` and SIGHUP :class:`HungUp` (main thread
    only; elsewhere a no-op)."""
    handlers = {signal.SIGTERM: _raise_terminated}
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:  # nohup's choice stands
        handlers[signal.SIGHUP] = _raise_hung_up
    previous: dict[int, Any] = {}
    try:
        for signum, handler in handlers.items():
            previous[signum] = signal.signal(signum, handler)
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


@contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP back while files are being saved (main thread only).

    A signal that arrives inside the block is not lost: once the block has finished writing it is
    delivered through the handler that was in place before (``KeyboardInterrupt`` or
    :class:`Terminated`; the default action when there was none).
    """
    hits: list[int] = []

    def remember(signum: int, frame: Any) -> None:
        hits.append(signum)

    previous: dict[int, Any] = {}
    try:
        for signum in STOP_SIGNALS:
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
