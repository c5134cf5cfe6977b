#!/usr/bin/env python3
"""How fast the ``gguf`` menu builds: (layer, rule) pairs per second at 1 thread and at N threads.

Every pair of the env's ``menu="gguf"`` (llama.cpp's types, with and without the importance matrix)
is quantized up front by ``QuantizedWeights.prebuild``, as ``prebuild=True`` does: llama.cpp's
``ggml_quantize_chunk`` through ctypes (which releases the GIL), a thread per matrix. The threaded
build is checked to hold the serial build's bytes, pair by pair.

    python bench/bench_gguf_menu.py --models stories260K default --threads 1 2
    python bench/bench_gguf_menu.py --models smollm2-135m --threads 1 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data"
SPECS = {"stories260K": str(DATA / "stories260K" / "stories260K.bin"), "default": "default",
         "smollm2-135m": "smollm2-135m"}


def run_model(name: str, threads: list[int], n_tokens: int, seq_len: int) -> dict:
    import torch

    from qenv.envs.spaces import GGUF_MENU
    from qenv.eval.evaluator import Evaluator
    from qenv.eval.tokens import tokens_from_text
    from qenv.models.loading import load_model
    from qenv.quant.apply import QuantizedWeights

    lm = load_model(SPECS.get(name, name), device="cpu")
    tokens = tokens_from_text(lm.tokenizer, str(DATA / "wikitext-2" / "test.txt"), n_tokens=n_tokens, seq_len=seq_len)
    ev = Evaluator(lm, tokens, batch_size=4, cache_dir=False)
    ev.reference  # noqa: B018  (the importance matrices; not timed)
    rules = list(GGUF_MENU)
    rows, first = [], None
    for n in threads:
        weights = QuantizedWeights(ev.model, ev.layers, ev.calibration_of, ev.weights.recipe_bytes() * len(rules))
        start = time.perf_counter()
        pairs = weights.prebuild(rules, threads=n)
        seconds = time.perf_counter() - start
        if first is None:
            first = weights
        identical = all(torch.equal(t, weights._cache[k]) for k, t in first._cache.items())
        rows.append({"threads": n, "pairs": pairs, "seconds": round(seconds, 2),
                     "pairs_per_s": round(pairs / seconds, 1), "identical_to_first": identical})
        print(f"{name}: {pairs} pairs, {n} thread(s): {seconds:.1f} s, {pairs / seconds:.1f} pairs/s, "
              f"bit-identical to the {threads[0]}-thread build: {identical}", flush=True)
        if weights is not first:
            del weights
    return {"model": name, "layers": len(ev.layers), "rules": len(rules), "runs": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["stories260K", "default"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--n-tokens", type=int, default=256, help="calibration tokens of the importance matrices")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)  # the threads measured are the build's own
    results = [run_model(m, args.threads, args.n_tokens, args.seq_len) for m in args.models]
    print("\n| model | pairs | threads | s | pairs/s | speed-up |\n|---|---:|---:|---:|---:|---:|")
    for r in results:
        base = r["runs"][0]["pairs_per_s"]
        for row in r["runs"]:
            print(f"| {r['model']} | {row['pairs']} | {row['threads']} | {row['seconds']} | {row['pairs_per_s']} | "
                  f"{row['pairs_per_s'] / base:.2f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
