"""``RayVecEnv``: Stable-Baselines3's vectorized-env interface over Ray actors.

Each environment lives in its own Ray actor (one process, one model replica), pinned to its own
GPU (``num_gpus=1``) when the cluster has GPUs, else to a slice of the CPUs. SB3 uses it as it uses
``DummyVecEnv``/``SubprocVecEnv``: same auto-reset, ``terminal_observation`` and
``TimeLimit.truncated`` in the infos, same seeding (``seed``/``set_options`` apply at the next
``reset``), ``env_method``/``get_attr``/``set_attr``.

Failures: when an actor dies (crash, OOM kill, lost node) during a call, a fresh actor replaces it,
is brought to the exact state of the old one (``set_attr`` calls re-applied, the current episode
reset as it was, seed or RNG state included, and its actions replayed; the replay's observation
must equal the last one seen) and the call is retried once. A second failure of the same call
raises a :class:`~qenv.errors.QenvError`. Replayed steps are not reported again, so no
transition is lost or counted twice. ``env_method`` calls are not replayed: change settings
with ``set_attr``. Pass ``monitor_dir=None`` (SB3's default) with this backend: a restarted
actor would reopen its Monitor file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from copy import deepcopy
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn
from stable_baselines3.common.vec_env.subproc_vec_env import _stack_obs

from qenv.distributed import _ray
from qenv.distributed.worker import EnvWorker
from qenv.errors import QenvError


class RayVecEnv(VecEnv):
    """Vectorized environment whose workers are Ray actors.

    Args:
        env_fns: functions that build one environment each (as for ``SubprocVecEnv``; SB3's
            ``make_vec_env(..., vec_env_cls=RayVecEnv)`` passes them). They are pickled to the actors.
        num_cpus, num_gpus: resources of each actor (default: one GPU each when the cluster has
            GPUs, else an equal share of its CPUs, at most one each).
        max_retries: how often one call may be retried on a fresh actor after its actor died.
        ray_init: keyword arguments for :func:`qenv.distributed.init_ray` if Ray is not running yet.
    """

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]], *, num_cpus: float | None = None,
                 num_gpus: float | None = None, max_retries: int = 1,
                 ray_init: dict[str, Any] | None = None) -> None:
        self.ray = _ray.init_ray(**(ray_init or {}))
        self.env_fns = list(env_fns)
        n = len(self.env_fns)
        self.num_cpus, self.num_gpus = _ray.actor_resources(n, num_cpus, num_gpus)
        self.max_retries = int(max_retries)
        self.restarts = 0
        self.waiting = False
        self.closed = False
        self._remote = _ray.remote_class(EnvWorker, self.num_cpus, self.num_gpus)
        self.actors: list[Any] = [None] * n
        # What a fresh actor needs to reach the state of worker i (see ``_restore``).
        self._attrs: list[list[tuple[str, Any]]] = [[] for _ in range(n)]
        self._starts: list[dict[str, Any] | None] = [None] * n
        self._actions: list[list[Any]] = [[] for _ in range(n)]
        self._last_obs: list[Any] = [None] * n
        self._crash_next: list[int] = [0] * n
        self.actors = [self._spawn(i) for i in range(n)]
        try:
            ready = _ray.gather([a.ready.remote() for a in self.actors], self._retry_ready,
                                lambda i: f"Starting environment worker {i}", self.max_retries)
        except BaseException:
            self._kill_all()
            raise
        observation_space, action_space, _ = ready[0]
        self.pids = [r[2] for r in ready]
        super().__init__(n, observation_space, action_space)

    # -- actors ------------------------------------------------------------------------------------
    def _spawn(self, i: int) -> Any:
        crash = self._crash_next[i] > 0  # fault injection, see inject_crash
        self._crash_next[i] -= int(crash)
        return self._remote.remote(self.env_fns[i], max(1, int(self.num_cpus)), crash)

    def _replace(self, i: int) -> Any:
        """Kill worker ``i``'s actor (if it still runs) and start a fresh one in its place."""
        _ray.kill_quietly(self.actors[i])
        self.actors[i] = self._spawn(i)
        self.restarts += 1
        return self.actors[i]

    def _retry_ready(self, i: int, exc: BaseException) -> Any:
        return self._replace(i).ready.remote()

    def _restore(self, i: int, replay: bool = True) -> Any:
        """A fresh actor for worker ``i``, in the state the dead one was in."""
        actor = self._replace(i)
        ready = _ray.get(actor.ready.remote())
        self.pids[i] = ready[2]
        start = self._starts[i] if replay else None
        obs = _ray.get(actor.restore.remote(self._attrs[i], start, self._actions[i]))
        if start is not None and not _equal_obs(obs, self._last_obs[i]):
            raise QenvError(f"Environment worker {i} was restarted after its actor died, but replaying its episode "
                            "did not reproduce the last observation: the environment is not deterministic.",
                            "make the environment depend only on its seed and actions.")
        return actor

    def _submit(self, i: int, method: str, *args: Any) -> Any:
        actor = self.actors[i]
        if self._crash_next[i] > 0:  # fault injection, see inject_crash
            self._crash_next[i] -= 1
            actor.crash.remote()
        return getattr(actor, method).remote(*args)

    def _call(self, indices: Sequence[int], method: str, *args: Any, replay: bool = True) -> list[Any]:
        """``method(*args)`` on the workers ``indices``, in parallel, with restart-and-retry."""
        indices = list(indices)

        def retry(k: int, exc: BaseException) -> Any:
            self._restore(indices[k], replay=replay)
            return self._submit(indices[k], method, *args)

        refs = [self._submit(i, method, *args) for i in indices]
        return _ray.gather(refs, retry, lambda k: f"{method}() on environment worker {indices[k]}", self.max_retries)

    def inject_crash(self, index: int, times: int = 1) -> None:
        """Testing aid: the next ``times`` actor processes of worker ``index`` end themselves with
        ``os._exit``, as after a segfault or an out-of-memory kill: the running one just before the
        next call sent to it, a fresh one (a restart) as it starts."""
        self._crash_next[index] += int(times)

    def _kill_all(self) -> None:
        for actor in self.actors:
            if actor is not None:
                _ray.kill_quietly(actor)

    # -- VecEnv API --------------------------------------------------------------------------------
    def reset(self) -> VecEnvObs:
        seeds, options = list(self._seeds), [dict(o) if o else None for o in self._options]
        refs = [self._submit(i, "reset", seeds[i], options[i]) for i in range(self.num_envs)]

        def retry(i: int, exc: BaseException) -> Any:
            self._restore(i, replay=False)
            return self._submit(i, "reset", seeds[i], options[i])

        results = _ray.gather(refs, retry, lambda i: f"reset() on environment worker {i}", self.max_retries)
        observations = []
        for i, (obs, info, before) in enumerate(results):
            self.reset_infos[i] = info
            self._starts[i] = {"seed": seeds[i], "options": options[i], "rng": before}
            self._actions[i] = []
            self._last_obs[i] = obs
            observations.append(obs)
        # Seeds and options are only used once
        self._reset_seeds()
        self._reset_options()
        return _stack_obs(observations, self.observation_space)

    def step_async(self, actions: np.ndarray) -> None:
        self._pending_actions = [np.array(actions[i], copy=True) for i in range(self.num_envs)]
        self._step_refs = [self._submit(i, "step", self._pending_actions[i]) for i in range(self.num_envs)]
        self.waiting = True

    def step_wait(self) -> VecEnvStepReturn:
        actions = self._pending_actions

        def retry(i: int, exc: BaseException) -> Any:
            self._restore(i)
            return self._submit(i, "step", actions[i])

        try:
            results = _ray.gather(self._step_refs, retry, lambda i: f"step() on environment worker {i}",
                                  self.max_retries)
        finally:
            self.waiting = False
        observations, infos = [], []
        rewards = np.zeros((self.num_envs,), dtype=np.float32)
        dones = np.zeros((self.num_envs,), dtype=bool)
        for i, (obs, reward, done, info, reset_info, before) in enumerate(results):
            rewards[i], dones[i] = reward, done
            if done:
                self.reset_infos[i] = reset_info
                self._starts[i] = {"seed": None, "options": None, "rng": before}
                self._actions[i] = []
            else:
                self._actions[i].append(actions[i])
            if "terminal_observation" in info:  # arrays from Ray are read-only views; hand SB3 its own
                info["terminal_observation"] = _copy_obs(info["terminal_observation"])
            self._last_obs[i] = obs
            observations.append(obs)
            infos.append(info)
        return _stack_obs(observations, self.observation_space), rewards, dones, infos

    def close(self) -> None:
        if self.closed:
            return
        if self.waiting:
            try:
                self.step_wait()
            except Exception:
                pass
        try:
            self.ray.get([a.close.remote() for a in self.actors])
        except Exception:
            pass
        self._kill_all()
        self.closed = True

    def get_images(self) -> Sequence[np.ndarray | None]:
        if self.render_mode != "rgb_array":
            import warnings

            warnings.warn(f"The render mode is {self.render_mode}, but this method assumes it is `rgb_array` "
                          "to obtain images.")
            return [None for _ in range(self.num_envs)]
        return self._call(range(self.num_envs), "render")

    def has_attr(self, attr_name: str) -> bool:
        return all(self._call(range(self.num_envs), "has_attr", attr_name))

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return self._call(self._get_indices(indices), "get_attr", attr_name)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        indices = list(self._get_indices(indices))
        self._call(indices, "set_attr", attr_name, value)
        for i in indices:
            self._attrs[i].append((attr_name, deepcopy(value)))

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        return self._call(self._get_indices(indices), "env_method", method_name, method_args, method_kwargs)

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return self._call(self._get_indices(indices), "is_wrapped", wrapper_class)

    def __del__(self) -> None:  # actors end with the driver anyway; this frees them earlier
        try:
            if not self.closed:
                self._kill_all()
        except Exception:
            pass


def _equal_obs(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal_obs(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_equal_obs(x, y) for x, y in zip(a, b))
    return np.array_equal(np.asarray(a), np.asarray(b))


def _copy_obs(obs: Any) -> Any:
    if isinstance(obs, dict):
        return {k: _copy_obs(v) for k, v in obs.items()}
    if isinstance(obs, tuple):
        return tuple(_copy_obs(v) for v in obs)
    return np.array(obs, copy=True)
