#!/usr/bin/env python3
"""What the best start costs a reset over a budget range, before and after its caches (issue 25).

Training one policy over ``budget_range=[2.5, 4.5]`` (a 0.1 grid: 21 budgets) on a zoo of models
measures the best start (:meth:`qenv.envs.task.ModelTask.start_plan`: greedy's plan, every preset
and uniform rule that fits, each scored end to end) for every (model, budget) an episode draws. On
the CPU that was most of a training run (0.5-1 step/s). Two caches now serve it:

- ``start_scores``: a candidate's score does not depend on the budget, so each recipe is measured
  once per task, and a new budget costs about one evaluation (greedy's plan at it);
- a disk file per (model, tokens, layers, batching, numerics, menu, budget, candidates), so a later
  process (the next training run, eval_agent.py) measures nothing.

This times ``start_plan`` on one model at the given budgets in three ways, in one process, on the
same task (so the model's reference and tables are built once, outside the timings):

- ``before``: every budget measured from scratch, no cache (what the code did before);
- ``cold``: the in-process memo, no disk file (the first training run);
- ``warm``: a new process's view: memo cleared, disk files present.

It checks that all three return the same best start at every budget, and prints full evaluations
and seconds (wall time on a shared machine: read the evaluation counts first)::

    PYTHONPATH=$PWD python bench/bench_start_cache.py --model /work/zoo/zoo-gpt2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0, 3.5, 4.0, 4.5])
    p.add_argument("--n-tokens", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--cache-dir", type=Path, default=None, help="qenv cache (default: a new temporary folder)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from qenv.envs import task as task_module
    from qenv.envs.quant_llm import QuantLLMEnv

    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="qenv-start-bench-"))
    t0 = time.perf_counter()
    env = QuantLLMEnv(args.model, n_tokens=args.n_tokens, seq_len=args.seq_len, device="cpu", cache_dir=cache,
                      action_kind="allocation", observation="relative", budget_bpw=args.budgets[0])
    task = env.task
    print(f"{task.name}: {len(task.layers)} layers, {len(task.rules)} menu rules; task built in "
          f"{time.perf_counter() - t0:.0f} s (not timed below)")
    for budget in args.budgets:  # the files of this benchmark's own, never an earlier run's
        bits = budget * task.total_weights
        from qenv.envs.start import start_candidates

        cands = start_candidates(task.layers, task.rules, task.costs, bits, task.menu_sensitivity())
        path = task_module.start_cache_path(task.evaluator, task.layers, task.rules, bits, cands)
        if path is not None:
            path.unlink(missing_ok=True)

    calls = [0]
    measure = task.evaluator.evaluate_blockwise

    def counted(recipe):
        calls[0] += 1
        return measure(recipe)

    task.evaluator.evaluate_blockwise = counted
    results: dict[str, dict] = {}
    original_read = task_module.read_best_start
    for mode in ("before", "cold", "warm"):
        task.starts.clear()
        task.start_scores.clear()
        rows = []
        for budget in args.budgets:
            if mode == "before":
                task.start_scores.clear()  # no memo across budgets ...
                task_module.read_best_start = lambda path, candidates: None  # ... and no file
            else:
                task_module.read_best_start = original_read
            calls[0] = 0
            t = time.perf_counter()
            start = task.start_plan(budget)
            rows.append({"budget": budget, "candidates": len(start.measured), "evaluations": calls[0],
                         "seconds": round(time.perf_counter() - t, 2), "start": start.candidate.label,
                         "kl": -start.score})
            if mode == "before":  # the next mode must not find this mode's file
                bits = budget * task.total_weights
                from qenv.envs.start import start_candidates

                cands = start_candidates(task.layers, task.rules, task.costs, bits, task.menu_sensitivity())
                path = task_module.start_cache_path(task.evaluator, task.layers, task.rules, bits, cands)
                if path is not None:
                    path.unlink(missing_ok=True)
        task_module.read_best_start = original_read
        results[mode] = {"rows": rows, "evaluations": sum(r["evaluations"] for r in rows),
                         "seconds": round(sum(r["seconds"] for r in rows), 1)}
        print(f"{mode:>6}: {results[mode]['evaluations']:4d} evaluations, {results[mode]['seconds']:7.1f} s over "
              f"{len(args.budgets)} budgets  " + " ".join(f"{r['budget']:g}:{r['evaluations']}" for r in rows))
    same = all(a["start"] == b["start"] == c["start"] and a["kl"] == b["kl"] == c["kl"]
               for a, b, c in zip(*(results[m]["rows"] for m in ("before", "cold", "warm"))))
    print(f"same best start and KL at every budget in all three: {same}")
    print(json.dumps(results))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
