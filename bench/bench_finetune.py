#!/usr/bin/env python
"""Fine-tuning a zoo policy on unseen models: zero-shot rollout vs fine-tuned rollout vs searchers.

    python bench/bench_finetune.py run --zoo runs/zoo3_plan/model.zip --models M ... --budgets 3.0 4.0 \
        --episodes 16 64 --seeds 0 --out bench/results/finetune_cpu.json
    python bench/bench_finetune.py report --out bench/results/finetune_cpu.json    # one row per run
    python bench/bench_finetune.py summary --out bench/results/finetune_cpu.json   # seeds averaged

For every (model, budget, episodes E, seed) it runs the two programs a user would run:

1. ``train_agent.py --init-from ZOO --model M --budget-bpw B --timesteps E*L --seed S`` (L the
   model's layer count; on-policy agents round up to whole rollouts, so the run may play a few
   more episodes than E: the number it played is recorded and given to the searchers);
2. ``eval_agent.py --policy ZOO --model M --budget-bpw B --search-evals N --seed S
   --searchers greedy,random,evolution`` with N the episodes the fine-tuning played: the zero-shot
   rollout, greedy, random search and evolution with the same number of evaluations, and every
   human preset (the best one at or under the budget is kept, with its bpw);
3. ``eval_agent.py --policy <fine-tuned run>/model.zip --model M --budget-bpw B --searchers none``:
   the fine-tuned deterministic rollout, reported by eval_agent as a "fine-tuned model".

Every recipe is scored by eval_agent on the same calibration tokens. Results are appended to the
JSON after every cell (a rerun skips cells already there), so a run cut short keeps what it did.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def short(spec: str) -> str:
    return Path(spec).stem if spec.endswith(".bin") or "/" in spec else spec


def run(cmd: list[str], log: Path) -> None:
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited with {proc.returncode} (log: {log}). Fix: read the log.")
    print(f"  {time.perf_counter() - t0:6.1f} s  {' '.join(cmd[1:4])} ...", flush=True)


def pick(rows: list[dict[str, Any]], method: str) -> dict[str, Any] | None:
    for r in rows:
        if r["method"] == method:
            return {"kl": r["kl"], "bpw": r["bpw"], "over_budget": r["over_budget"], "note": r.get("note", "")}
    return None


def policy_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    r = next(r for r in rows if r["kind"] == "policy")
    return {"kl": r["kl"], "bpw": r["bpw"], "over_budget": r["over_budget"], "note": r.get("note", "")}


def cell(args: argparse.Namespace, spec: str, budget: float, episodes: int, seed: int, work: Path) -> dict[str, Any]:
    py = sys.executable
    name = f"ft_{short(spec)}_b{budget:g}_e{episodes}_s{seed}"
    layers = args.layers[spec]
    t0 = time.perf_counter()
    run([py, "train_agent.py", "--init-from", args.zoo, "--agent", args.agent, "--model", spec,
         "--budget-bpw", f"{budget:g}", "--timesteps", str(episodes * layers), "--seed", str(seed),
         "--logdir", str(work / "runs"), "--name", name, "--overwrite", "--no-progress"], work / f"{name}.train.log")
    train_s = time.perf_counter() - t0
    summary = json.loads((work / "runs" / name / "summary.json").read_text())
    played = int(summary["episodes"])
    zs_out, ft_out = work / f"{name}.zeroshot", work / f"{name}.finetuned"
    run([py, "eval_agent.py", "--policy", args.zoo, "--model", spec, "--budget-bpw", f"{budget:g}",
         "--search-evals", str(played), "--searchers", "greedy,random,evolution", "--seed", str(seed),
         "--out", str(zs_out), "--overwrite"], work / f"{name}.zeroshot.log")  # a rerun replaces its evaluation
    run([py, "eval_agent.py", "--policy", str(work / "runs" / name / "model.zip"), "--model", spec,
         "--budget-bpw", f"{budget:g}", "--searchers", "none", "--seed", str(seed), "--out", str(ft_out), "--overwrite"],
        work / f"{name}.finetuned.log")
    zs = json.loads((zs_out / "results.json").read_text())["models"][0]
    ft = json.loads((ft_out / "results.json").read_text())["models"][0]
    assert zs["status"] == "zero-shot" and ft["status"] == "fine-tuned", (zs["status"], ft["status"])
    best = summary.get("best") or {}
    gain = zs["gain"] or {}
    return {
        "model": zs["model"], "spec": spec, "n_layers": zs["n_layers"], "budget_bpw": budget, "seed": seed,
        "episodes_asked": episodes, "episodes_played": played, "timesteps": summary["timesteps"],
        "finetune_wall_s": round(train_s, 1), "tokens": zs["tokens"],
        "zero_shot": policy_row(zs["rows"]), "fine_tuned": policy_row(ft["rows"]),
        "fine_tune_best_episode": {"kl": best.get("metrics", {}).get("kl"), "bpw": best.get("metrics", {}).get("bpw"),
                                   "episode": best.get("episode"),
                                   "reward": best.get("reward")},
        "episode_reward_first": summary.get("episode_reward_first"),
        "episode_reward_last": summary.get("episode_reward_last"),
        "greedy": pick(zs["rows"], "greedy"), "random": pick(zs["rows"], "random"),
        "evolution": pick(zs["rows"], "evolution"),
        "best_preset": {"method": gain.get("best_preset"), "kl": gain.get("preset_kl"), "bpw": gain.get("preset_bpw")},
        "status_zero_shot": zs["status"], "status_fine_tuned": ft["status"],
    }


def key(c: dict[str, Any]) -> tuple:
    return (c["spec"], c["budget_bpw"], c["episodes_asked"], c["seed"])


def cmd_run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {"cells": []}
    data.update({"zoo": args.zoo, "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                           capture_output=True, text=True).stdout.strip(),
                 "machine": args.machine, "command": " ".join(sys.argv)})
    done = {key(c) for c in data["cells"]}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.layers = {}
    for spec in args.models:  # the layer count, from a zero-evaluation look at the model
        from qenv.models.loading import load_model

        args.layers[spec] = len(load_model(spec).layers)
    deadline = time.time() + args.deadline_s if args.deadline_s else math.inf
    for seed in args.seeds:
        for budget in args.budgets:
            for episodes in args.episodes:
                for spec in args.models:
                    if (spec, budget, episodes, seed) in done:
                        continue
                    if time.time() > deadline:
                        print("deadline reached: stopping", flush=True)
                        return
                    print(f"{short(spec)} {budget:g} bpw, {episodes} episodes, seed {seed}", flush=True)
                    data["cells"].append(cell(args, spec, budget, episodes, seed, work))
                    tmp = out.with_suffix(".tmp")
                    tmp.write_text(json.dumps(data, indent=1))
                    os.replace(tmp, out)


def g(x: float) -> str:
    return f"{x:.4g}"


def cmd_report(args: argparse.Namespace) -> None:
    data = json.loads(Path(args.out).read_text())
    if not getattr(args, "quiet", False):
        for model in sorted({c["model"] for c in data["cells"]}):  # the tallies of each model alone
            sub = argparse.Namespace(out=args.out, quiet=True, only=model)
            print(f"{model}: ", end="")
            cmd_report(sub)
    only = getattr(args, "only", None)
    data["cells"] = [c for c in data["cells"] if only is None or c["model"] == only]
    lines = ["| model (layers) | budget | seed | episodes played | zero-shot rollout | fine-tuned rollout | "
             "fine-tune best episode | greedy | random (same evals) | evolution (same evals) | "
             "best preset at or under the budget | fine-tuned vs zero-shot | fine-tuned vs greedy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tally = {"ft<zs": 0, "ft=zs": 0, "ft>zs": 0, "ft<greedy": 0, "ft=greedy": 0, "ft>greedy": 0,
             "ft<random": 0, "ft<evolution": 0, "ft<preset": 0, "best<random": 0, "best<evolution": 0,
             "best<greedy": 0, "n": 0}
    for c in sorted(data["cells"], key=lambda c: (c["seed"], c["budget_bpw"], c["episodes_asked"], c["model"])):
        zs, ft, bst = c["zero_shot"], c["fine_tuned"], c["fine_tune_best_episode"]
        gr, rn, ev, pr = c["greedy"], c["random"], c["evolution"], c["best_preset"]

        def vs(a: float, b: float) -> str:
            if math.isclose(a, b, rel_tol=1e-6):
                return "same"
            return f"**better** ({b / a:.2f}x)" if a < b else f"worse ({b / a:.2f}x)"

        tally["n"] += 1
        for name, other in (("zs", zs["kl"]), ("greedy", gr["kl"])):
            s = vs(ft["kl"], other)
            tally["ft=" + name if s == "same" else ("ft<" if s.startswith("**") else "ft>") + name] += 1
        tally["ft<random"] += ft["kl"] < rn["kl"]
        tally["ft<evolution"] += ft["kl"] < ev["kl"]
        tally["ft<preset"] += pr["kl"] is not None and ft["kl"] < pr["kl"]
        tally["best<random"] += bst["kl"] < rn["kl"]
        tally["best<evolution"] += bst["kl"] < ev["kl"]
        tally["best<greedy"] += bst["kl"] < gr["kl"]
        preset = f"{pr['method']}: {g(pr['kl'])} ({pr['bpw']:.3f})" if pr["kl"] is not None else "none fits"
        lines.append(f"| {c['model']} ({c['n_layers']}) | {c['budget_bpw']:g} | {c['seed']} | {c['episodes_played']} | "
                     f"{g(zs['kl'])} ({zs['bpw']:.3f}) | {g(ft['kl'])} ({ft['bpw']:.3f}) | "
                     f"{g(bst['kl'])} ({bst['bpw']:.3f}) | {g(gr['kl'])} ({gr['bpw']:.3f}) | "
                     f"{g(rn['kl'])} ({rn['bpw']:.3f}) | {g(ev['kl'])} ({ev['bpw']:.3f}) | {preset} | "
                     f"{vs(ft['kl'], zs['kl'])} | {vs(ft['kl'], gr['kl'])} |")
    if not getattr(args, "quiet", False):
        print("\n".join(lines) + "\n")
    n = tally["n"]
    print(("" if getattr(args, "quiet", False) else "all models: ") + f"fine-tuned rollout vs zero-shot: better {tally['ft<zs']}, same {tally['ft=zs']}, worse {tally['ft>zs']} of {n}; "
          f"vs greedy: better {tally['ft<greedy']}, same {tally['ft=greedy']}, worse {tally['ft>greedy']}; "
          f"below random {tally['ft<random']}/{n}, below evolution {tally['ft<evolution']}/{n}, "
          f"below the best preset {tally['ft<preset']}/{n}; fine-tune best episode below greedy "
          f"{tally['best<greedy']}/{n}, random {tally['best<random']}/{n}, evolution {tally['best<evolution']}/{n}")


def cmd_summary(args: argparse.Namespace) -> None:
    """One row per (model, budget, episodes): the seeds' mean (± std) of each seeded method."""
    import statistics

    data = json.loads(Path(args.out).read_text())
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in data["cells"]:
        groups.setdefault((c["budget_bpw"], c["episodes_asked"], c["model"]), []).append(c)

    def ms(xs: list[float]) -> str:
        return g(xs[0]) if len(xs) == 1 else f"{g(statistics.mean(xs))} ± {statistics.stdev(xs):.2g}"

    print("| model (layers) | budget | episodes played | seeds | zero-shot rollout | fine-tuned rollout | "
          "fine-tune best episode | greedy | random (same evals) | evolution (same evals) | "
          "best preset at or under the budget (bpw) | fine-tuned vs zero-shot, per seed (better/same/worse) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (budget, episodes, model), cs in sorted(groups.items()):
        cs.sort(key=lambda c: c["seed"])
        c0 = cs[0]
        ft = [c["fine_tuned"]["kl"] for c in cs]
        zs = c0["zero_shot"]["kl"]
        better = sum(x < zs and not math.isclose(x, zs, rel_tol=1e-6) for x in ft)
        same = sum(math.isclose(x, zs, rel_tol=1e-6) for x in ft)
        pr = c0["best_preset"]
        played = sorted({c["episodes_played"] for c in cs})
        print(f"| {model} ({c0['n_layers']}) | {budget:g} | {'/'.join(map(str, played))} | "
              f"{','.join(str(c['seed']) for c in cs)} | {g(zs)} | {ms(ft)} | "
              f"{ms([c['fine_tune_best_episode']['kl'] for c in cs])} | {g(c0['greedy']['kl'])} | "
              f"{ms([c['random']['kl'] for c in cs])} | {ms([c['evolution']['kl'] for c in cs])} | "
              f"{pr['method']}: {g(pr['kl'])} ({pr['bpw']:.3f}) | {better}/{same}/{len(cs) - better - same} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--zoo", required=True, help="the zoo policy's model.zip, or a shipped one (qenv:transfer)")
    r.add_argument("--agent", default="maskable_ppo", help="the policy's agent (qenv:transfer: ppo)")
    r.add_argument("--models", nargs="+", required=True)
    r.add_argument("--budgets", nargs="+", type=float, default=[3.0, 4.0])
    r.add_argument("--episodes", nargs="+", type=int, default=[16, 64])
    r.add_argument("--seeds", nargs="+", type=int, default=[0])
    r.add_argument("--work", default="/tmp/bench_finetune", help="run folders and eval outputs")
    r.add_argument("--machine", default="CPU", help="recorded in the JSON")
    r.add_argument("--deadline-s", type=float, default=0, help="start no new cell after this many seconds")
    r.add_argument("--out", required=True)
    rep = sub.add_parser("report")
    rep.add_argument("--out", required=True)
    summ = sub.add_parser("summary", help="one row per (model, budget, episodes), seeds averaged")
    summ.add_argument("--out", required=True)
    args = p.parse_args()
    {"run": cmd_run, "report": cmd_report, "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    main()
