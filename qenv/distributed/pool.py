"""Evaluator pools: score a population of recipes, in order, sequentially or on Ray actors.

Both pools have one method that matters::

    results = pool.evaluate(recipes, max_batches=None)   # list of dicts, in the recipes' order

Each dict is ``{"reward": r, **info}`` exactly as :func:`qenv.envs.episodes.score_recipe` returns it
(the environment's evaluator and reward: kl, ppl, top1, bpw, model_bytes, reference_*, recipe,
...). :class:`LocalEvaluatorPool` (the default everywhere) runs them one after the other in this
process, on an environment you already have. :class:`RayEvaluatorPool` keeps ``n_actors`` Ray
actors, each holding its own QuantLLM-v0 environment (one model replica, on its own GPU when
there are GPUs) built from the same keyword arguments, and keeps each actor busy with one recipe
at a time. Every recipe's result is recorded once, at its own index; a recipe whose actor dies is
retried once on a fresh actor, and a second death of that recipe's evaluation raises a
:class:`~qenv.errors.QenvError`.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym

from qenv.distributed import _ray
from qenv.distributed.worker import EnvWorker, evaluate_recipe
from qenv import ENV_ID
from qenv.errors import QenvError
from qenv.quant.rules import Recipe, Rule


def _recipes(recipes: Sequence[Mapping[str, Rule]]) -> list[Recipe]:
    return [r if isinstance(r, Recipe) else Recipe(dict(r)) for r in recipes]


class LocalEvaluatorPool:
    """Scores recipes one after the other with an environment of this process.

    Args:
        env: a QuantLLM-v0 environment (wrapped or not), e.g. the one a searcher was given.
        env_id, env_kwargs: build one with ``gym.make(env_id, **env_kwargs)`` when ``env`` is None.
    """

    n_workers = 1

    def __init__(self, env: gym.Env | None = None, *, env_id: str = ENV_ID,
                 env_kwargs: Mapping[str, Any] | None = None) -> None:
        if env is None:
            import qenv  # noqa: F401  (registers QuantLLM-v0)

            env = gym.make(env_id, **dict(env_kwargs or {}))
            self._owns_env = True
        else:
            self._owns_env = False
        self.env = env
        self.evaluations = 0  # recipes scored so far


    def evaluate(self, recipes: Sequence[Mapping[str, Rule]], max_batches: int | None = None) -> list[dict[str, Any]]:
        results = [evaluate_recipe(self.env, recipe, max_batches) for recipe in _recipes(recipes)]
        self.evaluations += len(results)
        return results

    def close(self) -> None:
        if self._owns_env:
            self.env.close()

    def __enter__(self) -> LocalEvaluatorPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return "LocalEvaluatorPool()"


class RayEvaluatorPool:
    """Scores recipes in parallel on Ray actors, each holding a QuantLLM-v0 env built from ``env_kwargs``.

    Args:
        env_kwargs: keyword arguments of ``gym.make(env_id, ...)``, the same as the searcher's env
            (:meth:`from_env` takes them from an env made by ``gym.make``).
        n_actors: how many actors (model replicas) evaluate at once.
        num_cpus, num_gpus: resources of each actor (default: one GPU each when the cluster has
            GPUs, else an equal share of its CPUs, at most one each).
        max_retries: how often one recipe may be retried on a fresh actor after its actor died.
        ray_init: keyword arguments for :func:`qenv.distributed.init_ray` if Ray is not running yet.
    """

    def __init__(self, env_kwargs: Mapping[str, Any] | None = None, n_actors: int = 2, *, env_id: str = ENV_ID,
                 num_cpus: float | None = None, num_gpus: float | None = None, max_retries: int = 1,
                 ray_init: dict[str, Any] | None = None) -> None:
        self.ray = _ray.init_ray(**(ray_init or {}))
        self.env_kwargs = dict(env_kwargs or {})
        self.env_id = env_id
        self.num_cpus, self.num_gpus = _ray.actor_resources(n_actors, num_cpus, num_gpus)
        self.max_retries = int(max_retries)
        self.restarts = 0
        self.evaluations = 0  # recipes scored so far
        self._crash_next = 0
        self._env_fn = functools.partial(gym.make, env_id, **self.env_kwargs)
        self._remote = _ray.remote_class(EnvWorker, self.num_cpus, self.num_gpus)
        self.actors = [self._spawn() for _ in range(n_actors)]
        try:
            _ray.gather([a.ready.remote() for a in self.actors], self._retry_ready,
                        lambda i: f"Starting evaluator actor {i}", self.max_retries)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_env(cls, env: gym.Env, n_actors: int = 2, **kwargs: Any) -> RayEvaluatorPool:
        """A pool of actors holding the same environment as ``env`` (made by ``gym.make``)."""
        spec = getattr(env, "spec", None) or getattr(getattr(env, "unwrapped", env), "spec", None)
        if spec is None:
            raise QenvError("Cannot tell how this environment was made, so the actors cannot rebuild it.",
                            "make it with gymnasium.make('QuantLLM-v0', ...) or pass env_kwargs to RayEvaluatorPool.")
        return cls(dict(spec.kwargs), n_actors, env_id=spec.id, **kwargs)

    @property
    def n_workers(self) -> int:
        return len(self.actors)

    def _spawn(self) -> Any:
        crash = self._crash_next > 0  # fault injection, see inject_crash
        self._crash_next -= int(crash)
        return self._remote.remote(self._env_fn, max(1, int(self.num_cpus)), crash)

    def _replace(self, slot: int) -> Any:
        _ray.kill_quietly(self.actors[slot])
        self.actors[slot] = self._spawn()
        self.restarts += 1
        return self.actors[slot]

    def _retry_ready(self, slot: int, exc: BaseException) -> Any:
        return self._replace(slot).ready.remote()

    def _submit(self, slot: int, rules: dict[str, Any], max_batches: int | None) -> Any:
        actor = self.actors[slot]
        if self._crash_next > 0:  # fault injection, see inject_crash
            self._crash_next -= 1
            actor.crash.remote()
        return actor.evaluate.remote(rules, max_batches)

    def inject_crash(self, times: int = 1) -> None:
        """Testing aid: the next ``times`` actor processes to run an evaluation end themselves with
        ``os._exit``, as after a segfault or an out-of-memory kill: a running actor just before the
        evaluation sent to it, a fresh one (a restart) as it starts."""
        self._crash_next += int(times)

    def evaluate(self, recipes: Sequence[Mapping[str, Rule]], max_batches: int | None = None) -> list[dict[str, Any]]:
        """Results in the order of ``recipes``; each actor evaluates one recipe at a time."""
        if not self.actors:
            raise QenvError("This RayEvaluatorPool was closed.", "make a new one.")
        payload = [recipe.to_dict() for recipe in _recipes(recipes)]
        results: list[dict[str, Any] | None] = [None] * len(payload)
        attempts = [0] * len(payload)
        queue = deque(range(len(payload)))
        free = deque(range(len(self.actors)))
        inflight: dict[Any, tuple[int, int]] = {}  # ref -> (recipe index, actor slot)

        def retry(i: int, slot: int) -> Any:
            self._replace(slot)
            return self._submit(slot, payload[i], max_batches)

        while queue or inflight:
            while queue and free:
                i, slot = queue.popleft(), free.popleft()
                inflight[self._submit(slot, payload[i], max_batches)] = (i, slot)
            done, _ = self.ray.wait(list(inflight), num_returns=1)
            i, slot = inflight.pop(done[0])
            try:
                results[i] = _ray.get(done[0])
            except Exception as exc:
                ref = _ray.resubmit(i, exc, attempts, lambda i, _exc, slot=slot: retry(i, slot),
                                    lambda i: f"Evaluating recipe {i} of {len(payload)}", self.max_retries)
                inflight[ref] = (i, slot)
            else:
                free.append(slot)
        self.evaluations += len(results)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for actor in self.actors:
            _ray.kill_quietly(actor)
        self.actors = []

    def __enter__(self) -> RayEvaluatorPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"RayEvaluatorPool(n_actors={len(self.actors)}, num_cpus={self.num_cpus:g}, "
                f"num_gpus={self.num_gpus:g})")
