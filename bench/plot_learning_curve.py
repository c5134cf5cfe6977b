#!/usr/bin/env python3
"""The learning curve of a train_agent.py run, read from its TensorBoard events.

    python bench/plot_learning_curve.py RUN_DIR OUT.png [--tag episode/fidelity_reward] [--greedy KL --reference KL]

Prints the number of episodes and the mean of the tag over the first and the last tenth of the
episodes, and draws every episode's value with a moving average (what BENCHMARKS.md shows).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def read_scalars(run: Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps, values = [], []
    for folder in sorted({p.parent for p in (run / "tb").rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                steps.append(event.step)
                values.append(event.value)
    order = np.argsort(steps, kind="stable")
    return np.asarray(steps)[order], np.asarray(values, dtype=np.float64)[order]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--tag", default="episode/fidelity_reward")
    p.add_argument("--greedy-reward", type=float, default=None, help="draw greedy's reward as a line")
    p.add_argument("--title", default=None)
    args = p.parse_args()
    run = Path(args.run)
    steps, values = read_scalars(run, args.tag)
    if len(values) < 10:
        raise SystemExit(f"{run}: only {len(values)} values of {args.tag}")
    tenth = max(1, len(values) // 10)
    first, last = float(values[:tenth].mean()), float(values[-tenth:].mean())
    stats = {"run": str(run), "tag": args.tag, "episodes": int(len(values)), "first_tenth_mean": first,
             "last_tenth_mean": last, "first_tenth_sem": float(values[:tenth].std(ddof=1) / math.sqrt(tenth)),
             "last_tenth_sem": float(values[-tenth:].std(ddof=1) / math.sqrt(tenth)), "best": float(values.max()),
             "last_step": int(steps[-1])}
    print(json.dumps(stats, indent=2))
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), dpi=110)
    ax = fig.add_subplot()
    ax.plot(steps, values, ".", markersize=2, alpha=0.35, color="tab:blue", label="episode")
    window = max(5, len(values) // 25)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1:], smooth, color="tab:blue", linewidth=2, label=f"moving mean ({window} episodes)")
    ax.axhline(0.0, color="gray", linewidth=1, linestyle=":", label="uniform RTN frontier (reward 0)")
    if args.greedy_reward is not None:
        ax.axhline(args.greedy_reward, color="tab:green", linewidth=1, linestyle="--", label="greedy (one evaluation)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel(args.tag)
    ax.set_title(args.title or f"{run.name}: {len(values)} episodes", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out)
    Path(args.out).with_suffix(".json").write_text(json.dumps(stats, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
