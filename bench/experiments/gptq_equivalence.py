#!/usr/bin/env python3
"""Batched GPTQ (``quantize_matrices``, one column loop per shape) against the per-layer GPTQ it
replaced (the oracle kept in ``tests/test_prebuild.py``), on a real model's layers, on any device.

The CPU tests check this on stories260K and one SmolLM2 block; this script checks it where the
batched kernels differ (a GPU: batched matmuls may round differently) and times both paths::

    python bench/experiments/gptq_equivalence.py --model smollm2-135m --device cuda --blocks 30 --n-tokens 1024
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--blocks", type=int, default=2, help="compare the layers of the first N blocks")
    p.add_argument("--n-tokens", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)

    import torch

    from qenv.eval.evaluator import Evaluator
    from qenv.envs.task import make_tokens
    from qenv.models.layers import get_weight
    from qenv.models.loading import load_model
    from qenv.quant.quantizer import quantize_matrices
    from test_prebuild import GPTQ_RULES, _old_quantize_matrix

    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    tokens = make_tokens(lm, None, args.n_tokens, args.seq_len, 0, cache_dir=False)
    ev = Evaluator(lm, tokens, batch_size=8, cache_dir=False)
    infos = [i for i in lm.layers if i.block < args.blocks]
    weights = [get_weight(lm.model, i) for i in infos]
    calibs = [ev.calibration_of(i.name) for i in infos]
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    rows = []
    for rule in GPTQ_RULES:
        sync()
        t0 = time.perf_counter()
        batched = quantize_matrices(weights, rule, calibs)
        sync()
        t_batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        old = [_old_quantize_matrix(w, rule, c) for w, c in zip(weights, calibs)]
        sync()
        t_old = time.perf_counter() - t0
        rel = max(float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12) for a, b in zip(batched, old))
        differ = sum(int((a != b).sum()) for a, b in zip(batched, old))
        total = sum(b.numel() for b in old)
        # GPTQ's own objective, the calibration-weighted output error tr((W-Q) H (W-Q)^T), per layer:
        # rounding ties that flip on float noise move single weights by a step but not this
        objective = []
        for w, c, a, b in zip(weights, calibs, batched, old):
            h = c.hessian.to(w.device).float()
            da, db = (w.float() - a.float()), (w.float() - b.float())
            ea, eb = float(((da @ h) * da).sum()), float(((db @ h) * db).sum())
            objective.append(abs(ea - eb) / max(eb, 1e-30))
        row = {"rule": rule.label(), "layers": len(infos), "batched_s": t_batched, "per_layer_s": t_old,
               "max_rel_diff": rel, "differing_weights": differ, "weights": total,
               "objective_max_rel_diff": max(objective), "objective_mean_rel_diff": sum(objective) / len(objective)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"model": args.model, "device": str(lm.device), "dtype": args.dtype, "rows": rows,
              "gpu": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else None}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
