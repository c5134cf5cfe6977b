#!/usr/bin/env python
"""The equal-size (H1) table: searched recipes against each human preset at the preset's own size.

For each model and each human preset (gptq-w3, gptq-w4, awq-w3, awq-w4 on the default menu;
llama.cpp's q3_k_m-im, q4_k_m-im, iq3_xxs-im on ``menu="gguf"``), the budget is the preset's exact
bits per weight on that model (:func:`qenv.quant.presets.resolve_budget`, the programs' resolver),
and the rows (``--methods``) are:

- the preset itself;
- ``greedy_plan``: the old one-evaluation greedy (HAWQ-style on the per-layer proxy), measured;
- ``best_uniform``: the uniform menu rule that fits with the lowest calibration KL (the bar greedy
  must clear: the issue's "greedy is never worse than the best uniform menu rule");
- ``best_start``: the best measured of greedy's plan, the presets the menu expresses and the uniform
  rules that fit (``ModelTask.start_plan``: where every search and the plan-based RL kinds start);
- ``greedy``: greedy refined by end-to-end measurement from the best start (``--evaluations``);
- ``evolution`` (``--evaluations`` evaluations, default 128; mean ± std over ``--seeds``);
- with ``--rl-eval``, the best RL method (bench_quality's ``rl_eval``: the RL agent trained on N − K
  episodes, the best of K deterministic rollouts).

``--validation-fraction`` (default 0.25) holds that share of the calibration sequences back from
the env (episodes, GPTQ/AWQ calibration and the presets all use the rest); greedy and evolution
return the finalist with the lowest KL on the held-back sequences (``split_tokens``), never scored
by the table. 0 turns it off (the pick is then the best on all the calibration tokens).

Calibration is on text (WikiText-2 train for the WikiText models; for stories260K the first 60% of
the TinyStories validation stories, whose last 40% are its held-out text: no story is in both), and
every recipe is scored on held-out text: KL to the full-precision model and perplexity. The ratio is
searched held-out KL / preset held-out KL: below 1 the searched recipe is better; every cell where
it is worse says so.

Each (model, size) is one ``bench_quality.quality_job`` (its env, evaluator, methods and rows),
run here in one process, one after the other. Presets of equal bpw on a model (gptq-w3 and awq-w3
store the same bits) share one job: their searches are the same work, so they run once and the
table compares them with each preset.

    python bench/equal_size.py --models stories260K default --out /tmp/equal --seeds 0 1 2
    python bench/equal_size.py --budget-bpw gptq-w3 gptq-w4 --evaluations 32 --seeds 0 --device cpu \
        --batch-size 2 --held-tokens 2048 --out /tmp/eq-search      # (was bench/search_equal_size.py)
    python bench/equal_size.py --models stories260K --presets gptq-w4 --evaluations 8 --seeds 0 \\
        --n-tokens 512 --held-tokens 512 --out /tmp/eq-small
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import bench_quality as bq  # noqa: E402  (puts the repo on sys.path too)

#: the human presets of the table; llama.cpp's mixes are searched on llama.cpp's own menu
PRESETS: tuple[str, ...] = ("gptq-w3", "gptq-w4", "awq-w3", "awq-w4", "q3_k_m-im", "q4_k_m-im", "iq3_xxs-im")
#: share of the TinyStories validation stories used for calibration (the rest is held out)
TINYSTORIES_CALIB_SHARE = 0.6
SEARCHED = ("greedy_plan", "best_uniform", "best_start", "greedy", "evolution", "rl_eval")
#: the table's column of each searched method
LABELS = {"greedy_plan": "greedy plan (1 eval)", "best_uniform": "best uniform rule", "best_start": "best start",
          "greedy": "greedy", "evolution": "evolution", "rl_eval": "RL (rl_eval)"}
#: what the table runs without --methods (rl_eval with --rl-eval)
DEFAULT_METHODS = ("greedy_plan", "best_uniform", "best_start", "greedy", "evolution")


def menu_of(preset_name: str, menu: str = "default") -> str | None:
    """``"gguf"`` for llama.cpp's mixes (searched among llama.cpp's types), else ``menu`` (``None`` for
    the default menu, ``"learned"`` for the default menu plus the learned-rounding rules)."""
    from qenv.quant.presets import LLAMACPP_PRESETS

    if preset_name in LLAMACPP_PRESETS:
        return "gguf"
    return None if menu == "default" else menu


def text_split(model: dict[str, str], data_dir: Path, work: Path) -> tuple[str, str]:
    """``(calibration text, held-out text)`` of a model: WikiText-2 train/test, or for a TinyStories
    model two files of disjoint stories cut from the validation file (no train split is stored)."""
    if model["corpus"] == "wikitext":
        return str(data_dir / "wikitext-2" / "train.txt"), str(data_dir / "wikitext-2" / "test.txt")
    from qenv.eval.tokens import DOCUMENT_SEPARATORS, read_text_file

    source = data_dir / "tinystories" / "TinyStories-valid-first1000.txt"
    sep = DOCUMENT_SEPARATORS[0]
    stories = [s for s in read_text_file(source).split(sep) if s.strip()]
    cut = int(len(stories) * TINYSTORIES_CALIB_SHARE)
    work.mkdir(parents=True, exist_ok=True)
    calib, held = work / "tinystories_calib.txt", work / "tinystories_held.txt"
    calib.write_text(sep.join(stories[:cut]) + sep)
    held.write_text(sep.join(stories[cut:]) + sep)
    return str(calib), str(held)


def same_size_groups(model: dict[str, str], presets: list[str], menu: str) -> list[list[str]]:
    """The presets grouped by (exact bpw on this model, searchers' menu), in the order given.

    gptq-w3 and awq-w3 store the same codes, scales and zero points, so their budgets are equal to
    the bit: one job measures both presets against one set of searches (the searches at equal budget,
    menu and seed are the same work), which halves the table's cost."""
    from qenv.models.loading import load_model
    from qenv.quant.presets import resolve_budget

    layers = load_model(model["spec"], device="cpu").layers
    groups: dict[tuple[float, str | None], list[str]] = {}
    for name in presets:
        groups.setdefault((resolve_budget(name, layers)[0], menu_of(name, menu)), []).append(name)
    return list(groups.values())


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (model, preset) job; returns the rows they recorded."""
    out = Path(args.out).resolve()
    (out / "raw").mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir).resolve()
    methods = list(args.methods) + (["rl_eval"] if args.rl_eval and "rl_eval" not in args.methods else [])
    deadline = time.time() + args.deadline_s
    for entry in args.models:
        model = bq.resolve_model(entry, data_dir)
        model["calib"], model["held"] = text_split(model, data_dir, out / "work")
        for names in same_size_groups(model, args.presets, args.menu):
            name = names[0]
            cfg = {"model": model, "budget": name, "presets": names, "methods": methods, "menu": menu_of(name, args.menu),
                   "deadline": deadline, "out": str(out), "data_dir": str(data_dir), "n_tokens": args.n_tokens,
                   "seq_len": args.seq_len, "batch_size": args.batch_size, "held_tokens": args.held_tokens,
                   "device": args.device, "dtype": "float32", "cache_dir": str(Path(args.cache_dir or out / "cache")),
                   "seeds": args.seeds, "episodes": args.evaluations, "threads": 1, "rl_agent": args.rl_agent,
                   "action_kind": args.action_kind, "rl_eval_points": args.rl_eval_points,
                   "validation_fraction": args.validation_fraction}
            bq.log(f"{model['name']} at {' and '.join(names)}'s size ({menu_of(name, args.menu) or 'default'} menu)")
            bq.quality_job(cfg)
    return bq.load_rows(out)


def _mean(values: list[float]) -> tuple[float, float]:
    return bq._mean_std(values) if values else (math.nan, math.nan)


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown report: what bpw counts and what calibrated, then one row per (model, preset)."""
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        if r.get("kind") != "quality" or not r.get("budget_preset"):
            continue
        cell = cells.setdefault((r["model"], r["budget_preset"]), {"bpw": r["budget"], "rows": {}})
        if r["method"] == "meta":
            cell["meta"] = r
        elif "kl" in r or r.get("error"):
            cell["rows"].setdefault(r["method"], []).append(r)
    shown = [m for m in SEARCHED if any(m in c["rows"] for c in cells.values())]
    lines = ["bpw counts the quantized linear layers of the blocks (codes, group scales and zero points; "
             "embeddings, norms and an untied lm_head stay 16-bit and are not counted); the budget of each row "
             "is the preset's own bpw on that model. KL and perplexity are on held-out text; ratio = searched "
             "held-out KL / preset held-out KL (below 1: the searched recipe is better).", ""]
    for model in dict.fromkeys(m for m, _ in cells):
        meta = next((c.get("meta") for (m, _), c in cells.items() if m == model and c.get("meta")), {}) or {}
        lines.append(f"### {model}\n")
        lines.append(f"Calibration: {meta.get('calib_tokens')} tokens ({meta.get('calib')}); held-out: "
                     f"{meta.get('held')}; greedy, evolution and RL: {meta.get('episodes')} evaluations.\n")
        lines.append("| preset (its bpw) | menu | preset KL / ppl | "
                     + " | ".join(f"{LABELS[m]} KL / ppl (ratio)" for m in shown) + " | best searched |")
        lines.append("|---|---|---|" + "---|" * len(shown) + "---|")
        for (m, budget_name), cell in cells.items():
            if m != model:
                continue
            for name in [k.split(":", 1)[1] for k in cell["rows"] if k.startswith("preset:")] or [budget_name]:
                lines.append(_preset_line(name, cell, shown))
        lines.append("")
    return "\n".join(lines)


def _preset_line(name: str, cell: dict[str, Any], shown: list[str]) -> str:
    """One table row: a preset and, as ratios to its held-out KL, the searches at its size."""
    menu = cell.get("meta", {}).get("menu") or menu_of(name) or "default"
    human = (cell["rows"].get(f"preset:{name}") or [{}])[0]
    if "held_kl" not in human:
        return (f"| {name} ({cell['bpw']:.3f}) | {menu} | failed: {human.get('error', 'no row')} |"
                + " |" * len(shown) + " |")
    texts, best = [], None
    for method in shown:
        runs = [r for r in cell["rows"].get(method, []) if "held_kl" in r]
        if not runs:
            errors = [r.get("error") for r in cell["rows"].get(method, []) if r.get("error")]
            texts.append(f"failed: {errors[0][:60]}" if errors else "—")
            continue
        kl, ppl = _mean([r["held_kl"] for r in runs]), _mean([r["ppl"] for r in runs])
        ratio = kl[0] / human["held_kl"] if human["held_kl"] > 0 else math.inf
        spread = f" ± {bq.fmt_num(kl[1], 2)}" if len(runs) > 1 else ""
        verdict = "**worse**" if ratio > 1 else "better" if ratio < 1 else "equal"
        over = " **over budget**" if any(r.get("over_budget") for r in runs) else ""
        texts.append(f"{bq.fmt_num(kl[0])}{spread} / {ppl[0]:.2f} ({ratio:.3g}, {verdict}){over}")
        if method in ("greedy", "evolution", "rl_eval") and (best is None or ratio < best[1]):
            best = (method, ratio)
    best_text = "—" if best is None else (f"{best[0]} {best[1]:.3g}" + (
        " — **worse than the preset**" if best[1] > 1 else ""))
    return (f"| {name} ({cell['bpw']:.3f}) | {menu} | {bq.fmt_num(human['held_kl'])} / {human['ppl']:.2f} | "
            + " | ".join(texts) + f" | {best_text} |")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["stories260K", "default"],
                   help="stories260K, default, NAME=PATH or a path (see bench_quality.py)")
    p.add_argument("--presets", "--budget-bpw", nargs="+", default=list(PRESETS), dest="presets",
                   help="the human presets whose own bpw is each budget")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=SEARCHED,
                   help="searched rows besides the preset")
    p.add_argument("--menu", choices=("default", "learned"), default="default",
                   help="the searchers' menu for GPTQ/AWQ presets: default, or learned (default + learned-rounding "
                        "rules w2-w4); llama.cpp's mixes are always searched on the gguf menu")
    p.add_argument("--validation-fraction", type=float, default=0.25,
                   help="share of the calibration sequences held back for the searchers' final pick (0: none)")
    p.add_argument("--evaluations", type=int, default=128, help="evaluations of greedy, evolution and the RL method")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rl-eval", action="store_true", help="add the best RL method (bench_quality's rl_eval)")
    p.add_argument("--rl-agent", default="maskable_ppo")
    p.add_argument("--action-kind", default="residual")
    p.add_argument("--rl-eval-points", type=int, default=8)
    p.add_argument("--n-tokens", type=int, default=2048, help="calibration tokens")
    p.add_argument("--held-tokens", type=int, default=16384, help="held-out tokens")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=str(bq.DEFAULT_DATA_DIR))
    p.add_argument("--cache-dir", default=None, help="qenv cache (default <out>/cache)")
    p.add_argument("--deadline-s", type=float, default=6 * 3600.0, help="no new unit after this many seconds")
    p.add_argument("--out", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    from qenv.quant.presets import parse_budget

    from qenv.errors import QenvError

    args = build_parser().parse_args(argv)
    for name in args.presets:
        try:
            named = parse_budget(name)
        except QenvError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not isinstance(named, str):
            print(f"error: --presets {name} is a number, not a preset. Fix: name presets, e.g. gptq-w4.",
                  file=sys.stderr)
            return 2
    rows = run(args)
    text = table(rows)
    (Path(args.out) / "equal_size.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
