#!/usr/bin/env python3
"""One deterministic rollout of a trained policy against greedy's recipe, on models it never saw.

    python bench/zero_shot_vs_greedy.py RUN_DIR --models M [M ...] --budgets 2.5 3.0 3.5 4.0 \\
        [--n-tokens N] [--env KEY=VALUE ...] [--policy model.zip|best_model.zip] [--out results.json]

The quick form of ``eval_agent.py --searchers greedy``, for the residual and allocation kinds
(whose zero action is the best start, ``ModelTask.start_plan``: the best measured of greedy's plan,
the presets and the uniform rules; greedy's plan where that measured best): the policy's env settings (action kind,
observation kind, max_deviations, shaping, ...) come from the run's ``config.json``; for each
(model, budget) the env is made with that budget, the policy plays one deterministic episode
(``rollout_recipe``, with ``action_masks()`` where it has them), and the residual kind's all-zero
episode, i.e. the best start's recipe (the ``greedy`` columns), is scored on the same tokens. Prints one line per cell (policy KL,
greedy KL, better/same/worse, layers whose rule differs from greedy's recipe) and writes them as
JSON. No held-out text and no presets (``eval_agent.py`` does those).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    import torch

    from qenv.agents import load_agent, rollout_recipe
    from qenv.cli.common import normalizer_path, parse_key_values
    from qenv.envs.episodes import play_episode
    from qenv.envs.config import RESIDUAL_ONLY
    from qenv.envs.quant_llm import QuantLLMEnv

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a train_agent.py run folder (model.zip, config.json)")
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0, 3.5, 4.0])
    p.add_argument("--n-tokens", type=int, default=None, help="calibration tokens (default: the env's)")
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                   help="env arguments over the run's own, e.g. max_deviations=13 (a limit at evaluation only)")
    p.add_argument("--policy", default="model.zip",
                   help="the policy file in RUN_DIR (default: %(default)s; best_model.zip: --eval-freq's best)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run)
    config = json.loads((run / "config.json").read_text())
    # the policy's env settings (action and observation kinds, max_deviations, shaping, menu, ...), not
    # where it trained: model, budgets, calibration data, device and caches are this comparison's own
    drop = ("model", "budget_bpw", "budgets", "data", "n_tokens", "device", "dtype", "cache_dir", "weight_cache_gib",
            "prebuild", "render_mode")
    from qenv.cli.runs import env_kwargs_of

    kwargs = {k: v for k, v in env_kwargs_of(config, str(run / "config.json")).items() if k not in drop}
    kwargs.update(parse_key_values(args.env, "--env"))
    if kwargs.get("action_kind") not in ("residual", "allocation"):
        raise SystemExit("this comparison needs a policy of the residual or allocation kind (greedy's plan is "
                         "their zero action)")
    if not (run / args.policy).is_file():
        raise SystemExit(f"{run / args.policy} does not exist (best_model.zip comes from train_agent.py --eval-freq)")
    from qenv.agents.registry import agent_named_by_file

    # a run folder names registered agents only: a plug-in path in its config.json is not imported
    agent = load_agent(agent_named_by_file(config["agent"], f"The run config {run / 'config.json'}") or "ppo",
                       run / args.policy)
    stats = normalizer_path(run / args.policy)
    if stats.is_file():  # trained behind VecNormalize: observations normalised as then
        from qenv.agents.sb3 import NormalizedAgent
        from qenv.io import read_json

        agent = NormalizedAgent(agent, read_json(stats, "Normalisation statistics", "retrain."), stats)
    rows = []
    for model in args.models:
        for budget in args.budgets:
            t0 = time.perf_counter()
            extra = {} if args.n_tokens is None else {"n_tokens": args.n_tokens}
            env = QuantLLMEnv(model=model, budget_bpw=budget, device="cpu", **kwargs, **extra)
            _, info = rollout_recipe(agent, env, deterministic=True)
            # the best start's recipe: the residual kind's all-zero episode (the allocation kind's
            # zero preferences play the same recipe)
            plain = {k: v for k, v in kwargs.items() if k not in ("action_kind", "observation", *RESIDUAL_ONLY)}
            ref = env if kwargs["action_kind"] == "residual" else \
                QuantLLMEnv(model=model, budget_bpw=budget, device="cpu", action_kind="residual", **plain, **extra)
            greedy = play_episode(ref, [0] * ref.episode_length)
            if ref is not env:
                ref.close()
            off = sum(info["recipe"][name] != rule for name, rule in greedy["recipe"].items())
            margin = 1e-9 * greedy["kl"]  # the same recipe scored in two envs: equal, not an ulp better
            verdict = "better" if info["kl"] < greedy["kl"] - margin else "worse" if info["kl"] > greedy["kl"] + margin \
                else "same"
            rows.append({"model": model, "budget": budget, "policy_kl": info["kl"], "policy_bpw": info["bpw"],
                         "greedy_kl": greedy["kl"], "greedy_bpw": greedy["bpw"], "verdict": verdict,
                         "layers_off_plan": off, "layers": env.episode_length, "n_tokens": info["n_tokens"]})
            print(f"{model} @ {budget:g}: policy KL {info['kl']:.4g}, greedy {greedy['kl']:.4g} -> {verdict}; "
                  f"{off}/{env.episode_length} layers off greedy's recipe ({time.perf_counter() - t0:.0f} s)", flush=True)
            env.close()
    wins = sum(r["verdict"] == "better" for r in rows)
    print(f"the policy beats greedy in {wins}/{len(rows)} cells")
    if args.out:
        Path(args.out).write_text(json.dumps({"run": str(run), "env": kwargs, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
