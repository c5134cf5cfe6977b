"""``SubprocVecEnv`` whose dead worker is a clear error instead of a pipe traceback.

When a worker process dies (killed by the out-of-memory killer, a signal, or an exception in
the environment), SB3's ``SubprocVecEnv`` fails on its next message with a bare ``EOFError``,
``BrokenPipeError`` or ``ConnectionResetError``. This subclass turns that into a
:class:`~qenv.errors.QenvError` that says which worker died and how, and lets ``close()`` finish.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any, TypeVar

from stable_baselines3.common.vec_env import SubprocVecEnv

from qenv.errors import QenvError

T = TypeVar("T")
#: what a pipe to a dead process raises
PIPE_ERRORS: tuple[type[BaseException], ...] = (EOFError, BrokenPipeError, ConnectionResetError)


def _how(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class WorkerGuardedSubprocVecEnv(SubprocVecEnv):
    """SB3's ``SubprocVecEnv``; a worker that died raises :class:`QenvError` (not a hang, not a pipe error)."""

    def _worker_died(self, exc: BaseException) -> QenvError:
        dead = []
        for i, proc in enumerate(self.processes):
            if not proc.is_alive():
                proc.join(timeout=1)
                dead.append(f"worker {i} (pid {proc.pid}): {_how(proc.exitcode)}")
        detail = "; ".join(dead) if dead else f"{type(exc).__name__} on its pipe"
        self.waiting = False
        return QenvError(
            f"A vector-env worker process died ({detail}); the environments cannot continue.",
            "a worker killed by SIGKILL is often the system's out-of-memory killer: use fewer --n-envs or "
            "--vec-env dummy (an exception in the environment is printed above); a train_agent.py run continues "
            "from its last checkpoint with --resume RUN_DIR.")

    def _guard(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except PIPE_ERRORS as exc:
            raise self._worker_died(exc) from None

    def step_async(self, actions: Any) -> None:
        self._guard(lambda: super(WorkerGuardedSubprocVecEnv, self).step_async(actions))

    def step_wait(self) -> Any:
        return self._guard(lambda: super(WorkerGuardedSubprocVecEnv, self).step_wait())

    def reset(self) -> Any:
        return self._guard(lambda: super(WorkerGuardedSubprocVecEnv, self).reset())

    def get_images(self) -> Any:
        return self._guard(lambda: super(WorkerGuardedSubprocVecEnv, self).get_images())

    def has_attr(self, attr_name: str) -> bool:
        return self._guard(lambda: super(WorkerGuardedSubprocVecEnv, self).has_attr(attr_name))

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return self._guard(lambda: super(WorkerGuardedSubprocVecEnv, self).get_attr(attr_name, indices))

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        self._guard(lambda: super(WorkerGuardedSubprocVecEnv, self).set_attr(attr_name, value, indices))

    def env_method(self, method_name: str, *method_args: Any, indices: Any = None, **method_kwargs: Any) -> list[Any]:
        return self._guard(lambda: super(WorkerGuardedSubprocVecEnv, self).env_method(
            method_name, *method_args, indices=indices, **method_kwargs))

    def env_is_wrapped(self, wrapper_class: Any, indices: Any = None) -> list[bool]:
        return self._guard(lambda: super(WorkerGuardedSubprocVecEnv, self).env_is_wrapped(wrapper_class, indices))

    def close(self) -> None:
        """Close the workers; ones that died (or stopped answering) are terminated instead."""
        if self.closed:
            return
        try:
            super().close()
        except PIPE_ERRORS:
            for proc in self.processes:
                if proc.is_alive():
                    proc.terminate()
            for proc in self.processes:
                proc.join(timeout=10)
            self.closed = True
