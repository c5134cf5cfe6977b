"""Environments for the programs: one factory that also works inside ``SubprocVecEnv`` workers."""

from __future__ import annotations

import dataclasses
import multiprocessing
import signal
from typing import Any

from qenv import ENV_ID
from qenv.errors import QenvError

#: the id that makes gymnasium import qenv first (needed in fresh worker processes)
QUALIFIED_ENV_ID = f"qenv:{ENV_ID}"
#: environment variable holding the torch CPU thread count the programs chose (read by workers)
THREADS_VAR = "QENV_TORCH_THREADS"


def set_torch_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads for torch here and in worker processes started later.

    The models of these programs are small: their matrix products are too short to gain from
    several threads, and on a busy machine spinning threads cost far more (one thread was 25x
    faster than two for stories260K on 2 shared cores).
    """
    import os

    import torch

    if threads is None:
        return
    if threads < 1:
        raise QenvError(f"--threads={threads} must be at least 1.", "pass --threads 1 or more.")
    cores = available_cores()
    if threads > MAX_THREADS_PER_CORE * cores:  # thousands of threads hang or crash torch's pool
        raise QenvError(f"--threads={threads} is far more than the {cores} CPU cores this process may use.",
                        f"pass --threads {cores} or fewer.")
    if threads > cores:
        print(f"note: --threads {threads} is more than the {cores} CPU cores this process may use; using {cores}",
              flush=True)
        threads = cores
    os.environ[THREADS_VAR] = str(int(threads))
    torch.set_num_threads(int(threads))


#: ``--threads`` above this many per core is refused as a mistake (more than the cores is lowered)
MAX_THREADS_PER_CORE = 8


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def strip_env_id(env_id: str) -> str:
    return env_id.split(":", 1)[1] if ":" in env_id else env_id


def env_id_of(env_id: str) -> str:
    """The canonical id for ``--env``: ``QuantLLM-v0`` (``qenv:QuantLLM-v0`` is accepted too)."""
    if strip_env_id(str(env_id)) != ENV_ID:
        raise QenvError(f"Unknown environment {env_id!r}: these programs train and evaluate on {ENV_ID}.",
                        f"pass --env {ENV_ID} (or leave --env out).")
    return ENV_ID


def as_menu_kind(env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A run's env arguments for an env of the discrete (menu) kind on the same task, e.g. the
    searchers' env beside a residual policy: the residual-only arguments left out."""
    from qenv.envs.config import RESIDUAL_ONLY

    out = {k: v for k, v in env_kwargs.items() if k not in RESIDUAL_ONLY}
    return {**out, "action_kind": "discrete"}


def at_one_budget(env_kwargs: Any) -> Any:
    """A run's env arguments (a dict, or its :class:`~qenv.envs.config.EnvConfig`) for evaluating
    its policy at one budget (``budget_bpw``, or the one the caller sets): without ``budgets`` or
    ``budget_range``, which only its training episodes draw from."""
    from qenv.envs.config import EnvConfig

    if isinstance(env_kwargs, EnvConfig):
        return dataclasses.replace(env_kwargs, budgets=None, budget_range=None)
    return {key: value for key, value in env_kwargs.items() if key not in ("budgets", "budget_range")}


def make_quant_env(**env_kwargs: Any) -> Any:
    """``gymnasium.make("qenv:QuantLLM-v0", **env_kwargs)``.

    In a worker process (``SubprocVecEnv``) Ctrl-C, SIGTERM and SIGHUP are ignored: the main process handles
    them, saves a checkpoint and stops the workers, so no worker dies first or prints a traceback.
    """
    import os

    import gymnasium as gym

    from qenv.envs.config import check_env_arguments

    check_env_arguments(env_kwargs)  # before gymnasium wraps anything (render_mode="human" needs pygame)
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if hasattr(signal, "SIGHUP"):  # a closed terminal hangs up the whole group: the main process saves
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if os.environ.get(THREADS_VAR, "").isdigit():
            import torch

            torch.set_num_threads(int(os.environ[THREADS_VAR]))
    return gym.make(QUALIFIED_ENV_ID, **env_kwargs)


def make_vec(env_kwargs: dict[str, Any], n_envs: int = 1, seed: int = 0, vec_env: str = "dummy") -> Any:
    """``n_envs`` monitored copies of the environment on a backend: ``dummy`` (one process),
    ``subproc`` (one process per env) or ``ray`` (one Ray actor per env; see :mod:`qenv.distributed`)."""
    from qenv.distributed import make_vec_env_backend

    if n_envs < 1:
        raise QenvError(f"--n-envs={n_envs} must be at least 1.", "pass --n-envs 1 or more.")
    # Callers build one env in this process first (the programs keep one for deterministic
    # evaluation), so a bad argument is a QenvError here, not a worker's traceback; in-process
    # copies reuse its model and calibration statistics (cached per process).
    return make_vec_env_backend(make_quant_env, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs, backend=vec_env)
