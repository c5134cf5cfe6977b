"""Ray plumbing shared by :class:`RayVecEnv` and :class:`RayEvaluatorPool`.

Ray stays optional: nothing here imports it at module level; :func:`require_ray` does, and turns
its absence into a :class:`QenvError` that says how to install it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

from qenv.errors import QenvError

INSTALL_FIX = "pip install qenv[ray]  (or: pip install 'ray>=2.9')"


def require_ray() -> Any:
    """The ``ray`` module, or a :class:`QenvError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise QenvError("The Ray backend needs the 'ray' package, which is not installed.", INSTALL_FIX) from None
    return ray


def init_ray(num_cpus: int | None = None, num_gpus: int | None = None, *, address: str | None = None,
             temp_dir: str | os.PathLike | None = None, **kwargs: Any) -> Any:
    """Connect to Ray once per process and return the ``ray`` module (idempotent).

    With ``address`` or the ``RAY_ADDRESS`` environment variable set (``auto``, ``host:6379`` or
    ``ray://host:10001``), connects to that existing cluster; ``num_cpus``/``num_gpus`` are then
    the cluster's business and ignored. Otherwise starts a local Ray without a dashboard, limited
    to ``num_cpus``/``num_gpus`` (default: what the machine has), with its session files under
    ``temp_dir`` (default: Ray's own, ``$RAY_TMPDIR`` or the system temp folder). Extra keyword
    arguments go to ``ray.init``. Every node of a cluster needs qenv installed.
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray
    kwargs.setdefault("ignore_reinit_error", True)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **kwargs)
    else:
        if temp_dir is not None:
            kwargs["_temp_dir"] = str(temp_dir)
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **kwargs)
    return ray


def actor_resources(n_actors: int, num_cpus: float | None, num_gpus: float | None) -> tuple[float, float]:
    """``(num_cpus, num_gpus)`` for each of ``n_actors`` actors.

    Default: one GPU per actor when the cluster has GPUs (so each actor, and its model replica,
    gets its own card), else an equal slice of the cluster's CPUs (at most one CPU each, so that
    more actors than cores can still all be scheduled).
    """
    ray = require_ray()
    if n_actors < 1:
        raise QenvError(f"n_envs/n_actors={n_actors} must be at least 1.")
    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0.0)), float(resources.get("CPU", 1.0))
    if num_gpus is None:
        num_gpus = 1.0 if gpus >= 1 else 0.0
    if num_gpus > 0 and n_actors * num_gpus > gpus + 1e-9:
        raise QenvError(f"{n_actors} actors with num_gpus={num_gpus:g} each need {n_actors * num_gpus:g} GPUs, "
                        f"but the Ray cluster has {gpus:g}.",
                        "use fewer actors, a GPU fraction (num_gpus=0.5 puts two replicas on a card), or num_gpus=0.")
    if num_cpus is None:
        share = cpus / n_actors
        num_cpus = min(1.0, math.floor(share * 100) / 100) if share < 1 else 1.0
        num_cpus = max(num_cpus, 0.01)
    free = ray.available_resources()
    free_cpu, free_gpu = float(free.get("CPU", 0.0)), float(free.get("GPU", 0.0))
    if n_actors * num_cpus > free_cpu + 1e-9 or n_actors * num_gpus > free_gpu + 1e-9:
        warnings.warn(f"{n_actors} actors asking for num_cpus={num_cpus:g}, num_gpus={num_gpus:g} each do not fit in "
                      f"what the Ray cluster has free now (CPU {free_cpu:g}, GPU {free_gpu:g}); they wait until other "
                      "actors end (or the cluster grows). Pass smaller num_cpus/num_gpus to share.", stacklevel=3)
    return float(num_cpus), float(num_gpus)


def remote_class(cls: type, num_cpus: float, num_gpus: float) -> Any:
    """``ray.remote(cls)`` with these resources; failures are handled by the caller (no Ray restarts)."""
    ray = require_ray()
    return ray.remote(cls).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_task_retries=0)


def is_actor_failure(exc: BaseException) -> bool:
    """True for errors that mean the actor process is gone (crash, kill, node loss), not a bug in the call."""
    ray = require_ray()
    return isinstance(exc, ray.exceptions.RayActorError) and not exc.actor_init_failed


def get(ref: Any) -> Any:
    """``ray.get`` that re-raises a user error raised in an actor as the plain :class:`QenvError`
    (problem and fix, no remote traceback). Other errors pass through: Ray's task error (also an
    instance of the original exception's class, with the actor's traceback) or an actor death."""
    ray = require_ray()
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, QenvError):
            raise QenvError(exc.cause.problem, exc.cause.fix) from None
        raise


def kill_quietly(actor: Any) -> None:
    ray = require_ray()
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already dead or never started
        pass


def gather(refs: list[Any], retry: Callable[[int, BaseException], Any], what: Callable[[int], str],
           max_retries: int = 1) -> list[Any]:
    """Results of ``refs`` in order; an item whose actor died is resubmitted by ``retry(i, exc)``
    (which restarts the actor and returns a new ref) up to ``max_retries`` times, then fails.

    Each item's result is recorded exactly once, at its own index, whatever order they finish in.
    """
    ray = require_ray()
    results: list[Any] = [None] * len(refs)
    attempts = [0] * len(refs)
    pending = {ref: i for i, ref in enumerate(refs)}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done[0])
        try:
            results[i] = get(done[0])
        except Exception as exc:
            pending[resubmit(i, exc, attempts, retry, what, max_retries)] = i
    return results


def resubmit(i: int, exc: BaseException, attempts: list[int], retry: Callable[[int, BaseException], Any],
             what: Callable[[int], str], max_retries: int) -> Any:
    """After item ``i`` failed with ``exc``: re-raise a bug, or restart its actor and resubmit it
    (a restart that dies again counts as another failure); a failure past ``max_retries`` is a
    :class:`QenvError`."""
    while True:
        if not is_actor_failure(exc):
            raise exc
        attempts[i] += 1
        if attempts[i] > max_retries:
            raise failure_error(what(i), attempts[i], exc) from None
        try:
            return retry(i, exc)
        except Exception as again:
            exc = again


def failure_error(what: str, attempts: int, exc: BaseException) -> QenvError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return QenvError(f"{what} failed {attempts} times: its Ray actor died ({type(exc).__name__}: {reason}).",
                     "look at the actor's log in the Ray session folder (out of memory? GPU fault? killed node?); "
                     "lower batch_size or the number of actors per node, or run without --backend ray.")
