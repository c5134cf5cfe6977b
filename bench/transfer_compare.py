#!/usr/bin/env python3
"""Two (or more) transfer policies on the same zero-shot cells, cheaply (issue 25, CPU).

``scripts/train_transfer_policy.py --rescore`` runs ``eval_agent.py`` per budget with the greedy and
uniform searchers: 40+ minutes for 24 cells on a shared 2-core machine, per policy. Deciding whether
a retrained policy may replace the shipped one only needs the policies' own rollouts against the
same anchors, so this scores, per (model, budget), with eval_agent.py's own functions:

- each policy: one deterministic rollout (``rollout_recipe``) on a ``QuantLLM-v0`` built with its
  card's settings at that budget, its recipe scored on held-out text (``scoring_evaluator``: the
  environment's quantized weights, calibrated on tokens sampled from the model);
- the best start: the allocation kind's anchor (``ModelTask.start_plan``: the best of greedy's plan,
  the presets and uniform rules that fit, picked on the calibration tokens), and every rtn/gptq/awq
  preset at or under the budget, each scored on the held-out text; the best of them (eval_agent.py's
  ``best_start`` takes the greedy and uniform *searchers* instead of the anchor);
- the GPTQ and AWQ frontiers at each policy's own bpw (eval_agent.py's ``frontier_at`` over its
  bracketing presets, scores cached per recipe on disk).

Every score is a real evaluation; the searchers (greedy's 16-evaluation refinement) are not run.
Usage (one line per cell, then the counts)::

    PYTHONPATH=$PWD python bench/transfer_compare.py --policy old=qenv/policies/transfer.zip \\
        --policy new=/tmp/tr/new/transfer.zip --model ../shared/data/stories260K/stories260K.bin ... \\
        --budgets 2.5 3.0 3.5 4.0 gptq-w3 gptq-w4 --out /tmp/compare.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from train_transfer_policy import budget_arg  # noqa: E402  (the script's own --eval-budgets parser)

HELD_OUT = REPO.parent / "shared" / "data" / "tinystories" / "TinyStories-valid-first1000.txt"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", action="append", required=True, metavar="NAME=ZIP")
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--budgets", nargs="+", type=budget_arg, default=[2.5, 3.0, 3.5, 4.0, "gptq-w3", "gptq-w4"])
    p.add_argument("--data", type=Path, default=HELD_OUT)
    p.add_argument("--n-tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import eval_agent as ea

    import qenv.policies
    from qenv.cli.presets import family_of, select_presets
    from qenv.envs.episodes import rollout_recipe
    from qenv.envs.quant_llm import QuantLLMEnv
    from qenv.eval.preset_cache import cached_metrics
    from qenv.models.loading import load_model
    from qenv.quant.presets import preset, resolve_budget

    policies = dict(item.split("=", 1) for item in args.policy)
    cards = {name: qenv.policies.check_card_matches_zip(Path(z)) for name, z in policies.items()}
    import dataclasses

    from qenv.envs.config import EnvConfig

    defaults = {f.name: f.default for f in dataclasses.fields(EnvConfig)}

    def settings(card: dict) -> dict:
        """The card's env settings that shape an episode, a setting left at its default spelled out."""
        recorded = {k: v for k, v in card["config"]["env_kwargs"].items() if k not in ("budget_range", "budget_bpw")}
        return {**{k: defaults[k] for k in ("seq_len", "n_tokens") if k in defaults}, **recorded}

    kwargs = settings(next(iter(cards.values())))
    for name, card in cards.items():
        other = settings(card)
        if other != kwargs:
            raise SystemExit(f"policy {name} was trained with other env settings ({other} vs {kwargs})")
    rows = []
    for spec in args.model:
        loaded = load_model(spec, device="cpu")
        for budget_spec in args.budgets:
            t0 = time.perf_counter()
            budget, _ = resolve_budget(budget_spec, loaded.layers)
            env = QuantLLMEnv(model=loaded, device="cpu", **{**kwargs, "budget_bpw": budget})
            task = env.task
            scorer, scored_on = ea.scoring_evaluator(task, [str(args.data)], args.n_tokens, task.evaluator.tokens.ids.shape[1],
                                                     task.evaluator.batch_size)
            start = task.start_plan(budget)
            start_metrics = scorer.evaluate(task.plan_recipe(start.candidate.choice))
            cell = {"model": loaded.name, "budget": budget_spec, "budget_bpw": budget, "scored_on": scored_on,
                    "start": start.candidate.label, "start_kl": start_metrics.kl, "start_bpw": start_metrics.bpw,
                    "policies": {}}
            preset_rows: dict[str, dict] = {}
            for name, zip_path in policies.items():
                model = qenv.policies.load(zip_path, env=env)
                recipe, _ = rollout_recipe(model, env, deterministic=True)
                metrics = scorer.evaluate(recipe)
                for preset_name in select_presets(["gptq", "awq", "rtn"], task.evaluator, budget, metrics.bpw):
                    if preset_name not in preset_rows:
                        scored, _ = cached_metrics(scorer, preset(preset_name, task.layers))
                        preset_rows[preset_name] = ea.row(preset_name, "preset", scored, 0.0, budget)
                frontier = {fam: ea.frontier_at(list(preset_rows.values()), fam, metrics.bpw) for fam in ("gptq", "awq")}
                cell["policies"][name] = {"kl": metrics.kl, "bpw": metrics.bpw,
                                          **{f"{fam}_frontier_kl": (pt or {}).get("kl") for fam, pt in frontier.items()}}
            fitting = [r for r in preset_rows.values() if not r["over_budget"] and family_of(r["method"]) in ("rtn", "gptq", "awq")]
            best = min([("anchor " + start.candidate.label, start_metrics.kl)] + [(r["method"], r["kl"]) for r in fitting],
                       key=lambda item: item[1])
            cell["best_start"], cell["best_start_kl"] = best
            cell["wall_s"] = round(time.perf_counter() - t0, 1)
            rows.append(cell)
            line = " ".join(f"{n}={v['kl']:.4g}@{v['bpw']:.3f}" for n, v in cell["policies"].items())
            print(f"{cell['model']:>20} {str(budget_spec):>8}: {line}  best start {best[1]:.4g} ({best[0]})  "
                  f"[{cell['wall_s']} s]", flush=True)
            args.out.write_text(json.dumps(rows, indent=1))

    def count(name: str, key: str) -> str:
        cells = [c for c in rows if isinstance(c["policies"][name].get(key) if key != "best_start_kl" else c[key], float)]
        wins = sum((c["policies"][name][key] if key != "best_start_kl" else c[key]) > c["policies"][name]["kl"]
                   for c in cells)
        return f"{wins}/{len(cells)}"

    for name in policies:
        both = sum(all(isinstance(c["policies"][name].get(k), float) and c["policies"][name][k] > c["policies"][name]["kl"]
                       for k in ("gptq_frontier_kl", "awq_frontier_kl")) for c in rows)
        print(f"{name}: better than the best start in {count(name, 'best_start_kl')}, than the anchor alone in "
              f"{sum(c['start_kl'] > c['policies'][name]['kl'] for c in rows)}/{len(rows)}, GPTQ frontier "
              f"{count(name, 'gptq_frontier_kl')}, AWQ frontier {count(name, 'awq_frontier_kl')}, both {both}/{len(rows)}")
    if len(policies) == 2:
        a, b = policies
        print(f"{b} better than {a} in {sum(c['policies'][b]['kl'] < c['policies'][a]['kl'] for c in rows)}/{len(rows)} cells")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
