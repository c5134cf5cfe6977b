#!/usr/bin/env python3
"""The learned rule (issue 24 item 7) against GPTQ at GPTQ's exact size: cost, uniform and searched.

    PYTHONPATH=. python bench/learned_rule.py [--models stories260K default] [--presets gptq-w3 gptq-w4] \\
        [--evaluations 32] [--seeds 0] [--out results.json]

For each model:

- ``cost``: seconds to quantize every layer under ``w<b>g128a-gptq`` and ``w<b>g128a-learned``
  (one thread, the layer's calibration Hessian given; the median over the layers and the total);
- for each preset (``gptq-w3``, ``gptq-w4``), at its exact bpw on that model: the preset (uniform
  GPTQ), the uniform learned rule of the same bits (the same bpw, asserted), each also with MSE
  clipping and after AWQ's activation scale (GPTQ and learned), and greedy and evolution
  (``--evaluations`` full evaluations each, ``--seeds``) searching the default menu and the
  ``learned`` menu (the default menu plus the learned rules at 2, 3 and 4 bits).

Calibration and held-out text as ``bench/search_equal_size.py``: the first ``--n-tokens`` tokens of
the training text (wikitext-2 train for the built-in default model; TinyStories for stories260K,
held out from ``--held-offset`` on). Every KL comes from the project's evaluator; the held-out
evaluator shares the quantized weights, so every rule is calibrated on the calibration tokens only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def corpus(model: str) -> tuple[str, str, str, int]:
    """(model spec, calibration text, held-out text, held-out token offset; -1: ``--held-offset``)."""
    if model == "stories260K":
        stories = str(DATA / "tinystories" / "TinyStories-valid-first1000.txt")
        return str(DATA / "stories260K" / "stories260K.bin"), stories, stories, -1
    return model, str(DATA / "wikitext-2" / "train.txt"), str(DATA / "wikitext-2" / "test.txt"), 0


def main() -> int:
    import torch

    from qenv.agents import make_agent
    from qenv.envs.quant_llm import QuantLLMEnv
    from qenv.eval.evaluator import Evaluator
    from qenv.eval.tokens import tokens_from_text
    from qenv.models.layers import get_weight
    from qenv.models.loading import load_model
    from qenv.quant.accounting import bits_per_weight
    from qenv.quant.presets import preset, uniform
    from qenv.quant.quantizer import quantize_matrix
    from qenv.quant.rules import Rule

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["stories260K", "default"])
    p.add_argument("--presets", nargs="+", default=["gptq-w3", "gptq-w4"])
    p.add_argument("--evaluations", type=int, default=32, help="budget of greedy and evolution (full evaluations)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="evolution's seeds")
    p.add_argument("--n-tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--held-offset", type=int, default=16384, help="stories260K: held-out tokens start here")
    p.add_argument("--methods", nargs="+", default=["cost", "uniform", "greedy", "evolution"])
    p.add_argument("--menus", nargs="+", default=["default", "learned"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    for model in args.models:
        spec, calib_text, held_text, offset = corpus(model)
        loaded = load_model(spec, device="cpu")
        held_tokens = tokens_from_text(loaded.tokenizer, [held_text], args.n_tokens, args.seq_len,
                                       offset_tokens=args.held_offset if offset < 0 else offset)
        for name in args.presets:
            base = preset(name, loaded.layers)
            budget = bits_per_weight(loaded.layers, base)
            bits = next(iter(base.values())).bits
            envs = {menu: QuantLLMEnv(spec, budget_bpw=budget, data=calib_text, n_tokens=args.n_tokens,
                                      seq_len=args.seq_len, batch_size=args.batch_size, device="cpu", menu=menu)
                    for menu in args.menus}
            task = envs[args.menus[0]].task
            held = Evaluator(task.loaded, held_tokens, batch_size=args.batch_size, cache_dir=task.evaluator.cache_dir)
            held.weights = task.evaluator.weights  # calibrated on the calibration tokens only

            def record(method: str, menu: str, recipe, evaluations: object, seconds: float,
                       seed: int | None = None) -> None:
                cal = task.evaluator.evaluate(recipe)
                out = held.evaluate(recipe)
                emit({"model": model, "preset": name, "budget_bpw": budget, "method": method, "menu": menu,
                      "seed": seed, "bpw": cal.bpw, "calib_kl": cal.kl, "held_kl": out.kl, "held_ppl": out.ppl,
                      "evaluations": evaluations, "seconds": round(seconds, 1)})

            gptq, learned = Rule(bits=bits, rounding="gptq"), Rule(bits=bits, rounding="learned")
            if "cost" in args.methods:
                for rule in (gptq, learned):
                    times = []
                    for info in task.layers:
                        calib = task.evaluator.calibration_of(info.name)
                        w = get_weight(task.loaded.model, info).float()
                        t0 = time.perf_counter()
                        quantize_matrix(w, rule, calib)
                        times.append(time.perf_counter() - t0)
                    emit({"model": model, "method": "cost", "rule": rule.label(), "layers": len(times),
                          "median_s": round(statistics.median(times), 4), "total_s": round(sum(times), 3)})
            if "uniform" in args.methods:
                record(name, "-", base, 1, 0.0)
                for knobs in ({}, {"mse_clip": True}, {"act_scale": 0.5}):  # plain, MSE clip, AWQ's scale first
                    for rule in (Rule(bits=bits, rounding="gptq", **knobs), Rule(bits=bits, rounding="learned", **knobs)):
                        mine = uniform(task.layers, rule)
                        assert bits_per_weight(task.layers, mine) == budget, "the learned rule must cost GPTQ's bits"
                        if rule.rounding == "learned" or knobs:
                            record(f"uniform {rule.label()}", "-", mine, 1, 0.0)
            n = len(task.layers)
            for menu, env in envs.items():
                if "greedy" in args.methods:
                    t0 = time.perf_counter()
                    greedy = make_agent("greedy", env, seed=0)
                    greedy.learn(args.evaluations * n)
                    record("greedy", menu, greedy.best_recipe, f"{greedy.spent:.2f}", time.perf_counter() - t0)
                for seed in args.seeds if "evolution" in args.methods else []:
                    t0 = time.perf_counter()
                    evo = make_agent("evolution", env, seed=seed).learn(args.evaluations * n)
                    record("evolution", menu, evo.best_recipe, f"{evo.spent:.2f}", time.perf_counter() - t0, seed)
            for env in envs.values():
                env.close()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
