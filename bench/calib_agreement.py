#!/usr/bin/env python
"""Does the calibration ranking of recipes match their held-out ranking? (issue 24, item 6)

A search ranks recipes by their KL on its calibration tokens, the tokens GPTQ and AWQ also fit. If
that ranking is not the held-out ranking, the search picks recipes that fit the tokens rather than
the model. For each calibration size this scores the same recipes (every uniform rule of the
default menu, and random per-layer mixes of its rules, seeded) on the calibration tokens and on
held-out text, and reports the rank agreement: Spearman's rho, the share of recipe pairs ordered
the same way, and whether the calibration's best recipe is the held-out best.

Calibration is text (bench/equal_size.py's split: WikiText-2 train, or for stories260K the first
60% of the TinyStories validation stories) and the held-out text is the rest.

    python bench/calib_agreement.py --models stories260K --n-tokens 512 2048 8192 --out /tmp/agree
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import bench_quality as bq  # noqa: E402
import equal_size  # noqa: E402


def ranks(values: list[float]) -> np.ndarray:
    """Ranks (0 = smallest), ties sharing their mean rank."""
    arr = np.asarray(values, dtype=np.float64)
    order = arr.argsort(kind="stable")
    out = np.empty(len(arr))
    out[order] = np.arange(len(arr))
    for value in np.unique(arr):
        tied = arr == value
        out[tied] = out[tied].mean()
    return out


def agreement(calib: list[float], held: list[float]) -> dict[str, Any]:
    """Spearman's rho, the share of pairs ordered alike, and whether the calibration's best is the held-out best."""
    rc, rh = ranks(calib), ranks(held)
    rho = float(np.corrcoef(rc, rh)[0, 1]) if len(calib) > 1 else float("nan")
    c, h = np.asarray(calib), np.asarray(held)
    i, j = np.triu_indices(len(c), k=1)
    pairs = float(np.mean(np.sign(c[i] - c[j]) == np.sign(h[i] - h[j]))) if len(i) else float("nan")
    return {"spearman": rho, "pairs_alike": pairs, "best_agrees": int(np.argmin(c)) == int(np.argmin(h)),
            "held_rank_of_calib_best": int(rh[int(np.argmin(c))]) + 1}


def recipes_of(layers: list[Any], menu: tuple[Any, ...], n_random: int, seed: int) -> list[tuple[str, Any]]:
    """Every uniform menu rule, then ``n_random`` seeded random mixes of the menu's rules."""
    from qenv.quant.rules import Recipe

    out = [(rule.label(), Recipe({i.name: rule for i in layers})) for rule in menu]
    rng = np.random.default_rng(seed)
    for k in range(n_random):
        out.append((f"random{k}", Recipe({i.name: menu[int(rng.integers(len(menu)))] for i in layers})))
    return out


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    from eval_agent import scoring_evaluator
    from qenv.cli.envs import make_quant_env
    from qenv.envs.spaces import DEFAULT_MENU

    data_dir = Path(args.data_dir).resolve()
    out = Path(args.out).resolve()
    results = []
    for entry in args.models:
        model = bq.resolve_model(entry, data_dir)
        calib_text, held_text = equal_size.text_split(model, data_dir, out / "work")
        for n_tokens in args.n_tokens:
            t0 = time.perf_counter()
            env = make_quant_env(model=model["spec"], budget_bpw=16.0, data=calib_text, n_tokens=n_tokens,
                                 seq_len=args.seq_len, batch_size=args.batch_size, device=args.device,
                                 cache_dir=str(out / "cache"))
            task = env.unwrapped.task
            held, held_desc = scoring_evaluator(task, [held_text], args.held_tokens, args.seq_len, args.batch_size)
            names, calib_kl, held_kl = [], [], []
            for name, recipe in recipes_of(task.layers, DEFAULT_MENU, args.random, seed=0):
                names.append(name)
                calib_kl.append(task.evaluator.evaluate(recipe).kl)
                held_kl.append(held.evaluate(recipe).kl)
            row = {"model": model["name"], "n_tokens": n_tokens, "recipes": len(names), "held": held_desc,
                   **agreement(calib_kl, held_kl), "wall_s": time.perf_counter() - t0}
            bq.log(f"{model['name']} n_tokens={n_tokens}: rho {row['spearman']:.3f}, pairs alike "
                   f"{row['pairs_alike']:.3f}, best agrees {row['best_agrees']} ({row['wall_s']:.0f}s)")
            results.append(row)
            env.close()
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | calibration tokens | recipes | Spearman rho | pairs ordered alike | calibration's best is "
             "held-out's best | its held-out rank |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['n_tokens']} | {r['recipes']} | {r['spearman']:.3f} | "
                     f"{r['pairs_alike']:.3f} | {'yes' if r['best_agrees'] else 'no'} | "
                     f"{r['held_rank_of_calib_best']} |")
    held = {r["model"]: r["held"] for r in results}
    return "\n".join(lines + [""] + [f"- {m}: scored on {h}" for m, h in held.items()])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["stories260K", "default"])
    p.add_argument("--n-tokens", nargs="+", type=int, default=[512, 2048, 8192])
    p.add_argument("--held-tokens", type=int, default=8192)
    p.add_argument("--random", type=int, default=24, help="random per-layer mixes besides the uniform rules")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=str(bq.DEFAULT_DATA_DIR))
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    text = table(measure(args))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "calib_agreement.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
