"""Plain ``gym.make`` + Stable-Baselines3 PPO: torch's default CPU threads against one thread.

The README's Python example ("Use the environment") runs in the caller's process with whatever thread
count torch picked (all cores); ``train_agent.py`` / ``eval_agent.py`` use one (``--threads``).
This times the same PPO training (``--steps`` environment steps, the embedded default model,
3.0 bpw, warm caches) at each thread count, in a fresh process per count so that nothing is
shared but the disk cache, and prints one line per count plus the ratio.

    python bench/bench_threads.py --steps 2048 --threads 0 1      # 0 = torch's default
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
import torch
threads = int(sys.argv[1]); steps = int(sys.argv[2]); model = sys.argv[3]
if threads > 0:
    torch.set_num_threads(threads)
import gymnasium as gym
import qenv
from stable_baselines3 import PPO
env = gym.make("QuantLLM-v0", model=model, budget_bpw=3.0)
env.reset(seed=0)  # loads the model and the (cached) reference before timing
agent = PPO("MlpPolicy", env, n_steps=256, batch_size=128, seed=0, device="cpu", verbose=0)
t0 = time.perf_counter()
agent.learn(total_timesteps=steps)
print(json.dumps({"threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0}))
"""


def run(threads: int, steps: int, model: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(steps), model], cwd=REPO, check=True,
                         capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2048)
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1], help="0 = torch's default")
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    run(1, 256, args.model)  # warm the disk cache (reference, features) outside the timings
    results = []
    for threads in args.threads:
        res = run(threads, args.steps, args.model)
        results.append(res)
        print(f"threads={res['threads']}{' (default)' if threads == 0 else ''}: {args.steps} PPO steps in "
              f"{res['seconds']:.1f} s ({args.steps / res['seconds']:.0f} steps/s)", flush=True)
    if len(results) > 1:
        print(f"ratio first/last: {results[0]['seconds'] / results[-1]['seconds']:.2f}x  "
              f"({time.strftime('%Y-%m-%d %H:%M')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
