"""Recipe evaluations per second: one process vs a RayEvaluatorPool of 1, 2, 4 ... actors.

Each actor holds its own QuantLLM-v0 env (one model replica). Before timing, every actor is
warmed up on the uniform recipe of every menu rule (so it holds the quantized weights of every
(layer, rule) pair, as after the first generations of a search). Then populations of random
budget-feasible recipes (drawn as the random searcher draws them, so played as episodes) are
scored, ``--repeats`` rounds each on a fresh population (the evaluator caches block prefixes, so
a repeated recipe would cost next to nothing), and the best round's wall time is kept. The
in-process baseline is ``LocalEvaluatorPool`` with the same warm-up, at 1 torch thread (what each
actor gets) and at the machine's default.

    python bench/bench_ray.py --model ../shared/data/stories260K/stories260K.bin --actors 1 2 4

On a cluster set RAY_ADDRESS (GPU actors get one GPU each); here Ray starts locally with
``--num-cpus`` CPUs (default: all), and each actor gets an equal CPU share (at most one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qenv.distributed import LocalEvaluatorPool, RayEvaluatorPool, init_ray  # noqa: E402
from qenv.quant.rules import Recipe  # noqa: E402


def population(env, n: int, seed: int) -> list[Recipe]:
    """Random recipes under the budget, as the random searcher draws them (played as episodes)."""
    from qenv.agents.searchers import sample_feasible

    inner = env.unwrapped
    rules, layers = inner.mapper.rules, inner.task.layers
    rng = np.random.default_rng(seed)
    choices = [sample_feasible(inner.task.costs, inner.budget_bits, rng) for _ in range(n)]
    return [Recipe({layer.name: rules[j] for layer, j in zip(layers, choice)}) for choice in choices]


def uniform_recipes(env) -> list[Recipe]:
    inner = env.unwrapped
    return [Recipe({layer.name: rule for layer in inner.task.layers}) for rule in inner.mapper.rules]


def timed(pool, env, size: int, repeats: int, seed: int) -> float:
    """Best wall time of ``repeats`` rounds, each on a fresh population (a repeated recipe would
    only measure the evaluator's prefix cache)."""
    best = float("inf")
    for r in range(repeats):
        recipes = population(env, size, seed=seed + r)
        start = time.perf_counter()
        pool.evaluate(recipes)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="../shared/data/stories260K/stories260K.bin")
    parser.add_argument("--n-tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--population", type=int, default=32, help="recipes scored per timed round")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--cache-dir", default=None, help="qenv cache (default: a fresh temp folder)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = tempfile.TemporaryDirectory(prefix="bench-ray-")
    cache_dir = args.cache_dir or str(Path(tmp.name) / "cache")
    env_kwargs = {"model": args.model, "n_tokens": args.n_tokens, "seq_len": args.seq_len, "cache_dir": cache_dir}
    rows = []
    load = os.getloadavg()[0]

    default_threads = torch.get_num_threads()
    local = LocalEvaluatorPool(env_kwargs=env_kwargs)
    local.evaluate(uniform_recipes(local.env))  # warm-up
    config = 0
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        config += 1
        seconds = timed(local, local.env, args.population, args.repeats, seed=1000 * config)
        rows.append({"backend": f"LocalEvaluatorPool (in-process, {threads} torch thread{'s' * (threads > 1)})",
                     "workers": 1, "seconds": seconds, "evals_per_s": args.population / seconds})
        print(rows[-1], flush=True)
    torch.set_num_threads(default_threads)

    ray = init_ray(num_cpus=args.num_cpus, temp_dir=Path(tmp.name) / "ray", log_to_driver=False)
    cpus = ray.cluster_resources().get("CPU", 0)
    for n in args.actors:
        start = time.perf_counter()
        pool = RayEvaluatorPool(env_kwargs, n_actors=n)
        ray.get([a.evaluate.remote(r.to_dict()) for a in pool.actors for r in uniform_recipes(local.env)])
        startup = time.perf_counter() - start
        config += 1
        seconds = timed(pool, local.env, args.population, args.repeats, seed=1000 * config)
        rows.append({"backend": f"RayEvaluatorPool ({n} actor{'s' * (n > 1)}, num_cpus={pool.num_cpus:g} each)",
                     "workers": n, "seconds": seconds, "evals_per_s": args.population / seconds,
                     "startup_s": startup})
        print(rows[-1], flush=True)
        pool.close()
        deadline = time.time() + 30  # killed actors give their CPUs back a moment later
        while ray.available_resources().get("CPU", 0) < cpus - 1e-6 and time.time() < deadline:
            time.sleep(0.2)
    ray.shutdown()

    print(f"\nstories-like run: {args.population} recipes x best of {args.repeats}, n_tokens={args.n_tokens}, "
          f"seq_len={args.seq_len}, {os.cpu_count()} cores, Ray CPUs {cpus:g}, load average at start {load:.1f}\n")
    print("| backend | evals/s | s per round | start-up + warm-up (s) |")
    print("|---|---:|---:|---:|")
    for row in rows:
        startup = f"{row['startup_s']:.1f}" if "startup_s" in row else "-"
        print(f"| {row['backend']} | {row['evals_per_s']:.2f} | {row['seconds']:.2f} | {startup} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load_average": load, "rows": rows}, indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()
