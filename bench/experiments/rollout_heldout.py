#!/usr/bin/env python3
"""One deterministic rollout of a MaskablePPO checkpoint of a train_agent.py run, and its recipe and
greedy's scored on held-out text (BENCHMARKS.md, "Learning on the real SmolLM2-135M with shaping").

    QENV_CACHE_DIR=/tmp/qcache_cpu python bench/experiments/rollout_heldout.py RUN_DIR CHECKPOINT.zip \
        [--heldout ../shared/data/wikitext-2/test.txt --n-tokens 2048 --seq-len 128] [--env device=cpu ...]

The env is rebuilt from the run's own ``config.json`` (same model, tokens and kind); greedy's recipe
is the residual kind's action 0 on every layer; ``--env KEY=VALUE`` replaces one of the run's env
arguments (a GPU run replayed on the CPU: ``device=cpu data=<the same text here>``). Prints one JSON
line per part.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("checkpoint")
    p.add_argument("--heldout", default=str(Path(__file__).resolve().parents[3] / "shared/data/wikitext-2/test.txt"))
    p.add_argument("--n-tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--presets", nargs="*", default=["rtn-w3", "gptq-w3"])
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                   help="replace the run's env arguments (numbers are parsed as YAML)")
    args = p.parse_args()
    torch.set_num_threads(1)
    from sb3_contrib import MaskablePPO

    from qenv.cli.common import parse_key_values
    from qenv.cli.envs import at_one_budget
    from qenv.cli.runs import env_kwargs_of
    from qenv.envs.quant_llm import QuantLLMEnv
    from qenv.eval.evaluator import Evaluator
    from qenv.eval.tokens import tokens_from_text
    from qenv.quant.presets import preset

    cfg = json.loads((Path(args.run) / "config.json").read_text())
    env = QuantLLMEnv(**{**at_one_budget(env_kwargs_of(cfg, args.run)), **parse_key_values(args.env, "--env")})
    model = MaskablePPO.load(args.checkpoint, device="cpu")
    obs, _ = env.reset(seed=0)
    done, info, deviations = False, {}, 0
    while not done:
        action, _ = model.predict(obs, deterministic=True, action_masks=env.action_masks())
        deviations += int(action) != 0
        obs, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
    print(json.dumps({"checkpoint": args.checkpoint, "fidelity_reward": info.get("fidelity_reward"),
                      "kl": info.get("kl"), "bpw": info.get("bpw"), "deviations": deviations}))
    policy_recipe = dict(env.recipe)
    env.reset(seed=0)
    done = False
    while not done:
        _, _, terminated, truncated, greedy_info = env.step(0)
        done = terminated or truncated
    greedy_recipe = dict(env.recipe)
    lm = env.task.loaded
    held = Evaluator(lm, tokens_from_text(lm.tokenizer, args.heldout, n_tokens=args.n_tokens, seq_len=args.seq_len),
                     batch_size=8, cache_dir=False)
    out = {"greedy_calibration": {k: greedy_info.get(k) for k in ("fidelity_reward", "kl", "bpw")}}
    for name, recipe in (("policy", policy_recipe), ("greedy", greedy_recipe)):
        m = held.evaluate(recipe)
        out[name + "_heldout"] = {"kl": m.kl, "ppl": m.ppl, "top1": m.top1, "bpw": m.bpw}
    for name in args.presets:
        m = held.evaluate(preset(name, lm.layers))
        out[name + "_heldout"] = {"kl": m.kl, "ppl": m.ppl, "bpw": m.bpw}
    out["fp_ppl_heldout"] = held.full_precision_ppl
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
