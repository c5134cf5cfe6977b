#!/usr/bin/env python3
"""The environment's own per-step bookkeeping, with the model's block passes taken out (issue 12).

A warm ``QuantLLM-v0`` episode costs the streamed block forward passes plus the env's Python
bookkeeping at each of its steps: turning the action into a rule, the budget check, the action
masks, the observation (including the model-relative features' Lagrangian plan of the layers
left), the residual kind's re-planning. On SmolLM2-135M (210 layers) this bookkeeping is paid
210 times per episode, so it matters next to a 40 ms forward pass on an H200.

How it is measured (honestly, and without a GPU):

- the layout is SmolLM2-135M's: a random-weight Llama with 30 blocks of q, k, v, o, gate, up,
  down = **210 quantizable layers**, in SmolLM2's order (``--shape smollm2`` gives SmolLM2's real
  widths, 576/1536, 9/3 heads; the default ``--shape narrow`` keeps the layout at width 64 so that
  building the task, which measures every menu rule's error on every layer, takes seconds on a
  CPU: the bookkeeping does not depend on the widths, only on the layer and menu counts);
- the env is built for real (real costs, real measured sensitivities, real greedy plans), then
  its evaluation stream is replaced by a stub whose ``advance`` does nothing and whose
  ``finish`` returns the metrics of one real evaluation: what is timed is exactly the env's
  code around the block passes (``step`` and ``_observation``, plus ``action_masks()`` before
  each step for the maskable kinds, as MaskablePPO calls it);
- time is the process's CPU time (``time.process_time``: the 2-vCPU machine here is shared, and
  wall time swings with the load), summed over ``reset``, ``action_masks`` and ``step`` only
  (not the benchmark's own action sampling), per step, the median over the episodes;
- the actions are seeded random samples (masked ones, for the maskable kinds, so no action is
  lowered by the budget); every kind runs the same seeded episodes before and after a change,
  and the printed digest (of every observation, mask, reward and rule) shows the results equal.

Run it from the repository root (``PYTHONPATH=$PWD``); ``--tree`` times another checkout of
``qenv/`` (e.g. the code before an optimisation, extracted with ``git archive``)::

    PYTHONPATH=$PWD QENV_CACHE_DIR=/tmp/qenv-cache-bench python bench/bench_env_overhead.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
KINDS = ("discrete", "multidiscrete", "continuous", "rule", "relative", "residual", "allocation")
MASKABLE = ("discrete", "multidiscrete", "relative", "residual", "rule")


class _StubStream:
    """An evaluation stream with the model taken out: nothing runs, ``finish`` returns fixed metrics."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics

    def advance(self, recipe: Any, upto_block: int) -> None:
        pass

    def block_error(self, block: int) -> float:
        return 0.01

    def finish(self, recipe: Any) -> Any:
        return self.metrics


def _model(shape: str):
    sys.path.insert(0, str(BENCH_DIR))
    from random_llama import build_random_llama

    fields = dict(num_hidden_layers=30, vocab_size=512, tie_word_embeddings=True)
    if shape == "smollm2":
        fields.update(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    else:
        fields.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    return build_random_llama("100m", device="cpu", dtype="float32", seed=0, **fields)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import hashlib

    import numpy as np
    import torch

    from qenv.envs.quant_llm import QuantLLMEnv

    torch.set_num_threads(1)
    loaded = _model(args.shape)
    results: dict[str, Any] = {"shape": args.shape, "n_layers": len(loaded.layers), "budget_bpw": args.budget,
                               "episodes": args.episodes, "kinds": {}}
    for kind in args.kinds:
        env = QuantLLMEnv(model=loaded, budget_bpw=args.budget, action_kind=kind, n_tokens=args.n_tokens,
                          seq_len=args.seq_len, batch_size=4, device="cpu", dtype="float32",
                          shaping_weight=args.shaping, prebuild=args.real_stream)
        task = env.task
        # everything the env computes once per task or budget, outside the timing
        task.reference(env.budget_bpw)
        task.menu_sensitivity()
        task.menu_ladder()
        task.greedy_plan(env.budget_bpw)
        if args.shaping > 0:
            task.block_reference(env.budget_bpw)
        env.reset(seed=0)
        metrics = env.stream.finish({})  # one real evaluation: what the stub returns
        rng = np.random.default_rng(0)
        env.action_space.seed(0)
        per_step: list[float] = []
        returns: list[float] = []
        digest = hashlib.sha1()  # every observation, mask, reward and recipe: equal before and after
        profiler = None
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        # the allocation kind opens a new stream for its final recipe: that one is stubbed too
        if not args.real_stream:
            task.evaluator.stream = lambda: _StubStream(metrics)  # type: ignore[method-assign]
        for episode in range(args.episodes + 1):  # the first one warms up
            t0 = time.process_time()
            obs, _ = env.reset(seed=episode)  # its stream is the stub (evaluator.stream above)
            spent = time.process_time() - t0
            digest.update(obs.tobytes())
            done, total, steps = False, 0.0, 0
            while not done:
                if kind in MASKABLE:
                    t0 = time.process_time()  # the env's calls are timed, not the benchmark's sampling
                    mask = env.action_masks()
                    spent += time.process_time() - t0
                    digest.update(np.asarray(mask).tobytes())
                    if kind in ("discrete", "relative", "residual"):
                        action: Any = int(rng.choice(np.flatnonzero(mask)))
                    else:
                        nvec = env.action_space.nvec  # type: ignore[attr-defined]
                        parts = np.split(mask, np.cumsum(nvec)[:-1])
                        action = np.array([rng.choice(np.flatnonzero(p)) for p in parts], dtype=np.int64)
                else:
                    action = env.action_space.sample()
                t0 = time.process_time()
                obs, reward, done, _, info = env.step(action)
                spent += time.process_time() - t0
                digest.update(obs.tobytes() + repr((reward, info["rule"], info["clamped"])).encode())
                total += reward
                steps += 1
            if episode > 0:
                per_step.append(spent / steps)
                returns.append(total)
        if profiler is not None:
            import pstats

            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
        per_step.sort()
        median = per_step[len(per_step) // 2]
        if not args.real_stream:
            del task.evaluator.stream  # the evaluator's own method again
        results["kinds"][kind] = {"us_per_step": median * 1e6, "ms_per_episode": median * steps * 1e3,
                                  "steps": steps, "returns": returns, "digest": digest.hexdigest()[:16]}
        extra = ""
        if args.real_stream:  # the same model's own forward pass over the same tokens, in the same clock
            forwards = []
            with torch.inference_mode():
                for _ in range(5):
                    t0 = time.process_time()
                    for ids in task.evaluator.batches:
                        loaded.model(input_ids=ids, use_cache=False)
                    forwards.append(time.process_time() - t0)
            forward = sorted(forwards)[2]
            results["kinds"][kind].update(forward_ms=forward * 1e3, episode_vs_forward=median * steps / forward)
            extra = f"  forward {forward * 1e3:.2f} ms: episode = {median * steps / forward:.2f}x forward"
        print(f"{kind:14s} {median * 1e6:8.1f} us/step  {median * steps * 1e3:7.2f} ms/episode  "
              f"(median of {args.episodes}, {steps} steps)  digest {digest.hexdigest()[:16]}{extra}", flush=True)
        env.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--shape", choices=("narrow", "smollm2"), default="narrow")
    parser.add_argument("--budget", type=float, default=3.0)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--n-tokens", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--shaping", type=float, default=0.0, help="shaping_weight (block errors are stubbed)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest functions")
    parser.add_argument("--real-stream", action="store_true",
                        help="run the blocks for real instead of stubbing the stream (with the narrow shape the "
                             "block math is tiny, so this adds the per-block and end-of-episode Python: streaming, "
                             "weight swaps, prefix-cache keys, scoring, the terminal info)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = run(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
