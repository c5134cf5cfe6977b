"""Scale-out on Ray: RayVecEnv and RayEvaluatorPool give what the single-process path gives.

One local Ray (2 CPUs, session files in pytest's tmp folder) is started once for the module;
four actors (two env workers, two evaluators) share it. Torch runs one thread in the actors and
here during this module, so results are compared bit for bit (with different thread counts, CPU
matmuls sum in another order and metrics differ in the 7th digit). Failures are real: actors are
killed with ``ray.kill`` or end their own process with ``os._exit``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from qenv import QenvError
from qenv.distributed import LocalEvaluatorPool, make_vec_env_backend
from qenv.quant.rules import Recipe

N_ENVS = 2
SEED = 3
STEPS = 80  # two full episodes of 35 layers per env, and part of a third


@pytest.mark.slow  # extended tier: fresh interpreters
def test_importing_qenv_does_not_import_ray_and_missing_ray_says_how_to_install():
    code = textwrap.dedent("""
        import sys
        import qenv, qenv.distributed, agents
        assert "ray" not in sys.modules, "importing qenv imported ray"
        sys.modules["ray"] = None  # as if ray were not installed
        from qenv import QenvError
        from qenv.distributed import RayEvaluatorPool, make_vec_env_backend
        for build in (lambda: make_vec_env_backend("QuantLLM-v0", 2, 0, {}, backend="ray"), RayEvaluatorPool):
            try:
                build()
            except QenvError as exc:
                assert "pip install qenv[ray]" in str(exc), str(exc)
            else:
                raise AssertionError("no QenvError without ray")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(QenvError, match="Unknown backend 'mpi'"):
        make_vec_env_backend("QuantLLM-v0", 2, 0, {}, backend="mpi")


# -- Ray session ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install qenv[ray])")
    from qenv.distributed import init_ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    started = not ray.is_initialized()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors (conftest does it too), so results match bit for bit
    init_ray(num_cpus=2, temp_dir=tmp_path_factory.mktemp("ray"), log_to_driver=False)
    yield ray
    torch.set_num_threads(threads)
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def env_kwargs(stories_bin, tmp_path_factory):
    return {"model": str(stories_bin), "n_tokens": 512, "seq_len": 64,
            "cache_dir": str(tmp_path_factory.mktemp("qenv-cache"))}


def random_actions(space, steps: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(space.n, size=N_ENVS) for _ in range(steps)]


def comparable(info: dict) -> dict:
    """An info dict without the Monitor's wall-clock time."""
    info = dict(info)
    if "episode" in info:
        info["episode"] = {k: v for k, v in info["episode"].items() if k != "t"}
    return info


def trajectory(vec, actions, on_step=None) -> list[tuple]:
    vec.seed(SEED)
    out = [(vec.reset(), None, None, None)]
    for t, action in enumerate(actions):
        if on_step is not None:
            on_step(t)
        obs, rewards, dones, infos = vec.step(action)
        out.append((obs, rewards, dones, [comparable(i) for i in infos]))
    return out


def assert_same(a, b) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    else:
        assert a == b


@pytest.fixture(scope="module")
def reference_run(ray_session, env_kwargs):
    """The single-process path: DummyVecEnv with the same seed and actions."""
    vec = make_vec_env_backend("QuantLLM-v0", N_ENVS, SEED, env_kwargs, backend="dummy")
    actions = random_actions(vec.action_space, STEPS, seed=0)
    run = trajectory(vec, actions)
    vec.close()
    return actions, run


@pytest.fixture(scope="module")
def ray_vec(ray_session, env_kwargs):
    vec = make_vec_env_backend("QuantLLM-v0", N_ENVS, SEED, env_kwargs, backend="ray",
                               vec_env_kwargs={"num_cpus": 0.5})
    yield vec
    vec.close()


# -- RayVecEnv -------------------------------------------------------------------------------------
@pytest.mark.slow  # extended tier: starts Ray
def test_ray_vec_env_episodes_equal_dummy_vec_env(ray_vec, reference_run):
    actions, expected = reference_run
    got = trajectory(ray_vec, actions)
    assert_same(got, expected)
    finished = [i for _, _, dones, infos in got[1:] for d, i in zip(dones, infos) if d]
    assert len(finished) == 2 * N_ENVS
    assert all("recipe_rules" in i and "terminal_observation" in i and "episode" in i for i in finished)
    assert len(set(ray_vec.pids)) == N_ENVS and os.getpid() not in ray_vec.pids


@pytest.mark.slow  # extended tier: starts Ray
def test_ray_vec_env_attributes_and_methods(ray_vec):
    assert ray_vec.get_attr("budget_bpw") == [3.0, 3.0]
    assert ray_vec.get_attr("budget_bpw", indices=[1]) == [3.0]
    ray_vec.set_attr("size_weight", 0.25, indices=0)
    assert ray_vec.get_attr("size_weight") == [0.25, 0.0]
    ray_vec.set_attr("size_weight", 0.0)
    bits = ray_vec.env_method("get_wrapper_attr", "budget_bits")
    assert bits[0] == bits[1] > 0
    from stable_baselines3.common.monitor import Monitor
    assert ray_vec.env_is_wrapped(Monitor) == [True, True] and ray_vec.has_attr("mapper")


@pytest.mark.slow  # extended tier: starts Ray
def test_dead_actor_is_restarted_and_its_episode_replayed(ray_session, ray_vec, reference_run):
    """An actor killed mid-episode is replaced, replays its episode and the run goes on unchanged."""
    actions, expected = reference_run
    restarts, old_pids = ray_vec.restarts, list(ray_vec.pids)

    def kill(t: int) -> None:
        if t == 45:  # in the second episode, after five of its layers
            ray_session.kill(ray_vec.actors[0], no_restart=False)

    got = trajectory(ray_vec, actions, on_step=kill)
    assert_same(got, expected)
    assert ray_vec.restarts == restarts + 1
    assert ray_vec.pids[0] != old_pids[0] and ray_vec.pids[1] == old_pids[1]


@pytest.mark.slow  # extended tier: starts Ray
def test_ppo_learns_on_ray_vec_env(ray_vec):
    from stable_baselines3 import PPO

    ray_vec.seed(0)
    model = PPO("MlpPolicy", ray_vec, n_steps=64, batch_size=64, n_epochs=2, seed=0, device="cpu", verbose=0)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=256)
    assert model.num_timesteps >= 256
    returns = [ep["r"] for ep in model.ep_info_buffer]
    assert len(returns) >= 2 * N_ENVS and np.all(np.isfinite(returns))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters()))


@pytest.mark.slow  # extended tier: starts Ray
def test_second_death_of_the_same_step_fails_the_run(ray_vec):
    ray_vec.seed(SEED)
    ray_vec.reset()
    ray_vec.inject_crash(1, times=2)  # worker 1 dies while stepping, and its restart dies as it starts
    with pytest.raises(QenvError, match="step\\(\\) on environment worker 1 failed 2 times: its Ray actor died"):
        ray_vec.step(np.zeros(N_ENVS, dtype=np.int64))


# -- evaluator pools -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_pool(ray_session, env_kwargs):
    return LocalEvaluatorPool(env_kwargs=env_kwargs)


@pytest.fixture(scope="module")
def ray_pool(ray_session, local_pool):
    from qenv.distributed import RayEvaluatorPool

    pool = RayEvaluatorPool.from_env(local_pool.env, n_actors=2, num_cpus=0.5)  # same kwargs as the local env
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def recipes(local_pool) -> list[Recipe]:
    inner = local_pool.env.unwrapped
    rng = np.random.default_rng(0)
    rules = inner.mapper.rules
    population = [Recipe({layer.name: rules[int(rng.integers(len(rules)))] for layer in inner.task.layers})
                  for _ in range(5)]
    return population + [Recipe({layer.name: rules[0] for layer in inner.task.layers}), Recipe({})]


@pytest.mark.slow  # extended tier: starts Ray
def test_ray_pool_equals_local_pool(ray_pool, local_pool, recipes):
    expected = local_pool.evaluate(recipes)
    got = ray_pool.evaluate(recipes)
    assert_same(got, expected)
    assert [Recipe.from_dict(r["recipe_rules"]) for r in got[:-1]] == recipes[:-1]
    assert all({"reward", "kl", "ppl", "top1", "bpw"} <= set(r) for r in got)
    assert got[-1]["kl"] < 1e-6 and got[-1]["bpw"] == 16.0  # the empty recipe keeps everything
    # the screening estimate (first token batch only) too
    assert_same(ray_pool.evaluate(recipes[:3], max_batches=1), local_pool.evaluate(recipes[:3], max_batches=1))


@pytest.mark.slow  # extended tier: starts Ray
def test_pool_reward_is_the_env_reward(ray_pool, local_pool, reference_run):
    """A finished episode's recipe, scored by the pool, gets the reward and metrics the env gave."""
    _, run = reference_run
    info = next(i for _, _, dones, infos in run[1:] for d, i in zip(dones, infos) if d)
    [scored] = ray_pool.evaluate([Recipe.from_dict(info["recipe_rules"])])
    for key in ("kl", "ppl", "top1", "bpw", "model_bytes", "fidelity_reward"):
        assert scored[key] == info[key], key
    assert scored["reward"] == pytest.approx(info["episode"]["r"], abs=1e-6)  # Monitor rounds to 6 digits


@pytest.mark.parametrize("name, evaluations, hyperparams", [
    ("random", 6, {}),
    ("uniform", 3, {}),
    ("evolution", 9, {"population": 3, "offspring": 4, "survivors": 2}),
])
@pytest.mark.slow  # extended tier: starts Ray
def test_searchers_score_their_populations_on_the_pool(ray_pool, local_pool, name, evaluations, hyperparams):
    """A searcher with pool=RayEvaluatorPool finds, records and spends exactly what it does alone."""
    from qenv.agents import make_agent

    env = local_pool.env
    steps = evaluations * len(env.unwrapped.task.layers)
    alone = make_agent(name, env, seed=0, **hyperparams).learn(steps)
    before = ray_pool.evaluations
    pooled = make_agent(name, env, seed=0, pool=ray_pool, **hyperparams).learn(steps)
    assert ray_pool.evaluations - before == pooled.evaluations + pooled.screenings > 0
    assert pooled.history == alone.history and pooled.best_recipe == alone.best_recipe
    assert_same(pooled.best_info, alone.best_info)
    for attr in ("evaluations", "screenings", "spent", "num_timesteps"):
        assert getattr(pooled, attr) == getattr(alone, attr), attr


@pytest.mark.slow  # extended tier: starts Ray
def test_env_errors_inside_actors_reach_the_caller_as_qenv_errors(ray_session, env_kwargs):
    from qenv.distributed import RayEvaluatorPool

    with pytest.raises(QenvError, match="budget_bpw=17 is out of range") as raised:
        RayEvaluatorPool({**env_kwargs, "budget_bpw": 17}, n_actors=1, num_cpus=0.25)
    assert "Traceback" not in str(raised.value)  # the user's error, not a remote stack


@pytest.mark.slow  # extended tier: starts Ray
def test_ray_pool_retries_an_evaluation_whose_actor_died(ray_pool, local_pool, recipes):
    expected = local_pool.evaluate(recipes)
    restarts = ray_pool.restarts
    ray_pool.inject_crash(1)  # the first evaluation sent out finds its actor's process gone
    assert_same(ray_pool.evaluate(recipes), expected)
    assert ray_pool.restarts == restarts + 1


@pytest.mark.slow  # extended tier: starts Ray
def test_second_death_of_the_same_evaluation_fails_the_run(ray_pool, recipes):
    ray_pool.inject_crash(2)  # the recipe's actor dies, and so does the fresh one it is retried on
    with pytest.raises(QenvError, match="Evaluating recipe 0 of 1 failed 2 times: its Ray actor died"):
        ray_pool.evaluate(recipes[:1])
