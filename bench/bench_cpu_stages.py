"""The slow stages of ``python -m qenv quantize`` on SmolLM2, each timed alone in one process (issue 26).

A whole cold run on the shared 2-core machine takes longer than a benchmark can wait, and its wall
time says more about the machine's load than about the code. This times, in CPU seconds (and wall),
the stages the user-path benchmark (``bench_user_path.py``) found slow, through APIs that older trees
have too, so that the same script measures a tree before and after a change:

- ``load``: ``load_model(MODEL)`` (the GGUF parse, building the model, dequantizing, the tokenizer);
- ``reference``: the full-precision pass on the calibration tokens (Hessians included);
- ``table``: greedy's per-(layer, rule) output-error table (``rule_errors``) on the packable default
  menu of ``python -m qenv quantize`` for the layers of ``--blocks`` (no disk cache), saved to
  ``--table`` (.npy) so that two trees' tables can be compared bit for bit;
- ``preset``: one evaluation of each ``--presets`` recipe from an empty weight cache (every layer
  quantized, then one pass), with its KL, which must not change between trees.

    python bench/bench_cpu_stages.py --out bench/results/cpu_stages_after.json
    git archive <commit> qenv agents | tar -x -C /tmp/old && mkdir -p /tmp/old/qenv/agents && \\
        cp /tmp/old/agents/*.py /tmp/old/qenv/agents/ && \\
        PYTHONPATH=/tmp/old python bench/bench_cpu_stages.py --out bench/results/cpu_stages_before.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2" / "train.txt"


class Timer:
    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    def __call__(self, name: str):  # noqa: ANN204 - a tiny context manager
        timer = self

        class _Stage:
            def __enter__(self) -> None:
                self.cpu, self.wall = time.process_time(), time.perf_counter()

            def __exit__(self, *exc: Any) -> None:
                timer.stages[name] = {"cpu_s": round(time.process_time() - self.cpu, 2),
                                      "wall_s": round(time.perf_counter() - self.wall, 2)}
                print(f"{name}: {timer.stages[name]['cpu_s']} CPU s, {timer.stages[name]['wall_s']} s wall", flush=True)

        return _Stage()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n-tokens", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--blocks", default="0", help="comma-separated blocks whose layers the table covers (default: 0)")
    p.add_argument("--presets", nargs="*", default=["gptq-w4"])
    p.add_argument("--table", type=Path, help="save the error table here (.npy)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(1)
    import qenv
    from qenv.agents.quantize import packable_menu
    from qenv.envs.task import make_tokens
    from qenv.eval.evaluator import Evaluator
    from qenv.eval.sensitivity import rule_errors
    from qenv.models.loading import load_model
    from qenv.quant.presets import preset

    timer = Timer()
    with timer("load"):
        loaded = load_model(args.model, device="cpu")
    tokens = make_tokens(loaded, [args.data] if args.data else None, args.n_tokens, args.seq_len, 0, False)
    evaluator = Evaluator(loaded, tokens, batch_size=8, cache_dir=False)
    with timer("reference"):
        evaluator.reference  # noqa: B018
    rules, _ = packable_menu(list(loaded.layers))
    blocks = {int(b) for b in args.blocks.split(",")}
    layers = [info for info in loaded.layers if info.block in blocks]
    with timer("table"):
        table = rule_errors(evaluator, layers, rules)
    if args.table:
        np.save(args.table, table)
    kls = {}
    for name in args.presets:
        fresh = Evaluator(loaded, tokens, batch_size=8, cache_dir=False)
        fresh.reference  # noqa: B018
        with timer(f"preset {name}"):
            kls[name] = float(fresh.evaluate(preset(name, loaded.layers)).kl)
    report = {"qenv": str(Path(qenv.__file__).parent), "model": args.model, "n_tokens": args.n_tokens,
              "table_pairs": [len(layers), len(rules)], "blocks": sorted(blocks), "stages": timer.stages,
              "preset_kl": kls, "torch_threads": 1, "cpus": os.cpu_count(),
              "load_average": Path("/proc/loadavg").read_text().split()[:3]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
