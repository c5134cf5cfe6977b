#!/usr/bin/env python3
"""What one step off greedy's plan costs, layer by layer: the residual kind's actions, measured.

    PYTHONPATH=. python bench/experiments/one_deviation.py MODEL --budget 4.0 [--layers 16] [--actions 1 2] \\
        [--n-tokens N]

For each of the first ``--layers`` layers and each action (1: one step up the layer's ladder, 2:
one step down), the episode follows greedy's plan, takes that action at that layer (the rest is
re-planned as the env does) and follows the plan to the end. Prints the plan's rule, the rule the
action gives, their sensitivity ratio (error x size, what greedy reads) and the episode's
calibration KL against greedy's. On the menu ladder a step up can be a dominated rule (the
``ladder="frontier"`` variant, efficient rules only, was measured and removed: BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    import torch

    from qenv.envs.episodes import play_episode
    from qenv.envs.quant_llm import QuantLLMEnv

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--budget", type=float, default=4.0)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--actions", nargs="+", type=int, default=[1, 2])
    p.add_argument("--n-tokens", type=int, default=2048)
    args = p.parse_args()
    torch.set_num_threads(1)
    env = QuantLLMEnv(model=args.model, budget_bpw=args.budget, device="cpu", action_kind="residual",
                      n_tokens=args.n_tokens)
    greedy = play_episode(env, [0] * env.episode_length)["kl"]
    print(f"{args.model} @ {args.budget:g} bpw, menu ladder: greedy KL {greedy:.4g}")
    task, sens = env.task, env.task.menu_sensitivity()
    for layer in range(min(args.layers, env.episode_length)):
        for action in args.actions:
            env.reset()
            for _ in range(layer):
                env.step(0)
            if not env.action_masks()[action]:
                continue
            plan, choice = int(env.plan[layer]), env._menu_choice(action)
            _, _, done, _, info = env.step(action)
            while not done:
                _, _, done, _, info = env.step(0)
            print(f"layer {layer:3d} {task.layers[layer].name:32s} action {action}: "
                  f"{env.mapper.rules[plan].label():20s} -> {env.mapper.rules[choice].label():20s} "
                  f"sensitivity x{sens[layer, choice] / sens[layer, plan]:.3f}, KL {info['kl']:.4g} "
                  f"({info['kl'] / greedy:.2f}x greedy's)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
