#!/usr/bin/env python3
"""llama.cpp's real mixes against recipes searched on the ``gguf`` menu, at equal bits per weight.

Everything is quantized by llama.cpp's own code (GGUF rules: ``ggml_quantize_chunk`` of the
installed llama-cpp-python), scored by qenv's one evaluator as llama.cpp's CPU backend computes
(8-bit activations), and charged at llama.cpp's bytes after its row-length fallback.

For each model:

1. every llama.cpp mix (``llama-quantize`` Q2_K ... Q6_K, IQ2_XS ... IQ4_XS; ``-im``: with the
   importance matrix from the calibration tokens) is scored;
2. for each mix named in ``--at`` the ``greedy`` and ``evolution`` searchers (``--evals`` full
   evaluations) search a recipe on ``menu="gguf"`` with that mix's own bpw as the budget, so the
   searched recipe is never larger than the mix it is compared with.

Writes ``<out>.json`` and prints markdown tables (the ones in BENCHMARKS.md).

    python bench/bench_gguf.py --models stories260K default --out bench/results/gguf_cpu
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


def run_model(name: str, args: argparse.Namespace, progress=None) -> dict:
    """One model's mixes, uniform rules and searches. ``progress(result)`` is called with the result
    so far (``"partial": True``) after each stage, so a run stopped by a time limit keeps what it
    measured."""
    import torch

    from qenv.agents.registry import make_agent
    from qenv.envs.quant_llm import QuantLLMEnv
    from qenv.quant.accounting import fallbacks
    from qenv.quant.presets import LLAMACPP_PRESETS, preset

    torch.set_num_threads(1)
    spec = SPECS.get(name, name)
    t0 = time.perf_counter()
    base = dict(model=spec, menu="gguf", n_tokens=args.n_tokens, seq_len=args.seq_len, batch_size=8, seed=0,
                weight_cache_gib=args.weight_cache_gib, device=args.device)
    probe = QuantLLMEnv(budget_bpw=16.0, **base)
    task = probe.task
    ev = task.evaluator
    mixes, uniforms, searched = {}, {}, {}

    def result(partial: bool) -> dict:
        shapes = sorted({(i.out_features, i.in_features) for i in task.layers})
        return {"model": task.name, "n_layers": len(task.layers), "shapes": shapes, "tokens": args.n_tokens,
                "seq_len": args.seq_len, "fp_ppl": ev.full_precision_ppl, "mixes": mixes, "uniform": uniforms,
                "searched": searched, "wall_s": time.perf_counter() - t0, "partial": partial}

    for mix in (LLAMACPP_PRESETS if args.mixes is None else args.mixes):
        recipe = preset(mix, task.layers)
        m = ev.evaluate(recipe)
        mixes[mix] = {"bpw": m.bpw, "kl": m.kl, "ppl": m.ppl, "top1": m.top1,
                      "fallback_layers": len(fallbacks(task.layers, recipe))}
        print(f"{name} {mix:12s} {m.bpw:7.3f} bpw  KL {m.kl:.4g}", flush=True)
    if progress:
        progress(result(True))
    for label in args.uniform:  # uniform rules: GGUF types by name, or qenv presets (rtn-w4-g32, ...)
        from qenv.quant.presets import uniform
        from qenv.quant.rules import Rule

        recipe = (uniform(task.layers, Rule(gguf=label)) if label.upper() == label else preset(label, task.layers))
        m = ev.evaluate(recipe)
        uniforms[label] = {"bpw": m.bpw, "kl": m.kl, "ppl": m.ppl, "top1": m.top1}
        print(f"{name} uniform {label:10s} {m.bpw:7.3f} bpw  KL {m.kl:.4g}", flush=True)
    for mix in args.at:
        budget = mixes[mix]["bpw"]
        env = QuantLLMEnv(budget_bpw=budget, **base)
        row = {}
        for agent_name in ("greedy", "evolution"):
            t1 = time.perf_counter()
            agent = make_agent(agent_name, env, seed=0)
            recipe, info = agent.search(env, total_timesteps=args.evals * len(task.layers))
            m = ev.evaluate(recipe)
            row[agent_name] = {"bpw": m.bpw, "kl": m.kl, "ppl": m.ppl, "top1": m.top1,
                               "evaluations": getattr(agent, "evaluations", None),
                               "wall_s": time.perf_counter() - t1}
            print(f"{name} at {mix} ({budget:.3f} bpw): {agent_name} {m.bpw:.3f} bpw KL {m.kl:.4g}", flush=True)
        searched[mix] = row
        if progress:
            progress(result(True))
    return result(False)


def tables(results: list[dict]) -> str:
    out = []
    for r in results:
        cut = " **cut short by a time limit: the searches below are the ones that finished**" if r.get("partial") else ""
        out.append(f"\n**{r['model']}** ({r['n_layers']} layers, row lengths "
                   f"{sorted({s[1] for s in r['shapes']})}; {r['tokens']} calibration tokens sampled from the model, "
                   f"fp ppl {r['fp_ppl']:.3g}){cut}\n")
        out.append("| llama.cpp mix | bpw | KL | ppl | top-1 | layers on a fallback type |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for mix, m in sorted(r["mixes"].items(), key=lambda kv: (kv[1]["bpw"], kv[0])):
            out.append(f"| {mix} | {m['bpw']:.3f} | {m['kl']:.4g} | {m['ppl']:.4g} | {m['top1']:.3f} | "
                       f"{m['fallback_layers']} |")
        if r.get("uniform"):
            out.append("\n| uniform rule | bpw | KL |")
            out.append("|---|---:|---:|")
            for label, m in r["uniform"].items():
                out.append(f"| {label} | {m['bpw']:.3f} | {m['kl']:.4g} |")
        if r["searched"]:
            out.append("\n| at the bpw of | mix KL | same mix with imatrix, KL | greedy (bpw, KL) | "
                       "evolution (bpw, KL, evals) |")
            out.append("|---|---:|---:|---:|---:|")
            for mix, row in r["searched"].items():
                g, e = row["greedy"], row["evolution"]
                base = mix.removesuffix("-im")
                im = r["mixes"].get(base + "-im")
                im_text = "-" if im is None or base + "-im" == mix else f"{im['kl']:.4g}"
                out.append(f"| {mix} @ {r['mixes'][mix]['bpw']:.3f} | {r['mixes'][mix]['kl']:.4g} | {im_text} | "
                           f"{g['bpw']:.3f}, {g['kl']:.4g} | {e['bpw']:.3f}, {e['kl']:.4g}, {e['evaluations']} |")
    return "\n".join(out) + "\n"


def report(path: str) -> None:
    """Rewrite ``<path>.md`` from ``<path>.json`` (tables only, nothing re-run)."""
    results = json.loads(Path(path + ".json").read_text())["results"]
    Path(path + ".md").write_text(tables(results))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["stories260K", "default"])
    p.add_argument("--at", nargs="*", default=["q3_k_m", "q4_k_m", "iq3_xxs-im"],
                   help="mixes whose bpw is a search budget")
    p.add_argument("--mixes", nargs="*", default=None, help="llama.cpp mixes to score (default: all)")
    p.add_argument("--uniform", nargs="*", default=[],
                   help="uniform rules to score too: llama.cpp types (Q4_1) or presets (rtn-w4-g32)")
    p.add_argument("--evals", type=int, default=16)
    p.add_argument("--n-tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--weight-cache-gib", type=float, default=2.0)
    p.add_argument("--device", default="cpu",
                   help="where the model runs (cpu, cuda); llama.cpp's quantization runs on the CPU either way")
    p.add_argument("--out", default="bench/results/gguf_cpu")
    p.add_argument("--report", action="store_true", help="only rewrite <out>.md from <out>.json")
    args = p.parse_args()
    if args.report:
        report(args.out)
        print(Path(args.out + ".md").read_text())
        return 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []

    def save(partial: dict | None = None) -> None:  # written after every stage: a time limit keeps the rest
        done = results + ([partial] if partial else [])
        tmp = Path(args.out + ".json.tmp")
        tmp.write_text(json.dumps({"argv": sys.argv, "results": done}, indent=1))
        tmp.replace(args.out + ".json")

    for name in args.models:
        results.append(run_model(name, args, progress=save))
        save()
    text = tables(results)
    Path(args.out + ".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
