"""Scale-out: vectorized environments and recipe evaluation on several processes, GPUs or nodes.

- :func:`make_vec_env_backend` builds SB3's vectorized env for a backend name: ``dummy`` (one
  process), ``subproc`` (one process per env on this machine) or ``ray`` (:class:`RayVecEnv`, one
  Ray actor per env, each with its own GPU when there are GPUs; across nodes with ``RAY_ADDRESS``).
- :class:`LocalEvaluatorPool` / :class:`RayEvaluatorPool` score a population of recipes, in order,
  with the environment's own evaluator and reward; searchers take one as ``pool=``.
- :func:`init_ray` connects to Ray once (an existing cluster when ``RAY_ADDRESS`` is set).

Ray is optional: importing this package does not import it; using the Ray backend without it
installed raises a :class:`~qenv.errors.QenvError` saying ``pip install qenv[ray]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qenv.distributed._ray import init_ray, require_ray
from qenv.distributed.pool import LocalEvaluatorPool, RayEvaluatorPool
from qenv.errors import QenvError

BACKENDS: tuple[str, ...] = ("dummy", "subproc", "ray")


def make_vec_env_backend(env_id: str = "QuantLLM-v0", n_envs: int = 1, seed: int | None = None,
                         env_kwargs: Mapping[str, Any] | None = None, backend: str = "dummy",
                         **kwargs: Any) -> Any:
    """SB3's ``make_vec_env`` with the vectorized-env class chosen by ``backend``.

    ``dummy`` → ``DummyVecEnv``, ``subproc`` → ``SubprocVecEnv`` (whose dead workers raise
    :class:`QenvError`), ``ray`` → :class:`RayVecEnv`.
    Each env is wrapped in SB3's ``Monitor`` and seeded ``seed + rank`` at the first reset, the
    same for every backend, so the three give the same episodes. Extra keyword arguments go to
    ``make_vec_env`` (``monitor_dir``, ``wrapper_class``, ``vec_env_kwargs`` — for ``ray``:
    ``num_cpus``, ``num_gpus``, ``max_retries``, ``ray_init``).
    """
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv

    import qenv  # noqa: F401  (registers QuantLLM-v0)
    from qenv.distributed.subproc import WorkerGuardedSubprocVecEnv

    if backend == "dummy":
        vec_env_cls: Any = DummyVecEnv
    elif backend == "subproc":
        vec_env_cls = WorkerGuardedSubprocVecEnv  # a dead worker is a QenvError, not a pipe traceback
    elif backend == "ray":
        require_ray()
        from qenv.distributed.ray_vec_env import RayVecEnv

        vec_env_cls = RayVecEnv
    else:
        raise QenvError(f"Unknown backend {backend!r}.", f"use one of {BACKENDS}.")
    if isinstance(env_id, str) and ":" not in env_id:
        env_id = f"qenv:{env_id}"  # gymnasium imports qenv (which registers QuantLLM-v0) in each worker process
    return make_vec_env(env_id, n_envs=n_envs, seed=seed, env_kwargs=dict(env_kwargs or {}),
                        vec_env_cls=vec_env_cls, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "RayVecEnv":  # loaded on use: it imports SB3's vec-env module (never Ray itself)
        from qenv.distributed.ray_vec_env import RayVecEnv

        return RayVecEnv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "LocalEvaluatorPool", "RayEvaluatorPool", "RayVecEnv", "init_ray", "make_vec_env_backend",
           "require_ray"]
