#!/usr/bin/env python3
"""How far the residual kind's Lagrangian re-plan is from greedy's own plan, on one model.

    PYTHONPATH=. python bench/experiments/replan_gap.py MODEL [--budgets 2.5 3.0 3.5 4.0] [--n-tokens N]

For each budget, the whole model is planned twice from scratch: by greedy (the ``greedy``
searcher's recipe, the residual kind's starting plan) and by the convex-hull form the residual
kind uses after a deviation with ``replan="lagrangian"`` (Lagrangian allocation, then filled).
Prints both recipes' calibration KL and bpw, the layers where they differ and their summed
sensitivity (error x size, the quantity greedy minimises). A gap here is what every deviation
also pays for the layers after it; ``replan="greedy"`` re-plans with greedy's own rule instead,
and ``replan="fresh"`` (the Lagrangian hull, then greedy's error-lowering upgrades) is printed
too: the layers where its whole-model plan differs from greedy's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    import numpy as np
    import torch

    from qenv.envs.allocation import fill_budget, greedy_allocation
    from qenv.envs.episodes import play_episode
    from qenv.envs.quant_llm import QuantLLMEnv

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0, 3.5, 4.0])
    p.add_argument("--n-tokens", type=int, default=2048)
    args = p.parse_args()
    torch.set_num_threads(1)
    for budget in args.budgets:
        env = QuantLLMEnv(model=args.model, budget_bpw=budget, device="cpu", n_tokens=args.n_tokens)
        task = env.task
        sens = task.menu_sensitivity()
        bits = budget * task.total_weights
        greedy = task.greedy_plan(budget)
        hull = task.menu_table.allocate(0, bits)
        lagrangian = fill_budget(task.costs, sens, hull, bits)
        fresh = greedy_allocation(task.costs, sens, bits, start=hull)
        rows = np.arange(len(greedy))
        g, lg = (play_episode(env, [int(a) for a in plan]) for plan in (greedy, lagrangian))
        print(f"{args.model} @ {budget:g}: greedy KL {g['kl']:.4g} ({g['bpw']:.4f} bpw), Lagrangian re-plan KL "
              f"{lg['kl']:.4g} ({lg['bpw']:.4f} bpw); {int((greedy != lagrangian).sum())}/{len(greedy)} layers differ; "
              f"summed sensitivity {sens[rows, lagrangian].sum() / sens[rows, greedy].sum():.3f}x greedy's; "
              f"fresh re-plan: {int((greedy != fresh).sum())} layers differ from greedy's", flush=True)
        env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
