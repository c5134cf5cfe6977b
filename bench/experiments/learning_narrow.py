#!/usr/bin/env python3
"""Learning dynamics on a 210-layer model in minutes on a CPU (issue 10).

SmolLM2-135M's layout (30 blocks of q, k, v, o, gate, up, down = 210 quantizable layers) at width
64 with random weights (``bench_env_overhead.py``'s ``narrow`` model): the episodes are as long as
SmolLM2's and the block math is negligible, so whether a config keeps or loses greedy's plan over
hundreds of 210-step episodes shows here before a GPU run. Not a quality result: the weights are
random. Prints the mean ``fidelity_reward`` (the env's terminal reward without shaping terms) per
tenth of the episodes.

    PYTHONPATH=$PWD python bench/experiments/learning_narrow.py bench/experiments/smollm2_maskable_ppo.yaml --episodes 600
    PYTHONPATH=$PWD python bench/experiments/learning_narrow.py bench/experiments/smollm2_maskable_ppo_shaped.yaml --episodes 600
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1]  # bench/, for bench_env_overhead


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="rl-zoo style config (QuantLLM-v0 section; its qenv: plan_deviations applies)")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--shaping", type=float, default=None,
                   help="the env's shaping_weight (default: the config's env_kwargs, else 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="append the result as a JSON line here")
    args = p.parse_args()

    import numpy as np
    import torch
    from stable_baselines3.common.callbacks import BaseCallback

    sys.path.insert(0, str(BENCH_DIR))
    from bench_env_overhead import _model

    from qenv.agents.registry import make_agent
    from qenv.cli.config import load_agent_config
    from qenv.envs.quant_llm import QuantLLMEnv

    torch.set_num_threads(1)
    cfg = load_agent_config(args.config, "QuantLLM-v0")
    hp = dict(cfg.hyperparams)
    for key in ("n_timesteps", "policy", "env_kwargs"):
        hp.pop(key, None)
    shaping = args.shaping if args.shaping is not None else float(cfg.env_kwargs.get("shaping_weight", 0.0))
    env = QuantLLMEnv(model=_model("narrow"), budget_bpw=3.0, action_kind="residual", shaping_weight=shaping,
                      n_tokens=256, seq_len=64, batch_size=4, device="cpu", dtype="float32", prebuild=True)
    rewards: list[float] = []

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            rewards.extend(info["fidelity_reward"] for info in self.locals["infos"] if "fidelity_reward" in info)
            return True

    agent = make_agent("maskable_ppo", env, seed=args.seed, **hp)
    t0 = time.time()
    agent.learn(args.episodes * len(env.task.layers), callback=Record())
    v = np.asarray(rewards)
    tenths = [round(float(v[i * len(v) // 10:(i + 1) * len(v) // 10].mean()), 3) for i in range(10)]
    result = {"config": args.config, "shaping": shaping, "seed": args.seed, "episodes": len(v),
              "seconds": round(time.time() - t0, 1), "fidelity_reward_tenths": tenths}
    print(json.dumps(result), flush=True)
    if args.out is not None:
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
