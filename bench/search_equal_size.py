#!/usr/bin/env python3
"""Searches at the exact size of uniform GPTQ (issue 24 items 2-4), calibration vs held-out KL.

    PYTHONPATH=. python bench/search_equal_size.py [--models stories260K default] \\
        [--presets gptq-w3 gptq-w4] [--evaluations 64] [--seeds 0 1 2] [--out results.json]

For each model and each preset, the budget is the preset's exact bpw on that model. Rows:

- the preset itself (uniform GPTQ);
- ``greedy plan``: the old one-evaluation greedy (HAWQ-style on the per-layer proxy), measured;
- ``best start``: the best measured of greedy's plan, the presets and uniform rules that fit;
- ``greedy (<ranking> ranking)``: the new greedy (best start, then the best-ranked moves, screened
  and measured; ``--rankings``: measured marginals and/or the per-layer proxy);
- ``evolution``: EvoPress-style evolution from the best start, one row per seed.

Calibration: the first ``--n-tokens`` tokens of the training text (wikitext-2 train for the built-in
default model; TinyStories for stories260K, which has no training split here). Held-out: wikitext-2
test, and for stories260K the TinyStories tokens after ``--held-offset`` (never calibration). Every
number comes from the project's evaluator; the held-out evaluator shares the quantized weights (rules
calibrated on the calibration tokens only).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def corpus(model: str) -> tuple[str, str, str, int]:
    """(model spec, calibration text, held-out text, held-out token offset)."""
    if model == "stories260K":
        stories = str(DATA / "tinystories" / "TinyStories-valid-first1000.txt")
        return str(DATA / "stories260K" / "stories260K.bin"), stories, stories, -1
    return model, str(DATA / "wikitext-2" / "train.txt"), str(DATA / "wikitext-2" / "test.txt"), 0


def main() -> int:
    import torch

    from qenv.agents import make_agent
    from qenv.envs.episodes import play_episode, recipe_of
    from qenv.envs.quant_llm import QuantLLMEnv
    from qenv.eval.evaluator import Evaluator
    from qenv.eval.tokens import tokens_from_text
    from qenv.models.loading import load_model
    from qenv.quant.accounting import bits_per_weight
    from qenv.quant.presets import preset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["stories260K", "default"])
    p.add_argument("--presets", nargs="+", default=["gptq-w3", "gptq-w4"])
    p.add_argument("--evaluations", type=int, default=64, help="budget of greedy and evolution (full evaluations)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="evolution's seeds")
    p.add_argument("--n-tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2, help="2: 8 batches of 2048 tokens, for the screening stages")
    p.add_argument("--held-offset", type=int, default=16384, help="stories260K: held-out tokens start here")
    p.add_argument("--methods", nargs="+", default=["preset", "greedy", "evolution"],
                   help="rows to run: preset, greedy (the plan, the best start and the refined greedy), evolution")
    p.add_argument("--rankings", nargs="+", default=["measured", "proxy"], help="greedy's refinement rankings")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for model in args.models:
        spec, calib, held_text, offset = corpus(model)
        loaded = load_model(spec, device="cpu")
        held_tokens = tokens_from_text(loaded.tokenizer, [held_text], args.n_tokens, args.seq_len,
                                       offset_tokens=args.held_offset if offset < 0 else offset)
        for name in args.presets:
            budget = bits_per_weight(loaded.layers, preset(name, loaded.layers))
            env = QuantLLMEnv(spec, budget_bpw=budget, data=calib, n_tokens=args.n_tokens, seq_len=args.seq_len,
                              batch_size=args.batch_size, device="cpu")
            task = env.task
            held = Evaluator(task.loaded, held_tokens, batch_size=args.batch_size, cache_dir=task.evaluator.cache_dir)
            held.weights = task.evaluator.weights  # calibrated on the calibration tokens only

            def record(method: str, recipe, evaluations: float, seconds: float, seed: int | None = None) -> None:
                cal = task.evaluator.evaluate(recipe)
                out = held.evaluate(recipe)
                row = {"model": model, "preset": name, "budget_bpw": budget, "method": method, "seed": seed,
                       "bpw": cal.bpw, "calib_kl": cal.kl, "held_kl": out.kl, "held_ppl": out.ppl,
                       "evaluations": evaluations, "seconds": seconds}
                rows.append(row)
                print(f"{model:12s} {name:8s} {budget:.4f} {method:22s} bpw {cal.bpw:.4f} calib KL {cal.kl:.5f} "
                      f"held KL {out.kl:.5f} ppl {out.ppl:.3f} evals {evaluations} ({seconds:.0f} s)", flush=True)

            def played(choice):  # the recipe an episode of these menu indices makes (AWQ scales folded)
                return recipe_of(play_episode(env, [int(j) for j in choice]))

            n = len(task.layers)
            if "preset" in args.methods:
                record(name, preset(name, task.layers), 1, 0.0)
            if "greedy" in args.methods:
                t0 = time.perf_counter()
                greedy = make_agent("greedy", env, seed=0)
                record("greedy plan (old greedy)", played(greedy.start_candidates()[0].choice), 1,
                       time.perf_counter() - t0)
                for k, ranking in enumerate(args.rankings):
                    t0 = time.perf_counter()
                    greedy = make_agent("greedy", env, seed=0, ranking=ranking)
                    greedy.learn(args.evaluations * n)
                    start = greedy.start
                    if k == 0:
                        record(f"best start ({start.candidate.label})", played(start.candidate.choice),
                               len(start.measured), 0.0)
                    record(f"greedy ({ranking} ranking)", greedy.best_recipe,
                           f"{greedy.evaluations} + {greedy.screenings} screenings = {greedy.spent:.2f}",
                           time.perf_counter() - t0)
            for seed in args.seeds if "evolution" in args.methods else []:
                t0 = time.perf_counter()
                evo = make_agent("evolution", env, seed=seed).learn(args.evaluations * n)
                record("evolution", evo.best_recipe, f"{evo.evaluations} + {evo.screenings} screenings = {evo.spent:.2f}",
                       time.perf_counter() - t0, seed)
            env.close()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
