#!/usr/bin/env python3
"""A fixed depth tilt on the allocation kind, no learning: does weighting early layers up beat greedy?

    PYTHONPATH=. python bench/experiments/depth_tilt.py MODEL [MODEL ...] [--tilts 0 0.1 0.2 0.3] [--n-tokens 1024]

For each model and budget (2.5, 3.0, 3.5, 4.0 bpw) the allocation kind plays one episode with the
preference p = a (1 - 2 depth) on every layer (depth: the observation's, features.layer_depth), i.e.
greedy's allocation on the sensitivities weighted by exp(3 p), filled to the budget, and prints
its calibration KL divided by greedy's (the residual kind's all-zero episode). A = 0 is greedy's
plan filled to the budget. Below 1 is better than greedy. It checks BENCHMARKS.md's reading of
what the per-model RL recipes change (``bench/experiments/recipe_shift.py``) before any policy learns it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    import numpy as np
    import torch

    from qenv.envs.episodes import play_episode
    from qenv.envs.features import layer_depth
    from qenv.envs.quant_llm import QuantLLMEnv

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0, 3.5, 4.0])
    p.add_argument("--tilts", nargs="+", type=float, default=[0.0, 0.1, 0.2, 0.3])
    p.add_argument("--n-tokens", type=int, default=1024)
    args = p.parse_args()
    torch.set_num_threads(1)
    for model in args.models:
        for budget in args.budgets:
            env = QuantLLMEnv(model=model, budget_bpw=budget, action_kind="allocation", device="cpu",
                              n_tokens=args.n_tokens)
            plan = QuantLLMEnv(model=model, budget_bpw=budget, action_kind="residual", device="cpu",
                               n_tokens=args.n_tokens)
            greedy = play_episode(plan, [0] * plan.episode_length)["kl"]
            depth = np.array([layer_depth(info) for info in env.task.layers])  # the observation's depth
            ratios = []
            for a in args.tilts:
                prefs = a * (1 - 2 * depth)
                kl = play_episode(env, [np.array([v], dtype=np.float32) for v in prefs])["kl"]
                ratios.append(f"a={a:g}: {kl / greedy:.3f}")
            print(f"{Path(model).name} @ {budget:g}: greedy KL {greedy:.4g}; tilted / greedy: {', '.join(ratios)}",
                  flush=True)
            env.close()
            plan.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
