#!/usr/bin/env python3
"""Invented rules against the menu (issue 10, item 4): compares ``bench_quality.py`` runs of one RL
agent on a kind that invents rules (``rule``, ``continuous``: every Rule knob) with the same agent
on the 13-rule menu (``discrete``), at the same budgets, seeds and episode counts.

Each run folder is one ``bench_quality.py run ... --methods greedy ppo --rl-agent A --action-kind K``;
its ``ppo`` rows (deterministic rollout after training) and ``rl_best`` rows (best training episode)
carry the recipe (``rules``), so this script also counts how often the invented recipes use a rule,
or a knob value, that the menu does not have. A rule is *effectively* off the menu when it differs
from every menu rule after the salience exponents are reset where they do nothing (no outliers).

    python bench/experiments/invented_rules.py /tmp/q10c/run_maskable_ppo_rule /tmp/q10c/run_maskable_ppo_discrete \\
        /tmp/q10c/run_ppo_continuous /tmp/q10c/run_ppo_discrete --out bench/results/invented_rules_cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from qenv.envs.spaces import DEFAULT_MENU  # noqa: E402
from qenv.quant.rules import Rule  # noqa: E402

ROWS = ("ppo", "rl_best")
#: the knobs compared with the menu's values (clip: "mse" when searched per group)
KNOBS = ("bits", "group_size", "outlier_fraction", "rounding", "clip", "salience", "act_scale", "symmetric")


def effective(rule: Rule) -> Rule:
    """The rule with the salience exponents reset where they do nothing (no outliers kept)."""
    if rule.outlier_fraction == 0 and rule.salience != Rule().salience:
        return dataclasses.replace(rule, salience=Rule().salience)
    return rule


def knob_values(rule: Rule) -> dict[str, Any]:
    return {"bits": rule.bits, "group_size": rule.group_size, "outlier_fraction": rule.outlier_fraction,
            "rounding": rule.rounding, "clip": "mse" if rule.mse_clip else rule.clip, "salience": rule.salience,
            "act_scale": rule.act_scale, "symmetric": rule.symmetric}


MENU = {effective(r) for r in DEFAULT_MENU}
MENU_VALUES = {k: {knob_values(effective(r))[k] for r in DEFAULT_MENU} for k in KNOBS}


def recipe_use(rules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Off-menu counts of one recipe (its layers' rules as dicts)."""
    layer_rules = [effective(Rule.from_dict(r)) for r in rules.values()]
    distinct = set(layer_rules)
    knob_layers = {k: sum(knob_values(r)[k] not in MENU_VALUES[k] for r in layer_rules) for k in KNOBS}
    off = [r for r in layer_rules if r not in MENU]
    return {"layers": len(layer_rules), "distinct_rules": len(distinct),
            "off_menu_rules": sum(r not in MENU for r in distinct), "off_menu_layers": len(off),
            # off the menu although every knob value is one the menu uses (a new combination)
            "new_combination_layers": sum(all(knob_values(r)[k] in MENU_VALUES[k] for k in KNOBS) for r in off),
            "off_menu_knob_layers": knob_layers}


def load(run: Path) -> dict[str, Any]:
    rows = []
    for path in sorted((run / "raw").glob("quality_*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    settings = json.loads((run / "raw" / "settings.json").read_text()) if (run / "raw" / "settings.json").is_file() else {}
    settings = settings.get("args", settings)
    agent = settings.get("rl_agent") or next((r["agent"] for r in rows if r.get("method") == "ppo" and "agent" in r), "?")
    kind = settings.get("action_kind") or next((r["action_kind"] for r in rows if r.get("action_kind")), "?")
    cells: dict[tuple[str, float], dict[str, Any]] = {}
    for r in rows:
        cell = cells.setdefault((r["model"], float(r["budget"])), {"greedy": None, "ppo": {}, "rl_best": {}, "errors": []})
        if r.get("error") or r.get("skipped"):
            cell["errors"].append(f"{r['method']} seed {r.get('seed')}: {r.get('error') or r.get('skipped')}")
        elif r["method"] == "greedy":
            cell["greedy"] = {"kl": r["kl"], "bpw": r["bpw"]}
        elif r["method"] in ROWS and "kl" in r:
            cell[r["method"]][int(r["seed"])] = {"kl": r["kl"], "bpw": r["bpw"], "over_budget": r["over_budget"],
                                                 "held_kl": r.get("held_kl"), "ppl": r.get("ppl"),
                                                 "wall_s": r.get("wall_s"), "clamped_actions": r.get("clamped_actions"), **recipe_use(r.get("rules", {}))}
    return {"run": str(run), "agent": agent, "kind": kind, "cells": cells}


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def compare(invented: dict[str, Any], menu: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Markdown rows and JSON records: invented vs menu, same agent, per (model, budget) and row."""
    lines, records = [], []
    for key in sorted(invented["cells"], key=lambda k: (k[0], k[1])):
        inv, men = invented["cells"][key], menu["cells"].get(key)
        if men is None:
            continue
        greedy = inv["greedy"] or men["greedy"]
        for row in ROWS:
            seeds = sorted(set(inv[row]) & set(men[row]))
            a = [inv[row][s]["kl"] for s in seeds]
            b = [men[row][s]["kl"] for s in seeds]
            bpw = max([inv[row][s]["bpw"] for s in seeds] + [men[row][s]["bpw"] for s in seeds], default=float("nan"))
            spent = " / ".join(f"{min(x):.2f}–{max(x):.2f}" if x else "–"
                               for x in ([inv[row][s]["bpw"] for s in seeds], [men[row][s]["bpw"] for s in seeds]))
            over = any(inv[row][s]["over_budget"] or men[row][s]["over_budget"] for s in seeds)
            wins = sum(x < y for x, y in zip(a, b))
            if not seeds:
                verdict = "not measured"
            elif statistics.mean(a) < statistics.mean(b):
                verdict = f"**invented** ({statistics.mean(b) / statistics.mean(a):.2f}x)"
            else:
                verdict = f"menu ({statistics.mean(a) / statistics.mean(b):.2f}x)"
            records.append({"model": key[0], "budget": key[1], "row": row, "seeds": seeds, "invented_kl": a,
                            "menu_kl": b, "greedy_kl": greedy and greedy["kl"], "max_bpw": bpw, "over_budget": over,
                            "invented_wins_seeds": wins, "invented": f"{invented['agent']}/{invented['kind']}",
                            "menu": f"{menu['agent']}/{menu['kind']}"})
            lines.append(f"| {key[0]} | {key[1]:g} | {row} | {mean_std(a)} | {mean_std(b)} | "
                         f"{greedy['kl']:.3g} | {spent}{' (over!)' if over else ''} | {wins}/{len(seeds)} | {verdict} |"
                         if greedy else f"| {key[0]} | {key[1]:g} | {row} | {mean_std(a)} | {mean_std(b)} | – | "
                         f"{spent} | {wins}/{len(seeds)} | {verdict} |")
    return lines, records


def use_lines(run: dict[str, Any]) -> list[str]:
    lines = []
    for key in sorted(run["cells"], key=lambda k: (k[0], k[1])):
        for row in ROWS:
            per = list(run["cells"][key][row].values())
            if not per:
                continue
            def avg(f: Any) -> float:
                return statistics.mean(f(p) for p in per)
            knobs = {k: avg(lambda p, k=k: p["off_menu_knob_layers"][k] / p["layers"]) for k in KNOBS}
            shown = ", ".join(f"{k} {v:.0%}" for k, v in knobs.items() if v > 0) or "none"
            lines.append(f"| {run['agent']}/{run['kind']} | {key[0]} | {key[1]:g} | {row} | {avg(lambda p: p['distinct_rules']):.1f} | "
                         f"{avg(lambda p: p['off_menu_rules']):.1f} | {avg(lambda p: p['off_menu_layers'] / p['layers']):.0%} | "
                         f"{avg(lambda p: p['new_combination_layers'] / p['layers']):.0%} | {shown} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bench_quality.py run folders")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    runs = [load(r) for r in args.runs]
    menus = {r["agent"]: r for r in runs if r["kind"] == "discrete"}
    md = ["| model | budget | row | invented KL | menu KL | greedy KL | bpw, invented / menu (min–max over seeds) | invented better (seeds) | lower mean KL |",
          "|---|---|---|---|---|---|---|---|---|"]
    records = []
    for run in runs:
        if run["kind"] == "discrete" or run["agent"] not in menus:
            continue
        md.append(f"| **{run['agent']}: {run['kind']} vs discrete** | | | | | | | | |")
        lines, recs = compare(run, menus[run["agent"]])
        md += lines
        records += recs
    md += ["", "| agent/kind | model | budget | row | distinct rules | off-menu rules | layers off the menu | "
           "of which new combinations of menu knob values | layers with a knob value the menu lacks |",
           "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        md += use_lines(run)
    errors = [f"{r['agent']}/{r['kind']} {k[0]} @ {k[1]:g}: {e}" for r in runs for k, c in r["cells"].items() for e in c["errors"]]
    if errors:
        md += ["", "Errors or skipped units:", *[f"- {e}" for e in errors]]
    payload = {"menu_values": {k: sorted(map(str, v)) for k, v in MENU_VALUES.items()}, "comparisons": records,
               "runs": [{**r, "cells": [{"model": k[0], "budget": k[1], **c} for k, c in r["cells"].items()]} for r in runs]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
