#!/usr/bin/env python3
"""Rebuild a shipped transfer policy (``qenv:transfer``) with one command: train one PPO policy on
the allocation action kind over a range of budgets on a zoo of models, write it as a policy zip
plus its card (``<name>.json``, ``<name>.md``) into ``qenv/policies/`` (or ``--out``), and measure
its zero-shot table: one deterministic rollout per model outside the zoo and budget, scored by
``eval_agent.py`` on held-out text against greedy, the best start and the human frontiers at the
policy's own bits per weight.

Training and scoring run the programs users run (``train_agent.py``, ``eval_agent.py``), in child
processes, so the shipped numbers are what those commands print::

    python scripts/train_transfer_policy.py                       # the shipped qenv:transfer
    python scripts/train_transfer_policy.py --models default tiny-llama --timesteps 256 \\
        --eval-models tiny-gpt2 --eval-budgets 3.0 --out /tmp/p   # a quick one

The zoo: ``--models`` (paths, hub ids or built-in names); by default the trained zoo of
``scripts/train_bench_models.py`` when that script can build one (``build_zoo``), else the models
qenv has today: the built-in default (trained on WikiText-2) and the random-weight tiny Llama and
Qwen2. Models the policy is scored on zero-shot (``--eval-models``) must not be in the zoo.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from qenv.errors import QenvError  # noqa: E402

#: the zoo until a trained zoo can be built here: the trained built-in default and two random-weight tiny layouts
DEFAULT_MODELS: tuple[str, ...] = ("default", "tiny-llama", "tiny-qwen2")
#: models outside that zoo the shipped table scores on: a trained llama2.c model and two other layouts
DEFAULT_EVAL_MODELS: tuple[str, ...] = (str(REPO_ROOT.parent / "shared" / "data" / "stories260K" / "stories260K.bin"),
                                        "tiny-gpt2", "tiny-phi3")
DEFAULT_HELD_OUT = REPO_ROOT.parent / "shared" / "data" / "tinystories" / "TinyStories-valid-first1000.txt"


def budget_arg(text: str) -> float | str:
    """An ``--eval-budgets`` value: a number of bits per weight, or a preset's name (eval_agent.py checks it)."""
    try:
        return float(text)
    except ValueError:
        return text


def budget_text(budget: float | str) -> str:
    """A budget as eval_agent.py's ``--budget-bpw`` takes it: ``3``, ``3.5`` or ``gptq-w3``."""
    return f"{budget:g}" if isinstance(budget, float) else str(budget)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="transfer", help="the policy's name: qenv:<name> (default: %(default)s)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "qenv" / "policies",
                   help="folder for <name>.zip/.json/.md (default: qenv/policies, what ships)")
    p.add_argument("--models", nargs="+", metavar="SPEC", help="the zoo to train on (default: see above)")
    p.add_argument("--budget-range", nargs=2, type=float, default=(2.5, 4.5), metavar=("LOW", "HIGH"),
                   help="budgets the training episodes draw from, bits per weight (default: 2.5 4.5)")
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "ppo_allocation.yaml",
                   help="train_agent.py config: agent hyperparameters and env kwargs (default: %(default)s)")
    p.add_argument("--timesteps", type=int, default=8192, help="training timesteps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-tokens", type=int, default=1024, help="calibration tokens per model (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-models", nargs="*", metavar="SPEC",
                   help="models outside the zoo for the zero-shot table (default: stories260K.bin, tiny-gpt2, "
                        "tiny-phi3; none: no table)")
    p.add_argument("--eval-budgets", nargs="+", type=budget_arg, default=(3.0, 4.0), metavar="B",
                   help="budgets of the zero-shot table: bits per weight, or a human preset's name (gptq-w3: "
                        "that preset's exact bpw on each model, as eval_agent.py --budget-bpw takes it)")
    p.add_argument("--eval-searchers", default="greedy,uniform", metavar="LIST",
                   help="searchers each cell compares against (eval_agent.py --searchers; default: %(default)s). "
                        "'none' scores only the policy and the presets: the searchers' rows do not depend on the "
                        "policy, so a second policy on the same cells can take them from the first's table")
    p.add_argument("--eval-data", type=Path, default=DEFAULT_HELD_OUT,
                   help="held-out text the zero-shot table is scored on (default: TinyStories valid)")
    p.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens per model (default: %(default)s)")
    p.add_argument("--rescore", action="store_true",
                   help="keep the policy in --out and measure its zero-shot table again (its card is rewritten)")
    p.add_argument("--workdir", type=Path, help="where the training run and evaluations go (default: a temporary folder)")
    return p


def default_models() -> list[str]:
    """The trained zoo of scripts/train_bench_models.py when it can build one, else :data:`DEFAULT_MODELS`."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import train_bench_models as tbm  # noqa: PLC0415
    except ImportError:
        return list(DEFAULT_MODELS)
    build = getattr(tbm, "build_zoo", None)
    return [str(m) for m in build()] if callable(build) else list(DEFAULT_MODELS)


def git_commit() -> str:
    """The checkout's commit, ``+dirty`` when tracked files differ from it (``unknown`` outside git)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def run_program(argv: list[str]) -> None:
    """Run one of qenv's programs in a child process; its error line is this script's error."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print("+ " + shlex.join(argv), flush=True)
    done = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=env, text=True, capture_output=True)
    sys.stdout.write(done.stdout[-4000:])
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["(no output)"])[-1]
        raise QenvError(f"{Path(argv[0]).name} failed (exit {done.returncode}): {last}", "see its output above.")


def train(args: argparse.Namespace, models: list[str], workdir: Path) -> Path:
    """Train the policy with train_agent.py; returns its run folder."""
    low, high = args.budget_range
    argv = [str(REPO_ROOT / "train_agent.py"), "--agent", "ppo", "--config", str(args.config),
            "--timesteps", str(args.timesteps), "--seed", str(args.seed), "--n-tokens", str(args.n_tokens),
            "--threads", str(args.threads), "--logdir", str(workdir), "--name", "train", "--no-progress",
            "--env-kwargs", f"budget_range=[{low}, {high}]", f"seq_len={args.seq_len}",
            "action_kind=allocation", "observation=relative", f"budget_bpw={(low + high) / 2:g}"]
    for model in models:
        argv += ["--model", model]
    run_program(argv)
    return workdir / "train"


def layer_kinds(models: list[str], observation: str, include_lm_head: bool) -> list[str]:
    """The layer kinds the policy saw on its zoo, as its observation shows them."""
    from qenv.models.loading import load_model
    from qenv.policies import described_kinds

    kinds: set[str] = set()
    for model in models:
        kinds |= {layer.kind for layer in load_model(model, device="cpu", include_lm_head=include_lm_head).layers}
    return sorted(described_kinds(kinds, observation))


def make_card(args: argparse.Namespace, run: Path, models: list[str]) -> dict[str, Any]:
    """The card from what the run folder recorded (its settings, models and fingerprints)."""
    from qenv.cli.runs import env_kwargs_of
    from qenv.envs.features import EPISODE_NAMES, STATIC_NAMES, observation_size
    from qenv.io import read_json

    summary = read_json(run / "summary.json", "Run summary", "rerun the script.")
    settings = summary["settings"]
    keep = ("cache_dir", "device", "weight_cache_gib", "model", "data")
    env_kwargs = {k: v for k, v in env_kwargs_of(settings, f"{run}/summary.json").items() if k not in keep}
    observation = str(env_kwargs.get("observation", "full"))
    hyper = {k: v for k, v in (settings.get("config_section") or {}).items()
             if k not in ("n_timesteps", "env_kwargs", "normalize", "n_envs", "vec_env", "checkpoint_freq")}
    return {
        "card_version": 1, "name": args.name, "agent": str(settings["agent"]),
        "summary": ("One PPO policy on the allocation action kind with the relative observation: per layer, a "
                    "preference that reweights greedy's allocation of the budget, for any budget in "
                    f"{args.budget_range[0]:g}-{args.budget_range[1]:g} bpw. Trained on CPU on the zoo below; its "
                    "zero-shot table says where it wins and where it loses."),
        "trained_on": summary["train_models"], "command": args.command,
        "git_commit": git_commit(), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"agent": settings["agent"], "env_kwargs": env_kwargs, "hyperparams": hyper,
                   "total_timesteps": settings["total_timesteps"], "seed": settings["seed"]},
        "budget_range": [float(b) for b in args.budget_range],
        "observation": {"kind": observation, "size": observation_size(observation),
                        "names": list(STATIC_NAMES + EPISODE_NAMES)},
        "layer_kinds": layer_kinds(models, observation, bool(env_kwargs.get("include_lm_head", False))),
        "training": {"timesteps": summary["timesteps"], "episodes": summary["episodes"],
                     "wall_time_s": summary["wall_time_s"]},
        "zero_shot": None,
    }


def zero_shot(args: argparse.Namespace, policy: Path, workdir: Path) -> dict[str, Any]:
    """One deterministic rollout per model and budget, scored by eval_agent.py on held-out text."""
    from qenv.io import read_json

    rows = []
    for budget in args.eval_budgets:
        out = workdir / f"eval-{budget_text(budget)}"
        argv = [str(REPO_ROOT / "eval_agent.py"), "--policy", str(policy), "--budget-bpw", budget_text(budget),
                "--searchers", args.eval_searchers, "--data", str(args.eval_data), "--n-tokens", str(args.eval_tokens),
                "--threads", str(args.threads), "--out", str(out), "--no-progress"]
        for model in args.eval_models:
            argv += ["--model", model]
        run_program(argv)
        results = read_json(out / "results.json", "eval_agent.py results", "rerun the script.")
        for m in results["models"]:
            policy_row = next(r for r in m["rows"] if r["kind"] == "policy")
            comp = m.get("comparisons") or {}
            rows.append({
                "model": m["model"], "status": m["status"], "n_layers": m["n_layers"], "budget": budget,
                "scored_on": m["tokens"],
                "policy_kl": policy_row["kl"], "policy_bpw": policy_row["bpw"],
                "greedy_kl": (comp.get("greedy") or {}).get("kl"),
                "best_start_kl": (comp.get("best_start") or {}).get("kl"),
                "best_start": (comp.get("best_start") or {}).get("method"),
                "gptq_frontier_kl": (comp.get("frontier:gptq") or {}).get("kl"),
                "awq_frontier_kl": (comp.get("frontier:awq") or {}).get("kl"),
            })

    def wins(key: str) -> str:
        cells = [r for r in rows if isinstance(r.get(key), (int, float))]
        return f"{sum(r[key] > r['policy_kl'] for r in cells)} of {len(cells)}"

    shown = [str(Path(m).name) for m in args.eval_models]
    return {
        "how": (f"One deterministic rollout per model and budget; KL on {args.eval_tokens} held-out tokens of "
                f"{Path(args.eval_data).name} (calibration: tokens sampled from each model; a model without a tokenizer "
                "is scored on its calibration tokens, as the row's scored_on says), by eval_agent.py."),
        "command": "; ".join(f"python eval_agent.py --policy qenv:{args.name} " + " ".join(f"--model {m}" for m in shown)
                             + f" --budget-bpw {budget_text(b)} --searchers {args.eval_searchers} --data {Path(args.eval_data).name} "
                               f"--n-tokens {args.eval_tokens}" for b in args.eval_budgets),
        "rows": rows,
        "verdict": (f"Better than greedy in {wins('greedy_kl')} cells, than the best start in {wins('best_start_kl')}, "
                    f"than the GPTQ frontier at its own bpw in {wins('gptq_frontier_kl')}, than the AWQ frontier in "
                    f"{wins('awq_frontier_kl')}."),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command = shlex.join(["python", "scripts/train_transfer_policy.py",
                               *(sys.argv[1:] if argv is None else [str(a) for a in argv])])
    try:
        from qenv.envs.config import check_env_arguments
        from qenv.policies import write_policy

        check_env_arguments({"budget_range": list(args.budget_range)})
        models = list(args.models) if args.models else default_models()
        args.eval_models = list(DEFAULT_EVAL_MODELS) if args.eval_models is None else list(args.eval_models)
        overlap = sorted(set(models) & set(args.eval_models))
        if overlap:
            raise QenvError(f"--eval-models {', '.join(overlap)} are in the zoo too: a zero-shot table scores models "
                            "the policy never saw.", "leave them out of one of the lists.")
        if args.timesteps < 1:
            raise QenvError(f"--timesteps={args.timesteps} must be at least 1.", "pass a positive number.")
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qenv-transfer-"))
        workdir.mkdir(parents=True, exist_ok=True)
        if args.rescore:  # the zero-shot table of the policy already in --out, measured again
            from qenv.policies import check_card_matches_zip, write_card

            policy = args.out / f"{args.name}.zip"
            card = check_card_matches_zip(policy)
            trained = {str(m.get("spec")) for m in card["trained_on"]}
            if trained & set(args.eval_models):
                raise QenvError(f"--eval-models {', '.join(sorted(trained & set(args.eval_models)))} are in the "
                                "policy's zoo.", "score it on models it never saw.")
            card["zero_shot"] = zero_shot(args, policy, workdir)
            write_card(card, args.out)
            print(card["zero_shot"]["verdict"])
            return 0
        run = train(args, models, workdir)
        card = make_card(args, run, models)
        policy = write_policy(run / "model.zip", card, args.out)
        print(f"wrote {policy} and its card {policy.with_suffix('.json')}, {policy.with_suffix('.md')}")
        if args.eval_models:
            card["zero_shot"] = zero_shot(args, policy, workdir)
            write_policy(run / "model.zip", card, args.out)
            print(card["zero_shot"]["verdict"])
    except QenvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
