#!/usr/bin/env python3
"""Which layers the RL recipes that beat greedy give more or fewer bits than greedy does.

    python bench/experiments/recipe_shift.py RUN_DIR [RUN_DIR ...]

Reads ``bench_quality.py run`` folders (``raw/*.jsonl``). For each cell whose greedy recipe is on
record (a seeded RL row with exactly greedy's KL: a rollout that stayed on the plan), every RL row
(``ppo``, ``rl_eval``) of that cell with a lower KL than greedy is compared with it layer by layer:
the layers whose bits per weight went up or down, by the kind of layer (``q_proj``, ``c_attn``,
...) and by depth (the first, middle and last third of the blocks). What it prints is the pattern
BENCHMARKS.md's allocation-kind section starts from: greedy's per-layer error under-rates early
layers, on every model.
"""
from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "c_fc", "wq", "wk",
         "wv", "wo", "w1", "w2", "w3", "lm_head")


def rule_bpw(rule: dict) -> float:
    """Bits per weight of a rule: its bits plus a 16-bit scale and zero per group."""
    group = rule.get("group_size") or 0
    return rule["bits"] + (32.0 / group if group > 0 else 0.0)


def kind_of(name: str) -> str:
    if "c_proj" in name:
        return "attn.c_proj" if "attn" in name else "mlp.c_proj"
    return next((k for k in KINDS if k in name), name.rsplit(".", 1)[-1])


def block_of(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def main(runs: list[str]) -> int:
    rows = [json.loads(line) for run in runs for f in sorted(Path(run, "raw").glob("*.jsonl"))
            for line in f.read_text().splitlines() if line.strip()]
    greedy_kl = {(r["model"], r["budget"]): r["kl"] for r in rows if r.get("method") == "greedy" and "kl" in r}
    greedy = {}
    for r in rows:
        key = (r.get("model"), r.get("budget"))
        if "rules" in r and key in greedy_kl and abs(r["kl"] - greedy_kl[key]) <= 1e-12 * greedy_kl[key]:
            greedy[key] = r["rules"]
    moves: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    recipes = 0
    for r in rows:
        key = (r.get("model"), r.get("budget"))
        if r.get("method") not in ("ppo", "rl_eval") or "rules" not in r or key not in greedy:
            continue
        if not r["kl"] < greedy_kl[key] * (1 - 1e-9):
            continue
        recipes += 1
        blocks = [b for b in map(block_of, r["rules"]) if b is not None]
        n_blocks = max(blocks) + 1 if blocks else 1
        for name, rule in r["rules"].items():
            d = rule_bpw(rule) - rule_bpw(greedy[key][name])
            if abs(d) > 1e-9:
                moves[kind_of(name)].append((d, r["model"]))
                b = block_of(name)
                third = "x" if b is None else ("first", "middle", "last")[min(2, 3 * b // n_blocks)]
                moves[f"{third} third"].append((d, r["model"]))
    print(f"{recipes} RL recipes better than greedy, in the {len(greedy)} cells whose greedy recipe is on record")
    for key, ds in sorted(moves.items()):
        up = sum(d > 0 for d, _ in ds)
        models = dict(collections.Counter(m for _, m in ds))
        print(f"{key:>14}: {up:4d} layers up, {len(ds) - up:4d} down, mean {sum(d for d, _ in ds) / len(ds):+.2f} bpw "
              f"({models})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
