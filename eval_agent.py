#!/usr/bin/env python
"""Evaluate a trained policy against human-designed presets and searchers at the same budget.

    python eval_agent.py --policy runs/<run>/model.zip [--model SPEC ...] [--budget-bpw B] [--data held-out.txt]

For each model, the policy picks a recipe deterministically; the human presets of --presets (by
default rtn/gptq/awq at the bit widths bracketing the budget and the policy's own bpw, llama.cpp's
real mixes, with and without the importance matrix and quantized by llama.cpp itself, nearest those
sizes and within 1 bpw of them, and fp16; ``--presets all``: every mix; preset scores are cached on
disk per model, tokens, recipe and settings) and every searcher (uniform,
llamacpp, greedy, random, evolution, with the same evaluation budget) gives one too. All are
scored by the same evaluator on the same tokens (held-out text with --data, else the
calibration tokens) and printed as one table per model, sorted by bits per weight, with rows
over the budget marked '*'. The summary leads with comparisons at the policy's own size: greedy,
the best start (the best of greedy, the best uniform menu rule and the rtn/gptq/awq presets at or
under the budget) and each human family's frontier interpolated at the policy's own bits per
weight, saying "policy worse" where it is; the best preset at or under the budget (usually smaller)
follows for reference and is never called a win. --budget-bpw takes a preset's name (gptq-w4): its
exact bpw on each model. Every rule is calibrated on --calib-data, else the run's own calibration
source; the table header says which, and held-out --data is refused as calibration. Models the policy was not trained on are reported as
"unseen model" (zero-shot); models a policy was fine-tuned on (a run started with ``train_agent.py
--init-from``) as "fine-tuned model", and the summary lists the two groups separately; the models
of the run it started from are "trained-on", never zero-shot.

Writes results.json, results.csv and pareto.png (KL vs bpw of every method) into --out, a new or
empty folder (default: <run folder>/eval-<date>-<time>, numbered -2, -3, ... when taken; never the
run folder itself); --export adds the policy's recipe per model as
JSON, llama.cpp --tensor-type overrides (llamacpp-quantize.sh), the quantized model as model.gguf
(recipes of GGUF rules, e.g. from menu=gguf: exactly the scored model) and a GPTQModel dynamic
config (recipes GPTQModel runs as measured); skipped.txt says why one was not written; --save-model writes the
quantized model (dequantized weights, safetensors) that transformers loads back.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from qenv.cli.common import (ArgumentParser, bpw_scope, check_agents_checkout, check_observation_matches,
                             check_weight_cache_gib, fmt, merge_flag, normalizer_path, parse_key_values, plain_table,
                             quiet_libraries, refuse_repeated_models, run_cli, run_folder_of, table_legend)
from qenv.cli.presets import FAMILIES, family_of, parse_presets, select_presets
from qenv.errors import QenvError
from qenv.io import read_json

SEARCHERS: tuple[str, ...] = ("uniform", "llamacpp", "greedy", "random", "evolution")
DEFAULT_SEARCH_EVALS = 16
_TOL = 1e-9

EXAMPLES = """\
examples:
  python eval_agent.py --policy runs/ppo-20250101-120000/model.zip
  python eval_agent.py --policy runs/x/model.zip --data ../shared/data/wikitext-2/test.txt
  python eval_agent.py --policy runs/x/model.zip --model default --model tiny-llama --budget-bpw 2.5
  python eval_agent.py --policy runs/x/model.zip --budget-bpw gptq-w4 \
      --calib-data ../shared/data/wikitext-2/train.txt --data ../shared/data/wikitext-2/test.txt
  python eval_agent.py --policy runs/x/model.zip --export --save-model quantized/

Errors print one line, 'error: <problem> Fix: <fix>', and exit with status 2.
"""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="eval_agent.py", description=__doc__.split("\n\n")[0], epilog=EXAMPLES)
    p.add_argument("--policy", required=True, metavar="PATH",
                   help="the trained agent: runs/<run>/model.zip (or a searcher's model.json), or a policy "
                        "shipped with qenv: qenv:transfer")
    p.add_argument("--agent", help="agent name or package.module:Class that saved --policy (default: the run's, "
                                   "from summary.json / config.json beside it, else ppo)")
    p.add_argument("--model", action="append", metavar="SPEC",
                   help="model(s) to evaluate on, as train_agent.py's --model: 'default', smollm2-135m, a .gguf "
                        "file, a llama2.c .bin, a transformers folder or hub id, tiny-<arch>; repeatable (default: "
                        "the models the policy was trained on)")
    p.add_argument("--budget-bpw", metavar="BPW|PRESET",
                   help="bits-per-weight budget, or a human preset's name (gptq-w4, awq-w3, q4_k_m-im, ...): that "
                        "preset's exact bpw on each model (default: the run's)")
    p.add_argument("--data", nargs="+", action="extend", metavar="FILE",
                   help="held-out text file(s) to score every recipe on (default: the calibration tokens); never "
                        "the calibration text")
    p.add_argument("--calib-data", nargs="+", action="extend", metavar="FILE",
                   help="calibration text file(s) every rule is calibrated on (default: the run's own calibration "
                        "source: its text when it trained on text, else tokens sampled from each model)")
    p.add_argument("--n-tokens", type=int, metavar="N",
                   help="tokens scored (and calibration tokens of new envs) (default: the run's, else 2048)")
    p.add_argument("--search-evals", type=int, default=DEFAULT_SEARCH_EVALS, metavar="N",
                   help="evaluation budget of each searcher, in full evaluations: one recipe scored on all the "
                        "tokens, the cost of one RL episode; uniform, greedy and llamacpp may need fewer, evolution "
                        "spends part on cheap screenings (the table's note says what each spent) (default: %(default)s)")
    p.add_argument("--presets", default="default", metavar="LIST",
                   help="comma-separated human baselines: 'default' (each family's presets bracketing the budget "
                        "and the policy's bpw, llama.cpp's mixes within 1 bpw of them, fp16), 'all' (every family's "
                        "bracketing widths and every llama.cpp mix), 'none', a family (rtn, gptq, awq: its bracketing "
                        "widths; llama.cpp, llama.cpp+imatrix: every mix), or preset names (rtn-w4, gptq-w3-g64, "
                        "q4_k_m, q4_k_m-im, fp16, ...). Scores are cached per model, tokens and recipe "
                        "(default: %(default)s)")
    p.add_argument("--searchers", default=",".join(SEARCHERS), metavar="LIST",
                   help="comma-separated searchers to compare, or 'none' (default: %(default)s)")
    p.add_argument("--env-kwargs", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override environment arguments of the run (YAML values), e.g. seq_len=64")
    p.add_argument("--out", metavar="DIR", help="output folder, new or empty (default: <policy's folder>/eval-<date>-"
                                                "<time>, numbered -2, -3, ... when taken)")
    p.add_argument("--export", action="store_true",
                   help="also write the policy's recipe per model as JSON, llama.cpp --tensor-type overrides, "
                        "model.gguf (GGUF rules) and a GPTQModel dynamic config (into <out>/export/<model>/)")
    p.add_argument("--save-model", metavar="DIR",
                   help="write the policy-quantized model(s) with save_pretrained (safetensors, dequantized weights, "
                        "recipe in config.qenv_recipe, tokenizer); with several models, one subfolder each. The "
                        "fake-quant fallback: full-size float weights, no quantization_config; python -m qenv "
                        "quantize writes the packed checkpoint (or .gguf) a runtime loads")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier evaluation in --out (its results.json, results.csv, pareto.png, export/; "
                        "nothing else) and a model saved by --save-model; any other non-empty folder is refused")
    p.add_argument("--seed", type=int, default=0, help="seed of the searchers (default: %(default)s)")
    p.add_argument("--weight-cache-gib", type=float, metavar="GIB",
                   help="memory for quantized weights cached per (layer, rule), at most the free memory (default: "
                        "4 recipes of this model's quantized layers; the whole menu when prebuilt)")
    p.add_argument("--device", metavar="DEV", help="device of the models: cpu, cuda, cuda:N, auto (default: auto)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress (by default: bars on a terminal; in a log, one line per stage or tenth)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads (default: %(default)s; small models run fastest on one)")
    return p


# -- the run the policy came from -------------------------------------------------------------------------
#: how many runs back a chain of --init-from is followed (each run read once: a cycle ends too)
MAX_INIT_FROM_DEPTH = 64


def read_run(policy: Path, _seen: frozenset[Path] = frozenset()) -> dict[str, Any]:
    """What the run folder of ``policy`` says: agent, env kwargs, training models (may be empty).

    A checkpoint is read with its run's settings (the folder above ``checkpoints/``), so it is
    scored on the model it was trained on, not the built-in default. The agent is the file's word
    as it stands (see :func:`qenv.agents.registry.agent_named_by_file` for what is accepted)."""
    found = run_folder_of(policy)
    run: dict[str, Any] = {"folder": found or policy.parent, "summary": None, "config": None, "found": found}
    for key, name in (("summary", "summary.json"), ("config", "config.json")):
        path = run["folder"] / name
        if path.is_file():
            run[key] = read_json(path, "Run file", "pass --agent and --model explicitly, or fix the file.")
            if not isinstance(run[key], dict):
                raise QenvError(f"Run file {path} is not a JSON object.",
                                "pass --agent and --model explicitly, or fix the file.")
    summary = run["summary"] or {}
    settings = summary.get("settings") or run["config"] or {}
    if not isinstance(settings, dict):
        raise QenvError(f"Run file {run['folder'] / 'summary.json'} holds settings that are not a JSON object.",
                        "pass --agent and --model explicitly, or fix the file.")
    run["agent"] = summary.get("agent") or settings.get("agent")
    run["agent_source"] = run["folder"] / ("summary.json" if summary.get("agent") else "config.json")
    models = summary.get("train_models") or []
    if not isinstance(settings.get("env_kwargs") or {}, dict) or not isinstance(models, list) or \
            not all(isinstance(m, dict) and isinstance(m.get("spec"), str) for m in models):
        raise QenvError(f"Run files of {run['folder']} hold env_kwargs or train_models of the wrong shape (edited by "
                        "hand, or not written by train_agent.py).",
                        "pass --agent and --model explicitly, or fix the files.")
    from qenv.cli.runs import env_kwargs_of

    # either layout of config.json (env_kwargs, or this version's env), checked as any settings are
    run["env_kwargs"] = env_kwargs_of(settings, f"Run files of {run['folder']}") if settings else {}
    run["train_models"] = list(models)
    run["init_from"] = summary.get("init_from") or settings.get("init_from")
    run["budget_preset"] = summary.get("budget_preset") or settings.get("budget_preset")
    if not run["train_models"] and run["env_kwargs"]:
        model = run["env_kwargs"].get("model", "default")
        run["train_models"] = [{"spec": str(m)} for m in (model if isinstance(model, list) else [model])]
    # a fine-tuned policy also saw the models of the run it started from: those are not zero-shot
    run["pretrain_models"] = []
    seen = _seen | {run["folder"].resolve()}
    start = Path(str(run["init_from"])) if run["init_from"] else None
    if start is not None and start.is_file() and run_folder_of(start) is None and start.suffix == ".zip" and \
            start.with_suffix(".json").is_file():  # fine-tuned from a shipped policy: its card names its zoo
        from qenv.policies import read_card

        run["pretrain_models"] = run_from_card(start, read_card(start))["train_models"]
    elif start is not None and start.is_file() and len(seen) < MAX_INIT_FROM_DEPTH:
        before_folder = run_folder_of(start)
        # a chain that comes back to a run already read (A; B from A; A --overwrite from B) ends there
        if before_folder is not None and before_folder.resolve() not in seen:
            before = read_run(start, seen)
            run["pretrain_models"] = before["train_models"] + before["pretrain_models"]
    return run


def run_from_card(policy: Path, card: dict[str, Any]) -> dict[str, Any]:
    """What a policy's card says, in :func:`read_run`'s shape: a shipped policy (``qenv:transfer``)
    or a zip written with a card beside it has no run folder; its card names the agent, the env
    settings and the models it was trained on (with their fingerprints, for "zero-shot")."""
    config = card.get("config") or {}
    env_kwargs = config.get("env_kwargs") or {}
    if not isinstance(env_kwargs, dict):
        raise QenvError(f"The card of {policy} holds env_kwargs that are not a mapping.",
                        "rebuild the policy with scripts/train_transfer_policy.py.")
    models = [m for m in card["trained_on"] if isinstance(m, dict) and isinstance(m.get("spec"), str)]
    return {"folder": policy.parent, "found": None, "summary": None, "config": None, "card": card,
            "agent": card["agent"], "agent_source": policy.with_suffix(".json"), "env_kwargs": dict(env_kwargs),
            "train_models": models, "init_from": None, "budget_preset": None, "pretrain_models": []}


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


# -- one model ------------------------------------------------------------------------------------------
def frontier_at(rows: list[dict[str, Any]], family: str, bpw: float) -> dict[str, Any] | None:
    """``family``'s KL interpolated (log-linearly) at ``bpw`` between its rows that bracket it, else ``None``.

    The lower envelope of the family's points is used, so a dominated mix never props the frontier up.
    """
    points = sorted((r["bpw"], r["kl"], r["method"]) for r in rows
                    if r["kind"] == "preset" and family_of(r["method"]) == family and r["kl"] > 0)
    front: list[tuple[float, float, str]] = []
    for point in points:  # keep points that no cheaper point beats
        if not front or point[1] < min(p[1] for p in front):
            front.append(point)
    below = [p for p in front if p[0] <= bpw + _TOL]
    above = [p for p in front if p[0] >= bpw - _TOL]
    if not below or not above:
        return None
    lo, hi = below[-1], above[0]
    t = 0.0 if hi[0] == lo[0] else (bpw - lo[0]) / (hi[0] - lo[0])
    kl = math.exp((1 - t) * math.log(lo[1]) + t * math.log(hi[1]))
    return {"kl": kl, "between": f"{lo[2]} @ {lo[0]:.3f} and {hi[2]} @ {hi[0]:.3f}"}


def scoring_evaluator(task: Any, data: list[str] | None, n_tokens: int, seq_len: int, batch_size: int) -> tuple[Any, str]:
    """The evaluator every row of a model is scored with, and a description of its tokens.

    Held-out text gets its own reference (logits of the full-precision model on it) but shares
    the environment's quantized weights: rules are calibrated on the calibration tokens, as the
    policy and the searchers saw them, and only scored on the held-out text.
    """
    from qenv.eval.evaluator import Evaluator
    from qenv.eval.reference import check_reference_fits
    from qenv.eval.tokens import tokens_from_text

    ev = task.evaluator
    if not data:
        return ev, f"calibration tokens ({ev.tokens.n_tokens}, {ev.tokens.source})"
    if task.loaded.tokenizer is None:
        return ev, f"calibration tokens ({ev.tokens.n_tokens}; {task.name} has no tokenizer for the held-out text)"
    from qenv.eval.reference import reference_bytes
    from qenv.memory import fit_batch_size, forward_bytes_per_sequence
    from qenv.progress import note

    # a GPU shared with other processes: wait for the held-out reference's memory, then shrink the batch
    batch_size = fit_batch_size(batch_size, reference_bytes(task.loaded.model, task.layers, n_tokens // seq_len, seq_len),
                                forward_bytes_per_sequence(task.loaded.model, seq_len), task.loaded.device,
                                what="the held-out evaluation", note=note)
    check_reference_fits(task.loaded.model, task.layers, n_tokens // seq_len, seq_len, ev.cache_dir)  # before reading
    tokens = tokens_from_text(task.loaded.tokenizer, data, n_tokens, seq_len)
    ev.weights.restore()
    held = Evaluator(task.loaded, tokens, batch_size=batch_size, cache_dir=ev.cache_dir)
    held.weights = ev.weights  # one quantizer, one cache: calibrated on the calibration tokens
    return held, f"held-out text ({tokens.n_tokens} tokens of {', '.join(Path(d).name for d in data)})"


def short_agent_name(agent: str) -> str:
    """The agent's name for a table: ``ppo``, or the class name of a plug-in given as ``path/file.py:Class``
    or ``package.module:Class`` (the whole path would swamp the method column)."""
    return agent.rpartition(":")[2] or agent


def evaluations_note(evaluations: int | None, screenings: int = 0) -> str:
    """What a searcher spent: full evaluations (one recipe scored on every token, the cost of one RL
    episode) and, for the evolution, cheap screenings on the first token batch."""
    if evaluations is None:
        return ""
    note = f"{evaluations} evaluation{'s' if evaluations != 1 else ''}"
    if screenings:
        note += f" + {screenings} screening{'s' if screenings != 1 else ''}"
    return note


#: the kind of a searcher's row whose recipe is over the budget: listed apart, not as a searcher's result
MISSED_BUDGET = "missed budget"


def row(method: str, kind: str, metrics: Any, wall: float, budget: float, note: str = "") -> dict[str, Any]:
    return {"method": method, "kind": kind, "bpw": metrics.bpw, "model_mb": metrics.model_mb, "kl": metrics.kl,
            "ppl": metrics.ppl, "top1": metrics.top1, "wall_s": wall, "over_budget": metrics.bpw > budget + _TOL,
            "note": note}


def evaluate_model(spec: str, args: Any, run: dict[str, Any], agent_name: str, budget_spec: float | str,
                   env_kwargs: dict[str, Any], searchers: list[str], out: Path) -> dict[str, Any]:
    from qenv.agents.base import rollout_recipe
    from qenv.agents.registry import load_agent, make_agent
    from qenv.cli.envs import as_menu_kind, make_quant_env
    from qenv.quant.presets import preset, resolve_budget

    from qenv.models.loading import load_model

    notes: list[str] = []
    from qenv.progress import progress_bar, stage

    with stage(f"loading model {spec}"):
        loaded = load_model(spec, device=env_kwargs.get("device"), dtype=env_kwargs.get("dtype"),
                            include_lm_head=bool(env_kwargs.get("include_lm_head", False)))
    if run.get("card") is not None:  # a shipped policy: refuse a model whose layers it cannot describe
        from qenv.policies import check_describes

        check_describes(run["card"], loaded.layers, spec, str(getattr(args, "policy_name", args.policy)))
    budget, budget_preset = resolve_budget(budget_spec, loaded.layers)  # a preset's own size on this model
    kwargs = {**env_kwargs, "budget_bpw": budget}
    if kwargs.get("data") and loaded.tokenizer is None:
        kwargs.pop("data")  # the run calibrated on text, which this model cannot read
        notes.append(f"{loaded.name} has no tokenizer: calibrated on tokens sampled from it, not on the run's text")
    from qenv.cli.runs import NON_CONFIG_KWARGS
    from qenv.envs.config import EnvConfig

    # this model's one config: the run's settings, the flags and the budget (its defaults in one place)
    config = EnvConfig.from_kwargs(**{k: v for k, v in kwargs.items() if k not in NON_CONFIG_KWARGS}, model=loaded)
    env = make_quant_env(config=config)
    inner = env.unwrapped
    task = inner.task
    n_tokens = int(args.n_tokens or config.n_tokens)
    scorer, tokens_desc = scoring_evaluator(task, args.data, n_tokens, config.seq_len, config.batch_size)
    calib = task.evaluator.tokens
    calib_desc = (f"{calib.n_tokens} tokens sampled from the model ({calib.source})" if calib.source.startswith("sampled")
                  else f"{calib.n_tokens} tokens of {calib.source}")
    def trained_on(models: list[dict[str, Any]]) -> bool:
        """Seen follows the weights (their fingerprint), not the file: a .gguf of a model trained on as
        a .bin is seen. Only a run that recorded no fingerprints is matched by its spec."""
        prints = [m.get("fingerprint") for m in models if isinstance(m.get("fingerprint"), str) and m.get("fingerprint")]
        return any(task.loaded.is_model(p) for p in prints) if prints else spec in {str(m.get("spec")) for m in models}

    seen = trained_on(run["train_models"])
    status = ("fine-tuned" if run.get("init_from") else "trained-on") if seen else \
        ("trained-on" if trained_on(run.get("pretrain_models") or []) else "zero-shot")
    seen = status != "zero-shot"

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    agent = load_agent(agent_name, args.policy, env=env)
    stats = normalizer_path(Path(args.policy))
    if stats.is_file():  # trained behind VecNormalize (`normalize` in its config): act on scaled observations
        from qenv.agents.sb3 import NormalizedAgent

        agent = NormalizedAgent(agent, read_json(stats, "Normalisation statistics", "delete it or retrain."), stats)
    recipe, info = rollout_recipe(agent, env, deterministic=True)
    if args.save_model and any(rule.gguf is not None for rule in recipe.values()):
        raise QenvError(f"The policy's recipe on {task.name} uses llama.cpp types, which qenv scores as llama.cpp runs "
                        "them: --save-model would write dequantized weights that are not the model measured.",
                        "drop --save-model and use --export, which writes model.gguf.")
    policy_metrics = scorer.evaluate(recipe)
    policy_row = row(f"policy ({short_agent_name(agent_name)})", "policy", policy_metrics, time.perf_counter() - t0, budget,
                     f"{info.get('clamped_actions', 0)} actions lowered by the budget"
                     if info.get("clamped_actions") else "")
    rows.append(policy_row)
    from qenv.eval.preset_cache import cached_metrics

    names = select_presets(args.presets, task.evaluator, budget, policy_metrics.bpw)
    bar = progress_bar(len(names), f"scoring {len(names)} presets", "preset")
    for name in names:
        t0 = time.perf_counter()
        metrics, hit = cached_metrics(scorer, preset(name, task.layers))
        rows.append(row(name, "preset", metrics, time.perf_counter() - t0, budget, "cached" if hit else ""))
        bar.update(1)
    bar.close()
    search_env = env
    if inner.mapper.stateful:  # searchers replay rules, which these kinds' actions do not name: same task, menu kind
        search_env = make_quant_env(model=loaded, **as_menu_kind(kwargs))
    for name in searchers:
        t0 = time.perf_counter()
        searcher = make_agent(name, search_env, seed=args.seed)
        s_recipe, s_info = searcher.search(search_env, total_timesteps=args.search_evals * len(task.layers),
                                           progress_bar=not args.no_progress)
        metrics = scorer.evaluate(s_recipe)
        note = evaluations_note(getattr(searcher, "evaluations", None), getattr(searcher, "screenings", 0))
        if s_info.get("mix"):
            note += f", {s_info['mix']}"
        kind = "searcher"
        if metrics.bpw > budget + _TOL:  # e.g. llamacpp when no llama.cpp mix fits: its nearest is no result here
            kind = MISSED_BUDGET
            note = f"did not meet the {budget:g} bpw budget ({metrics.bpw:.3f} bpw), " + note
        rows.append(row(name, kind, metrics, time.perf_counter() - t0, budget, note.strip(", ")))
    rows.sort(key=lambda r: (r["bpw"], r["kind"] != "policy", r["method"]))

    comparisons = own_size_comparisons(rows, policy_row)
    fair = [r for r in rows if r["kind"] == "preset" and not r["over_budget"]]
    gain = None
    if fair:
        best = min(fair, key=lambda r: (r["kl"], r["bpw"]))
        ratio = best["kl"] / policy_row["kl"] if policy_row["kl"] > 0 else float("inf")
        gain = {"best_preset": best["method"], "preset_kl": best["kl"], "preset_ppl": best["ppl"],
                "preset_bpw": best["bpw"], "policy_kl": policy_row["kl"], "policy_ppl": policy_row["ppl"],
                "policy_bpw": policy_row["bpw"], "kl_ratio": ratio, "ppl_diff": policy_row["ppl"] - best["ppl"]}
    # equal-size comparison: every human family's frontier at the policy's own bits per weight
    frontiers = {}
    for family in FAMILIES:
        point = frontier_at(rows, family, policy_row["bpw"])
        if point is not None:
            point["kl_ratio"] = point["kl"] / policy_row["kl"] if policy_row["kl"] > 0 else float("inf")
        frontiers[family] = point
    if gain is not None:
        gain["frontiers_at_policy_bpw"] = frontiers
    result = {"model": task.name, "spec": spec, "seen": seen, "status": status, "fingerprint": task.loaded.fingerprint,
              "n_layers": len(task.layers), "tokens": tokens_desc, "calibration": calib_desc, "budget_bpw": budget,
              "budget_preset": budget_preset, "rows": rows, "gain": gain, "comparisons": comparisons,
              "policy_recipe": recipe.to_dict(), "policy_over_budget": policy_row["over_budget"], "notes": notes,
              "reference": task.loaded.reference_label, "bpw_counts": bpw_scope(task.layers)}

    if args.export:
        from qenv.export import export_all

        folder = out / "export" / safe_name(task.name)
        paths = export_all(folder, task.layers, recipe,
                           {"model": task.name, "budget_bpw": budget, "agent": agent_name,
                            "policy": str(args.policy), "metrics": policy_metrics.to_dict(), "tokens": tokens_desc},
                           evaluator=task.evaluator)
        result["export"] = str(folder)
        if "skipped" in paths:
            notes.extend(line for line in paths["skipped"].read_text().splitlines() if line)
        if "gguf_check" in paths:
            notes.append(paths["gguf_check"].read_text().strip())
    if args.save_model:
        from qenv.export import save_quantized_model

        target = Path(args.save_model) if len(args.models) == 1 else Path(args.save_model) / safe_name(task.name)
        save_quantized_model(task.evaluator, recipe, target, {"budget_bpw": budget, "agent": agent_name,
                                                               "metrics": policy_metrics.to_dict(),
                                                               "tokens": tokens_desc}, overwrite=args.overwrite)
        result["saved_model"] = str(target)
    env.close()
    return result


def verdict_of(ratio: float) -> str:
    """``other KL / policy KL`` in words: above 1 the policy is better, below 1 it is worse."""
    return "policy better" if ratio > 1 else "policy worse" if ratio < 1 else "equal"


#: rows a search may start from (issue 24): greedy's plan, the best uniform menu rule, the menu's human presets
START_SEARCHERS: tuple[str, ...] = ("greedy", "uniform")
START_FAMILIES: tuple[str, ...] = ("rtn", "gptq", "awq")


def own_size_comparisons(rows: list[dict[str, Any]], policy_row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The comparisons that lead the summary, all at the policy's own size or the budget it met.

    ``greedy``: the greedy searcher's recipe at the budget; ``best_start``: the best of what a
    search starts from (greedy, the best uniform menu rule, every rtn/gptq/awq preset at or under the
    budget); ``frontier:<family>``: each human family interpolated at the policy's own bpw. Each
    gets ``kl_ratio`` = its KL / the policy's and a verdict; "policy worse" when the policy's KL is
    higher. The best preset at or under the budget is not here: it is usually smaller, so it is
    printed for reference only and never called a win.
    """
    kl = policy_row["kl"]

    def entry(what: str, other_kl: float, **extra: Any) -> dict[str, Any]:
        ratio = other_kl / kl if kl > 0 else float("inf") if other_kl > 0 else 1.0
        return {"what": what, "kl": other_kl, "kl_ratio": ratio, "verdict": verdict_of(ratio), **extra}

    out: dict[str, dict[str, Any]] = {}
    greedy = next((r for r in rows if r["kind"] == "searcher" and r["method"] == "greedy"), None)
    if greedy is not None:
        out["greedy"] = entry("greedy", greedy["kl"], bpw=greedy["bpw"])
    starts = [r for r in rows if not r["over_budget"] and (
        (r["kind"] == "searcher" and r["method"] in START_SEARCHERS)
        or (r["kind"] == "preset" and family_of(r["method"]) in START_FAMILIES))]
    if starts:
        best = min(starts, key=lambda r: (r["kl"], r["bpw"]))
        out["best_start"] = entry(f"the best start ({best['method']} @ {best['bpw']:.3f} bpw)", best["kl"],
                                  method=best["method"], bpw=best["bpw"])
    for family in FAMILIES:
        point = frontier_at(rows, family, policy_row["bpw"])
        if point is not None:
            out[f"frontier:{family}"] = entry(f"the {family} frontier", point["kl"], between=point["between"])
    return out


# -- output ---------------------------------------------------------------------------------------------
def print_model(result: dict[str, Any]) -> None:
    from qenv.quant.presets import budget_label

    budget = result["budget_bpw"]
    status = {"zero-shot": "unseen model", "fine-tuned": "fine-tuned model",
              "trained-on": "trained-on model"}[result.get("status") or ("trained-on" if result["seen"] else "zero-shot")]
    print(f"\n{result['model']} ({status}), budget {budget_label(budget, result.get('budget_preset'))}, scored on "
          f"{result['tokens']}, calibrated on {result.get('calibration', 'the calibration tokens')}")
    if result.get("reference") and result["reference"] != "the full-precision model":
        print(f"  reference: {result['reference']}, not a full-precision model: every KL below measures "
              "re-quantizing it")
    table = [[("* " if r["over_budget"] else "  ") + r["method"], r["kind"], f"{r['bpw']:.3f}", f"{r['model_mb']:.4f}",
              fmt(r["kl"]), fmt(r["ppl"]), f"{r['top1']:.3f}", f"{r['wall_s']:.2f}", r["note"]]
             for r in result["rows"] if r["kind"] != MISSED_BUDGET]
    print(plain_table(["method", "kind", "bpw", "MB", "KL", "ppl", "top1", "wall s", "note"], table,
                      align="llrrrrrrl"))
    print(f"  (* over the {budget:g} bpw budget)")
    if result.get("bpw_counts"):
        print(table_legend(result.get("reference"), result["bpw_counts"]))
    for r in result["rows"]:  # listed apart: what a searcher returned over the budget is no result at it
        if r["kind"] == MISSED_BUDGET:
            print(f"  not a result at {budget:g} bpw: the {r['method']} searcher did not meet the budget; it returned "
                  f"{r['bpw']:.3f} bpw (KL {fmt(r['kl'])}, ppl {fmt(r['ppl'])}, top1 {r['top1']:.3f}; {r['note']})")
    gain = result["gain"]
    prefix = {"zero-shot": "unseen model", "fine-tuned": "fine-tuned model", "trained-on": "trained-on model"}[
        result.get("status") or ("trained-on" if result["seen"] else "zero-shot")]
    over = " (policy over budget!)" if result["policy_over_budget"] else ""
    policy_row = next((r for r in result["rows"] if r["kind"] == "policy"), None)
    comparisons = result.get("comparisons") or {}
    if policy_row is not None:
        # the lead: comparisons at the policy's own size (greedy, the best start, each family's frontier)
        parts = [f"{c['what']} KL {fmt(c['kl'])} ({c['kl_ratio']:.3g}x, {c['verdict']})"
                 for key, c in comparisons.items() if key in ("greedy", "best_start")]
        worse = [c["what"] for c in comparisons.values() if c["verdict"] == "policy worse"]
        overall = (f"policy worse than {', '.join(worse)}" if worse else
                   "policy better than all of them" if comparisons else "nothing to compare with at its size")
        print(f"{prefix} {result['model']}: policy KL {fmt(policy_row['kl'])} at its own {policy_row['bpw']:.3f} bpw"
              + (" vs " + "; ".join(parts) if parts else "") + f": {overall} (KL ratio other/policy){over}")
        fronts = []
        for family in FAMILIES:
            c = comparisons.get(f"frontier:{family}")
            fronts.append(f"{family} n/a (no bracketing presets)" if c is None else
                          f"{family} KL {fmt(c['kl'])} ({c['kl_ratio']:.3g}x, {c['verdict']}; {c['between']})")
        print(f"  at the policy's own {policy_row['bpw']:.3f} bpw, each human family's frontier (KL ratio "
              f"frontier/policy): " + "; ".join(fronts))
    if gain is None:
        print(f"  for reference: no preset fits the {budget:g} bpw budget")
    else:
        size = ("same size" if abs(gain["preset_bpw"] - gain["policy_bpw"]) < 1e-3 else
                f"not the same size: the preset has {gain['policy_bpw'] - gain['preset_bpw']:.3f} bpw less"
                if gain["preset_bpw"] < gain["policy_bpw"] else
                f"not the same size: the preset has {gain['preset_bpw'] - gain['policy_bpw']:.3f} bpw more")
        # secondary, and never a win: a preset under the budget is usually smaller than the policy
        print(f"  for reference (not an equal-size comparison): the best preset at or under {budget:g} bpw "
              f"({gain['best_preset']} @ {gain['preset_bpw']:.3f} bpw, {size}): KL {fmt(gain['policy_kl'])} vs "
              f"{fmt(gain['preset_kl'])}, KL ratio preset/policy {gain['kl_ratio']:.3g}x; ppl "
              f"{fmt(gain['policy_ppl'])} vs {fmt(gain['preset_ppl'])} ({gain['ppl_diff']:+.4g})")
    for note in result.get("notes", []):
        print(f"note: {note}")


def rollup(results: list[dict[str, Any]]) -> str:
    """One line over several models, led by the comparisons at the policy's own size: on how many the
    policy is worse than greedy, the best start, each family's frontier; each model's worst ratio."""
    n = len(results)
    counts = []
    for key, what in (("greedy", "greedy"), ("best_start", "the best start"), *(
            (f"frontier:{f}", f"the {f} frontier") for f in FAMILIES)):
        had = [r for r in results if key in r["comparisons"]]
        if had:
            worse = sum(r["comparisons"][key]["verdict"] == "policy worse" for r in had)
            counts.append(f"worse than {what} on {worse} of {len(had)}")
    better = sum(all(c["verdict"] == "policy better" for c in r["comparisons"].values()) for r in results)
    worst = []
    for r in results:
        c = min(r["comparisons"].values(), key=lambda c: c["kl_ratio"])
        worst.append(f"{r['model']} {c['kl_ratio']:.3g}x vs {c['what']} ({c['verdict']})")
    return (f"at the policy's own size, policy better than every comparison on {better} of {n} model(s); "
            + "; ".join(counts) + ". Worst ratio per model: " + ", ".join(worst))


def write_csv(path: Path, results: list[dict[str, Any]]) -> None:
    from qenv.io import write_text_atomic

    buf = io.StringIO()
    cols = ["model", "seen", "method", "kind", "bpw", "model_mb", "kl", "ppl", "top1", "wall_s", "over_budget", "note"]
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    for result in results:
        for r in result["rows"]:
            writer.writerow({"model": result["model"], "seen": result["seen"], **{k: r[k] for k in cols[2:]}})
    write_text_atomic(path, buf.getvalue())


def pareto_plot(path: Path, results: list[dict[str, Any]]) -> None:
    from matplotlib.figure import Figure

    from qenv.training.plots import place_labels, save_figure

    n = len(results)
    fig = Figure(figsize=(6.4 * min(n, 3), 4.6 * ((n + 2) // 3)), dpi=100)
    styles = {"policy": ("*", "tab:red", 180), "preset": ("o", "tab:blue", 40), "searcher": ("^", "tab:green", 50),
              MISSED_BUDGET: ("X", "tab:gray", 40)}
    axes_labels = []
    for k, result in enumerate(results):
        ax = fig.add_subplot((n + 2) // 3, min(n, 3), k + 1)
        labels = []
        for kind, (marker, color, size) in styles.items():
            pts = [r for r in result["rows"] if r["kind"] == kind and r["kl"] > 0]
            if pts:
                ax.scatter([r["bpw"] for r in pts], [r["kl"] for r in pts], marker=marker, color=color, s=size,
                           label=kind, zorder=3 if kind == "policy" else 2, edgecolor="black", linewidth=0.4)
            labels += [(r["bpw"], r["kl"], r["method"], "black") for r in pts]
        axes_labels.append((ax, labels))
        ax.axvline(result["budget_bpw"], color="gray", linestyle="--", linewidth=1,
                   label=f"budget {result['budget_bpw']:g}")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight")
        ax.set_ylabel("KL (fp || quantized)")
        tag = "" if result["seen"] else " (unseen)"
        ax.set_title(f"{result['model']}{tag}", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("KL vs bits per weight (fp16 has KL 0 and is not drawn)", fontsize=9)
    fig.tight_layout()
    for ax, labels in axes_labels:  # once the layout is final: labels avoid each other, the legend and the edges
        place_labels(ax, labels, fontsize=6)
    save_figure(fig, path)


# -- entry points ---------------------------------------------------------------------------------------
def saved_algorithm(policy: Path) -> str | None:
    """The agent name an SB3 zip was saved by (``None`` for other files or when it cannot tell)."""
    if policy.suffix != ".zip":
        return None
    from qenv.agents.sb3 import agent_name_of_zip

    try:
        return agent_name_of_zip(policy)
    except QenvError:
        return None  # the loader reports a damaged file with its own message


#: settings a policy's run folder does not choose here: where qenv writes its cache and where models run
#: belong to this machine and its user ($QENV_CACHE_DIR, --device), not to a folder someone copied
MACHINE_SETTINGS: tuple[str, ...] = ("cache_dir", "device")


def untrusted_run_settings(env_kwargs: dict[str, Any], given: dict[str, Any], folder: Path) -> list[str]:
    """Drop from the run's ``env_kwargs`` what a run folder must not decide, and say so (notes).

    ``cache_dir`` and ``device`` are removed (the user's ``--env-kwargs``/``--device``/``$QENV_CACHE_DIR``
    decide). The run's calibration text (``data``) is kept only where it is a file here, and named:
    a run copied from another machine points at files that are not here, and is then calibrated on
    tokens sampled from the model instead."""
    notes = []
    dropped = {key: env_kwargs.pop(key) for key in MACHINE_SETTINGS if key in env_kwargs}
    dropped = {k: v for k, v in dropped.items() if k not in given and v not in (None, "auto")}
    if dropped:
        notes.append(f"ignoring {', '.join(f'{k}={v}' for k, v in dropped.items())} from the run folder {folder} "
                     "(a run folder does not choose where qenv writes or runs; --env-kwargs cache_dir=..., "
                     "$QENV_CACHE_DIR and --device do)")
    data = env_kwargs.get("data")
    if data is not None and "data" not in given:
        paths = [d if isinstance(d, str) else repr(d) for d in (data if isinstance(data, list) else [data])]
        missing = [d for d in paths if not Path(d).is_file()]
        if missing:
            env_kwargs.pop("data")
            notes.append(f"the run's calibration text {missing[0]} is not a file here: calibrating on tokens sampled "
                         "from the model instead (--env-kwargs data=FILE calibrates on text)")
        else:
            notes.append(f"calibrating on the run's text {', '.join(paths)} (--env-kwargs data=FILE picks other text)")
    return notes


def check_outputs(args: Any, out: Path, run_folder: Path) -> None:
    """Every output path, before any model is loaded: a bad one would otherwise fail after the
    whole evaluation (the same checker as train_agent.py's --logdir). Neither output may be, or
    hold, the run folder of the policy (``run_folder``): the training run would be replaced; nor
    may ``--out`` be any run folder of train_agent.py (its pareto.png would be replaced)."""
    from qenv.cli.common import is_run_folder
    from qenv.export import SAVE_MODEL_TEMP_RESERVE, is_saved_model
    from qenv.io import check_output_dir

    check_output_dir(out, "--out", "pass --out a folder you can write to (or that can be created).")
    targets = [("--out", out)]
    if args.save_model:
        targets.append(("--save-model", check_output_dir(
            args.save_model, "--save-model", "pass --save-model a folder you can write to (or that can be created).",
            reserve=SAVE_MODEL_TEMP_RESERVE)))
    home = run_folder.resolve()
    for flag, target in targets:
        where = target.resolve()
        if where == home or home.is_relative_to(where):
            what = "is" if where == home else "holds"
            raise QenvError(f"{flag} {target} {what} the run folder {run_folder} of --policy: writing there would "
                            "replace the training run's files.",
                            f"pass a {flag} folder outside the run (or leave --out out: {run_folder}/eval-<date>-<time>).")
    if args.save_model:
        target = targets[1][1]
        if len(args.models) == 1 and target.is_dir() and any(target.iterdir()):
            if not args.overwrite:
                raise QenvError(f"Folder {target} already exists and is not empty.",
                                "pick another --save-model folder, remove it, or pass --overwrite.")
            if not is_saved_model(target):
                raise QenvError(f"--save-model {target} is not empty and is not a model saved by eval_agent.py "
                                "--save-model (no config.json with qenv_recipe): --overwrite only replaces such a "
                                "folder.", "pick another --save-model folder (or an empty one).")
    if is_run_folder(out):
        raise QenvError(f"--out {out} is a run folder of train_agent.py: the evaluation's files (pareto.png, ...) "
                        "would replace the run's.", "leave --out out (each evaluation gets <run folder>/eval-<date>-"
                        "<time>), or pass another folder.")


def _body(argv: list[str] | None) -> int:
    from qenv.cli.config import check_env_kwargs
    from qenv.cli.envs import at_one_budget, set_torch_threads

    check_agents_checkout()  # this checkout's qenv/ with another checkout's agents/ (editable install)
    quiet_libraries()
    args = build_parser().parse_args(argv)
    set_torch_threads(args.threads)
    args.presets = parse_presets(args.presets)  # before any file is read: a typo costs nothing
    from qenv.progress import enable

    enable(not args.no_progress)
    from qenv.policies import is_shipped, resolve

    args.policy_name = str(args.policy)
    policy = resolve(args.policy)  # qenv:<name>: the shipped zip (an unknown name lists the shipped ones)
    if policy.is_dir():  # a run folder: its final agent
        inside = [policy / n for n in ("model.zip", "model.json") if (policy / n).is_file()]
        if not inside:
            raise QenvError(f"--policy {policy} is a folder without model.zip or model.json (an unfinished run?).",
                            f"pass a checkpoint, e.g. {policy / 'checkpoints' / 'step_<N>.zip'}, or finish the run "
                            f"with train_agent.py --resume {policy}.")
        policy = inside[0]
    if not policy.is_file():
        raise QenvError(f"Policy file {policy} does not exist.", "pass the model.zip of a run folder written by "
                                                                  "train_agent.py.")
    args.policy = policy
    if args.seed < 0:
        raise QenvError(f"--seed={args.seed} is negative.", "pass a seed of 0 or more.")
    if args.search_evals < 1:
        raise QenvError(f"--search-evals={args.search_evals} must be at least 1.", "give each searcher at least one evaluation.")
    if args.n_tokens is not None and args.n_tokens < 1:
        raise QenvError(f"--n-tokens={args.n_tokens} must be at least 1.", "pass a positive number of tokens.")
    searchers = [] if args.searchers.strip().lower() == "none" else [s.strip() for s in args.searchers.split(",") if s.strip()]
    unknown = [s for s in searchers if s not in SEARCHERS]
    if unknown:
        raise QenvError(f"Unknown searcher(s) {unknown}.", f"use a comma-separated subset of {','.join(SEARCHERS)}, "
                                                            "or none.")
    from qenv.eval.tokens import check_text_file

    for flag, what_file, paths in (("--data", "Held-out", args.data), ("--calib-data", "Calibration", args.calib_data)):
        for path in paths or []:
            if not Path(path).is_file():
                what = "is a folder, not a text file" if Path(path).is_dir() else "does not exist"
                raise QenvError(f"{what_file} text file {path} {what}.", f"pass an existing UTF-8 text file to {flag}.")
            check_text_file(path)  # binary or undecodable text is refused now (its start only: it is streamed)
    run = read_run(policy)
    if run["found"] is None and policy.suffix == ".zip" and policy.with_suffix(".json").is_file():
        from qenv.policies import check_card_matches_zip

        run = run_from_card(policy, check_card_matches_zip(policy))  # a shipped policy, or one written with a card
    from qenv.agents.registry import agent_named_by_file, resolve_agent

    # a plug-in only from the command line: a run folder or a zip names registered agents alone
    agent_name = args.agent or agent_named_by_file(run["agent"], f"The run file {run['agent_source']}") or \
        agent_named_by_file(saved_algorithm(policy), f"The agent record in {policy}") or "ppo"
    resolve_agent(agent_name)
    env_kwargs = at_one_budget(run["env_kwargs"])  # a policy trained over several budgets is evaluated at one
    given = check_env_kwargs(parse_key_values(args.env_kwargs), "--env-kwargs")
    for note in untrusted_run_settings(env_kwargs, given, run["folder"]):
        print(f"note: {note}", flush=True)
    if "observation" in given:
        trained = str(run["env_kwargs"].get("observation", "full")) if (run["found"] or run.get("card")) and \
            run["env_kwargs"] else None
        check_observation_matches(policy, given["observation"], "--env-kwargs", trained)
    env_kwargs.update(given)
    env_kwargs.pop("model", None)
    check_weight_cache_gib(args.weight_cache_gib, args.device or env_kwargs.get("device"))
    from qenv.quant.presets import parse_budget

    budget_flag = None if args.budget_bpw is None else parse_budget(args.budget_bpw)
    if isinstance(budget_flag, str) and "budget_bpw" in given:
        raise QenvError(f"--budget-bpw {budget_flag} and --env-kwargs budget_bpw={given['budget_bpw']} disagree.",
                        "give the budget once.")
    calib_flag = None if not args.calib_data else [str(Path(d).expanduser().resolve()) for d in args.calib_data]
    args.calib_data = calib_flag  # resolved: results.json records it (evaluate_all)
    for key, flag, value in (("device", "--device", args.device), ("n_tokens", "--n-tokens", args.n_tokens),
                             ("budget_bpw", "--budget-bpw", budget_flag if isinstance(budget_flag, float) else None),
                             ("data", "--calib-data", None if calib_flag is None else
                              calib_flag[0] if len(calib_flag) == 1 else calib_flag),
                             ("weight_cache_gib", "--weight-cache-gib", args.weight_cache_gib)):
        merge_flag(env_kwargs, key, flag, value, given)
    # the budget: a preset named here, else a number given, else the run's preset, else the run's number
    run_budget = env_kwargs.pop("budget_bpw", None)
    budget: float | str
    if isinstance(budget_flag, str):
        budget = budget_flag
    elif budget_flag is not None or "budget_bpw" in given:
        budget = run_budget
    elif run["budget_preset"]:
        budget = parse_budget(run["budget_preset"])  # the run named a preset: its size on each model here
    else:
        budget = 3.0 if run_budget is None else run_budget
    if not isinstance(budget, str):
        budget = float(budget)
        if not 0 < budget <= 16:
            raise QenvError(f"--budget-bpw={budget} is out of range.", "use a number of bits per weight in (0, 16].")
    models = list(args.model or [m["spec"] for m in run["train_models"]] or ["default"])
    args.models = models
    refuse_repeated_models(models, "their exports and saved models would land in the same folder")
    held = set()
    calib = env_kwargs.get("data")
    for c in [calib] if isinstance(calib, str) else list(calib or []):
        held.add(Path(c).resolve())
    same = [d for d in args.data or [] if Path(d).resolve() in held]
    if same:  # both read the file from its start: the held-out tokens would be the calibration tokens
        raise QenvError(f"Held-out --data {', '.join(map(str, same))} is also the calibration text: scores would not "
                        "be held-out.", "pass --calib-data another file (e.g. the corpus's train split), or score on "
                                        "another --data file.")
    default_parent = Path("runs") / f"eval-{policy.stem}" if is_shipped(args.policy_name) else run["folder"]
    out = Path(args.out).expanduser() if args.out else default_parent / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.save_model:
        args.save_model = str(Path(args.save_model).expanduser())
    check_outputs(args, out, run["folder"])
    out, lock, created = claim_eval_dir(out, numbered=not args.out, overwrite=args.overwrite)
    try:
        with lock:
            return evaluate_all(args, run, policy, agent_name, budget, env_kwargs, searchers, models, out)
    except BaseException:
        discard_eval_dir(out, created)
        raise


def claim_eval_dir(out: Path, numbered: bool, overwrite: bool) -> tuple[Path, Any, Path | None]:
    """Create the output folder now, exclusively, and lock it for this evaluation: the default name
    is numbered (``eval-<date>-<time>-2``, ... as train_agent.py numbers runs: two evaluations started
    in the same second never share a folder); an explicit ``--out`` that exists must be empty, or an
    earlier evaluation's folder with ``--overwrite``. Returns the folder, its held lock and the
    topmost folder this call created (removed again if the evaluation fails), or ``None``."""
    from qenv.cli.common import EVAL_OUTPUT, claim_output_folder

    return claim_output_folder(out, EVAL_OUTPUT, overwrite, numbered)


def discard_eval_dir(out: Path, created: Path | None) -> None:
    """After a failed evaluation: no half-written output (the folders this run created go, and in a
    folder that was there before, what eval_agent.py writes)."""
    from qenv.cli.common import EVAL_OUTPUT, discard_output_folder

    discard_output_folder(out, created, EVAL_OUTPUT)


def evaluate_all(args: Any, run: dict[str, Any], policy: Path, agent_name: str, budget: float,
                 env_kwargs: dict[str, Any], searchers: list[str], models: list[str], out: Path) -> int:
    """Every model's table, the summary lines and the output files (in ``out``, claimed and locked)."""
    from qenv.io import write_json_atomic

    at = f"{budget} (its own bpw on each model)" if isinstance(budget, str) else f"{budget:g} bpw"
    print(f"evaluating {policy} ({agent_name}) at {at} on {', '.join(models)}", flush=True)
    results = []
    for spec in models:
        result = evaluate_model(spec, args, run, agent_name, budget, env_kwargs, searchers, out)
        print_model(result)
        results.append(result)
    for group in ("zero-shot", "fine-tuned"):
        rows = [r for r in results if r["status"] == group and r.get("comparisons")]
        if rows:
            print(f"{group} ({'models the policy never saw' if group == 'zero-shot' else 'after --init-from'}): "
                  + rollup(rows))
    payload = {"policy": str(policy), "agent": agent_name, "run": str(run["folder"]),
               "budget_bpw": None if isinstance(budget, str) else budget,
               "budget_preset": budget if isinstance(budget, str) else None, "calib_data": args.calib_data,
               "search_evals": args.search_evals, "seed": args.seed, "held_out": list(args.data or []),
               "train_models": run["train_models"], "init_from": run.get("init_from"),
               "zero_shot": [r["model"] for r in results if r["status"] == "zero-shot"],
               "fine_tuned": [r["model"] for r in results if r["status"] == "fine-tuned"], "models": results}
    write_json_atomic(out / "results.json", json.loads(json.dumps(payload, default=str)))
    write_csv(out / "results.csv", results)
    pareto_plot(out / "pareto.png", results)
    extra = ["export/"] if args.export else []
    print(f"\nwrote {out}: results.json, results.csv, pareto.png" + (", " + ", ".join(extra) if extra else ""))
    if args.save_model:
        print(f"saved the quantized model(s) in {args.save_model}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the program; returns the exit status (0 done, 2 bad input, 130 interrupted)."""
    from qenv.progress import shown

    with shown(False):  # _body turns progress on (unless --no-progress); as it was afterwards
        return run_cli(lambda: _body(argv))


if __name__ == "__main__":
    sys.exit(main())
