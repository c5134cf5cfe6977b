#!/usr/bin/env python3
"""The zero-shot transfer table of BENCHMARKS.md from ``eval_agent.py`` outputs.

Each ``results.json`` is one ``eval_agent.py --policy P --model M... --budget-bpw B`` run; every
model it marks unseen (``zero_shot``) gives one row: the policy's one deterministic rollout beside
greedy, random search and evolution (the same ``--search-evals``), the uniform searcher and the best
human recipe at or under the budget (lowest KL among the presets, with its own bpw), all on the
same calibration tokens. The tallies under the table count strict wins (equal KL is not a win).

    python bench/zero_shot_table.py /tmp/zs/*/results.json --out bench/results/transfer_zero_shot_x
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def fmt(x: float) -> str:
    return f"{x:.4g}"


def cells(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        run = json.loads(Path(path).read_text())
        budget = float(run["budget_bpw"])
        for model in run["models"]:
            if model.get("seen") or model.get("status") != "zero-shot":
                continue  # a training model, or a fine-tuned policy's
            rows = {r["method"]: r for r in model["rows"]}
            policy = next(r for r in model["rows"] if r["kind"] == "policy")
            presets = [r for r in model["rows"] if r["kind"] == "preset" and not r["over_budget"]
                       and r["method"] != "fp16"]
            best = min(presets, key=lambda r: r["kl"]) if presets else None
            out.append({"model": model["model"], "n_layers": model["n_layers"], "tokens": model.get("tokens"),
                        "budget": budget, "policy": policy,
                        **{name: rows.get(name) for name in ("greedy", "random", "evolution", "uniform")},
                        "best_preset": best, "source": str(path)})
    return sorted(out, key=lambda c: (c["budget"], c["model"]))


def versus(kl: float, other: dict | None) -> str:
    if other is None:
        return "—"
    ratio = other["kl"] / max(kl, 1e-30)
    word = "**better**" if kl < other["kl"] else "same" if kl == other["kl"] else "worse"
    return f"{word} ({ratio:.2f}x)"


def markdown(table: list[dict]) -> str:
    md = ["| model (layers) | budget | policy KL (bpw) | greedy | random | evolution | uniform | best preset at or "
          "under the budget (bpw) | policy vs greedy | policy vs best preset |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    wins = {"greedy": [0, 0], "random": [0, 0], "evolution": [0, 0], "preset": [0, 0], "preset_3plus": [0, 0]}
    for c in table:
        kl = c["policy"]["kl"]
        best = c["best_preset"]
        col = lambda name: fmt(c[name]["kl"]) if c.get(name) else "—"  # noqa: E731
        md.append(f"| {c['model']} ({c['n_layers']}) | {c['budget']:g} | {fmt(kl)} ({c['policy']['bpw']:.3f}) | "
                  f"{col('greedy')} | {col('random')} | {col('evolution')} | {col('uniform')} | "
                  + (f"{best['method']}: {fmt(best['kl'])} ({best['bpw']:.3f})" if best else "—")
                  + f" | {versus(kl, c.get('greedy'))} | {versus(kl, best)} |")
        for name in ("greedy", "random", "evolution"):
            if c.get(name):
                wins[name][0] += kl < c[name]["kl"]
                wins[name][1] += 1
        if best:
            wins["preset"][0] += kl < best["kl"]
            wins["preset"][1] += 1
            if c["budget"] >= 3.0:
                wins["preset_3plus"][0] += kl < best["kl"]
                wins["preset_3plus"][1] += 1
    words = {"greedy": "greedy", "random": "random search", "evolution": "evolution",
             "preset": "the best preset at or under the budget",
             "preset_3plus": "the best preset at or under the budget at 3.0 bpw and above"}
    md.append("")
    md += [f"- the policy beats {words[k]} in {w}/{n} cells" for k, (w, n) in wins.items() if n]
    return "\n".join(md) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="eval_agent.py results.json files")
    p.add_argument("--out", help="write <out>.json (the cells) and <out>.md (the table)")
    args = p.parse_args()
    table = cells(args.results)
    text = markdown(table)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps({"cells": table}, indent=1))
        Path(args.out + ".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
