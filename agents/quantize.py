"""``python -m qenv quantize``: from a model to a deployable file in one command.

    python -m qenv quantize --model M --budget-bpw 4.0 [--agent greedy|evolution | --policy PATH] --out DIR

finds a recipe (a searcher's, or a trained policy's deterministic rollout), scores it beside the
human baselines that bracket the budget on the same tokens, and writes into ``DIR``:

- ``recipe.json``: the rules per layer, with the recipe's metrics;
- ``comparison.csv`` / ``results.json``: the recipe and the baselines (bits per weight over the
  quantized layers, MB, KL, perplexity, top-1), the table printed;
- the deployable file, for the runtime that can run the recipe as qenv measured it:
  ``model/`` a packed checkpoint that transformers loads (compressed-tensors ``pack-quantized``,
  :mod:`qenv.export_packed`; loaded back before the command ends and its logits compared with
  qenv's), or ``model.gguf`` for a recipe of llama.cpp types (the ``gguf`` menu;
  :mod:`qenv.export_gguf`).

``--runtime`` picks it (default: ``gguf`` for the gguf menu, else ``transformers``). With a searcher
and the transformers runtime, the search runs on the packable rules of the default menu, or with
``--menu learned`` of the default menu plus the learned-rounding rules (GPTQ's storage, so they pack)
(:func:`packable_menu`: no fp16 outliers, which the format cannot hold; no AWQ, whose scale cannot
fold before o_proj when value heads are shared; groups that divide every row), so the file is what
was scored. A policy acts on its own run's menu (AWQ scales are folded where they can be); a recipe
the runtime cannot run is one error line naming the layers and rules (exit status 2), and so is a
model it cannot hold, before any search.

Why this lives in the programs' layer (``qenv.agents``): it builds agents (the registry, SB3
policies), which the library (``qenv/``) never imports. ``qenv/__main__`` finds the command through
the ``qenv.commands`` entry-point group that qenv's own ``pyproject.toml`` fills, the same plug-in
route installed agents take (``qenv.agents``); ``python -m qenv.agents.quantize`` runs it too.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

from qenv.cli.common import ArgumentParser, bpw_scope, fmt, plain_table, quiet_libraries, run_cli, table_legend
from qenv.errors import QenvError

RUNTIMES: tuple[str, ...] = ("auto", "transformers", "gguf")
SEARCH_AGENTS: tuple[str, ...] = ("greedy", "evolution")
#: the named menus a search can run on (``qenv.envs.spaces.MENUS`` less ``compact``, the old short menu)
SEARCH_MENUS: tuple[str, ...] = ("default", "learned", "gguf")
DEFAULT_SEARCH_EVALS = 16
DEFAULT_N_TOKENS = 256
DEFAULT_SEQ_LEN = 128
#: the largest KL(qenv's scored model || the written file's) accepted: a packed checkpoint is exact,
#: so anything above float noise means the file is not the model measured
MAX_FILE_KL = 1e-3
_TOL = 1e-9

EXAMPLES = """\
examples:
  python -m qenv quantize --model default --budget-bpw 4.0 --out quantized/
  python -m qenv quantize --model default --budget-bpw gptq-w4 --out q4/   # uniform gptq-w4's own size
  python -m qenv quantize --model tiny-llama --budget-bpw 3.5 --agent evolution --out q/
  python -m qenv quantize --model default --budget-bpw 4.5 --menu gguf --out q-gguf/
  python -m qenv quantize --model default --budget-bpw 3.2 --menu learned --out q-learned/
  python -m qenv quantize --model default --budget-bpw 4.0 --policy runs/x/model.zip --out q/

Errors print one line, 'error: <problem> Fix: <fix>', and exit with status 2.
"""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m qenv quantize", epilog=EXAMPLES,
                       description="Find a recipe at a budget, compare it with the human baselines and write a "
                                   "file a runtime loads (a packed transformers checkpoint, or a .gguf).")
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="model: built-in name, tiny-<arch>, transformers folder, hub id, .gguf or llama2.c .bin")
    p.add_argument("--budget-bpw", required=True, metavar="BPW",
                   help="bits-per-weight budget over the quantized layers, e.g. 4.0, or a preset's name "
                        "(gptq-w4, q4_k_m-im): that preset's own bpw on this model")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--agent", choices=SEARCH_AGENTS, help="searcher that finds the recipe (default: greedy)")
    who.add_argument("--policy", metavar="PATH", help="a trained policy (runs/<run>/model.zip, or qenv:transfer, shipped with qenv): its deterministic "
                                                      "rollout is the recipe, on its run's menu and settings")
    p.add_argument("--menu", choices=SEARCH_MENUS,
                   help="rule menu of the search: default, learned (the default menu plus learned-rounding rules "
                        "w2-w4, GPTQ's size; slower to build) or gguf (llama.cpp's types) (default: the "
                        "policy's run's, else 'default')")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="what the deployable file is for: transformers (packed checkpoint), gguf (llama.cpp), or "
                        "auto: gguf for the gguf menu, else transformers (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty; see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing qenv's files")
    p.add_argument("--data", nargs="+", action="extend", metavar="FILE",
                   help="calibration text file(s) (default: tokens sampled from the model)")
    p.add_argument("--n-tokens", type=int, metavar="N",
                   help=f"calibration tokens; every row is scored on them (default: the policy's run's, else "
                        f"{DEFAULT_N_TOKENS})")
    p.add_argument("--seq-len", type=int, metavar="N",
                   help=f"sequence length (default: the policy's run's, else {DEFAULT_SEQ_LEN})")
    p.add_argument("--search-evals", type=int, default=DEFAULT_SEARCH_EVALS, metavar="N",
                   help="evaluation budget of the searcher, in full evaluations (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the searcher and sampled tokens (default: %(default)s)")
    p.add_argument("--device", metavar="DEV", help="cpu, cuda, cuda:N, auto (default: auto)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="torch CPU threads (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress (by default: bars on a terminal; in a log, one line per stage or tenth)")
    return p


def budget_bpw(text: str) -> float | str:
    """The ``--budget-bpw`` as given, checked before any model loads: a number of bits per weight, or a
    preset name (``gptq-w4``) whose own bpw on the model :func:`qenv.quant.presets.resolve_budget` gives
    once the model is loaded (the parser of ``train_agent.py`` and ``eval_agent.py``)."""
    from qenv.quant.presets import parse_budget, preset_names_text

    try:
        value = parse_budget(text)
    except QenvError:
        raise QenvError(f"--budget-bpw={text!r} is not a number of bits per weight nor a known preset.",
                        f"pass a number such as 4.0, or one of {preset_names_text()}.") from None
    if isinstance(value, float) and not 0 < value <= 16:
        raise QenvError(f"--budget-bpw={text} is out of range.", "use a number of bits per weight in (0, 16].")
    return value


def packable_menu(layers: list[Any], menu: str = "default") -> tuple[list[Any], str]:
    """The rules of the named ``menu`` (``default`` or ``learned``) that a packed checkpoint holds as
    measured on every layer of a model, and
    what was changed: no fp16 outliers, no AWQ scale (o_proj's folds only without GQA, and a menu is
    the same for every layer), and groups that divide every layer's input
    width (compressed-tensors' groups must): a rule's group becomes the widest of qenv's group
    sizes not above it that divides them all, else one group per output row (e.g. SmolLM2's
    576-wide rows take groups of 64, stories260K's 64- and 172-wide rows one group per row)."""
    import math
    from dataclasses import replace

    from qenv.envs.spaces import MENUS
    from qenv.quant.rules import ALLOWED_GROUP_SIZES

    def divides(group: int) -> bool:  # the quantizer's group on a row narrower than it is the whole row
        return group == -1 or all(info.in_features % min(group, info.in_features) == 0 for info in layers)

    width = 0
    for info in layers:
        width = math.gcd(width, int(info.in_features))
    rules, changed = [], {}
    for rule in MENUS[menu]:
        if rule.act_scale > 0 or rule.outlier_fraction > 0:
            continue
        group = rule.group_size
        if not divides(group):
            group = max((g for g in ALLOWED_GROUP_SIZES if 0 < g <= rule.group_size and divides(g)), default=-1)
            changed[rule.group_size] = group
        rule = replace(rule, group_size=group)
        if rule not in rules:
            rules.append(rule)
    note = f"searched on the {menu} menu's packable rules (no AWQ, no fp16 outliers)"
    if changed:
        note += "; groups " + ", ".join(f"of {a} -> {'one per row' if b == -1 else f'of {b}'}" for a, b in changed.items()) \
            + f" to divide every layer's input width (their gcd is {width})"
    return rules, note + ", so the packed checkpoint is the model scored"


def claim_out(out: Path, overwrite: bool) -> tuple[Path, Any, Path | None]:
    """Create ``--out`` now, exclusively, and lock it, as the other programs do (``claim_output_dir``):
    an existing folder must be empty, or an earlier output of this command with ``--overwrite``
    (which replaces only what this command writes); a folder of anything else is never touched.
    Returns the folder, its lock and the topmost folder created (removed again on failure)."""
    from qenv.cli.common import QUANTIZE_OUTPUT, claim_output_folder
    from qenv.io import check_output_dir

    check_output_dir(out, "--out", "pass --out a folder you can write to (or that can be created).")
    return claim_output_folder(out, QUANTIZE_OUTPUT, overwrite)


def policy_settings(policy: Path) -> tuple[str, dict[str, Any]]:
    """``(agent name, env kwargs)`` of the run a policy file came from (its summary.json / config.json)."""
    from qenv.agents.sb3 import agent_name_of_zip
    from qenv.cli.common import run_folder_of
    from qenv.cli.envs import at_one_budget
    from qenv.cli.runs import env_kwargs_of
    from qenv.io import read_json

    if not policy.is_file():
        raise QenvError(f"Policy file {policy} does not exist.", "pass the model.zip of a run folder written by "
                                                                  "train_agent.py.")
    folder = run_folder_of(policy)
    if folder is None and policy.suffix == ".zip" and policy.with_suffix(".json").is_file():
        from qenv.policies import check_card_matches_zip  # a shipped policy (qenv:<name>): its card has the settings

        card = check_card_matches_zip(policy)
        kwargs = at_one_budget(dict(card["config"].get("env_kwargs") or {}))
        kwargs.pop("model", None)
        return str(card["agent"]), kwargs
    settings: dict[str, Any] = {}
    agent = None
    if folder is not None:
        for name in ("summary.json", "config.json"):
            if (folder / name).is_file():
                data = read_json(folder / name, "Run file", "fix or remove it.")
                found = (data.get("settings") or data) if isinstance(data, dict) else {}
                settings = settings or env_kwargs_of(found, f"Run file {folder / name}")
                agent = agent or data.get("agent") or found.get("agent")
    if agent is None and policy.suffix == ".json":  # a searcher's model.json names its searcher
        saved = read_json(policy, "Policy file", "pass a model.json written by a qenv searcher.")
        agent = saved.get("agent") if isinstance(saved, dict) and isinstance(saved.get("agent"), str) else None
    agent = agent or (agent_name_of_zip(policy) if policy.suffix == ".zip" else None) or "ppo"
    kwargs = at_one_budget(settings)
    kwargs.pop("model", None)
    return str(agent), kwargs


def policy_card_applies(policy: Path) -> bool:
    """Whether ``policy`` is read through a card (a zip with ``<name>.json`` beside it, no run folder)."""
    from qenv.cli.common import run_folder_of

    return policy.suffix == ".zip" and run_folder_of(policy) is None and policy.with_suffix(".json").is_file()


def find_recipe(args: Any, env: Any, n_layers: int) -> tuple[Any, str, str]:
    """``(recipe, method name, note)``: the searcher's result or the policy's deterministic rollout."""
    from qenv.agents.registry import load_agent, make_agent
    from qenv.envs.episodes import rollout_recipe

    if args.policy:
        from qenv.cli.common import normalizer_path
        from qenv.io import read_json

        agent = load_agent(args.agent_name, args.policy, env=env)
        stats = normalizer_path(Path(args.policy))
        if stats.is_file():
            from qenv.agents.sb3 import NormalizedAgent

            agent = NormalizedAgent(agent, read_json(stats, "Normalisation statistics", "delete it or retrain."))
        recipe, info = rollout_recipe(agent, env, deterministic=True)
        clamped = info.get("clamped_actions", 0)
        return recipe, f"policy ({args.agent_name})", f"{clamped} actions lowered by the budget" if clamped else ""
    searcher = make_agent(args.agent, env, seed=args.seed)
    recipe, _ = searcher.search(env, total_timesteps=args.search_evals * n_layers, progress_bar=not args.no_progress)
    spent = getattr(searcher, "evaluations", None)
    return recipe, args.agent, f"{spent} evaluation{'s' if spent != 1 else ''}" if spent is not None else ""


def check_runtime_possible(runtime: str, loaded: Any, rules: list[Any] | None) -> None:
    """Before any search: the runtime can hold this model, and (for a search, whose ``rules`` are known)
    every layer has a rule in the menu it can run; else one error naming the layers and why."""
    model = loaded.model
    if runtime == "gguf":
        from qenv.export_gguf import GGUF_ARCHITECTURES

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in GGUF_ARCHITECTURES:
            raise QenvError(f"qenv writes .gguf files of Llama-architecture models; {loaded.name} is "
                            f"{model_type!r}.", "use --runtime transformers.")
        if rules and all(r.keeps or r.gguf is None for r in rules):  # a search could only return what it cannot run
            names = [info.name for info in loaded.layers]
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            labels = ", ".join(r.label() for r in rules if not r.keeps)
            raise QenvError(f"llama.cpp cannot run any rule of this menu as qenv measures it, on all {len(names)} "
                            f"layer(s) of {loaded.name} ({shown}): {labels} are not llama.cpp types.",
                            "search on the gguf menu (--menu gguf), or write a packed checkpoint "
                            "(--runtime transformers).")
        return
    if getattr(model, "config", None) is None or not hasattr(model, "save_pretrained"):
        raise QenvError(f"{loaded.name} is not a transformers model, so it has no packed checkpoint.",
                        "save it as a transformers folder first (eval_agent.py --save-model with an fp16 recipe), "
                        "then quantize that folder.")
    if not rules:
        return
    from qenv.export_packed import packed_rule_problem, tied_names
    from qenv.models.layers import get_module

    tied = tied_names(model)
    bad: dict[str, list[str]] = {}
    for info in loaded.layers:
        module = get_module(model, info.name)
        problems = [(r, packed_rule_problem(info, r, module, info.name in tied)) for r in rules if not r.keeps]
        if problems and all(why for _, why in problems):
            first, why = problems[0]
            bad.setdefault(f"e.g. {first.label()} {why}", []).append(info.name)
    if bad:
        listed = "; ".join(f"{', '.join(names)} ({why})" for why, names in bad.items())
        raise QenvError(f"A packed checkpoint (transformers) cannot hold any rule of the menu on "
                        f"{sum(map(len, bad.values()))} layer(s) of {loaded.name}: {listed}.",
                        "use --runtime gguf on a Llama-architecture model, or a model whose layers are nn.Linear with "
                        "input widths the menu's groups divide.")


def check_runtime(runtime: str, evaluator: Any, recipe: Any) -> None:
    """The runtime can run every rule as qenv measured it, else one error naming the layers and rules."""
    if runtime == "transformers":
        from qenv.export_packed import check_packed_recipe

        check_packed_recipe(evaluator.loaded.model, evaluator.layers, recipe)
        return
    from qenv.export_gguf import GGUF_ARCHITECTURES

    bad: dict[str, list[str]] = {}
    for info in evaluator.layers:
        rule = recipe.get(info.name)
        if rule is not None and not rule.keeps and rule.gguf is None:
            bad.setdefault(rule.label(), []).append(info.name)
    if bad:
        listed = "; ".join(f"{', '.join(names)} ({label})" for label, names in bad.items())
        raise QenvError(f"llama.cpp cannot run {sum(map(len, bad.values()))} layer(s) of the recipe as qenv measured "
                        f"them, whose rules are not llama.cpp types: {listed}.",
                        "search on the gguf menu (--menu gguf), or write a packed checkpoint (--runtime transformers).")
    model_type = getattr(getattr(evaluator.loaded.model, "config", None), "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        raise QenvError(f"qenv writes .gguf files of Llama-architecture models; {evaluator.loaded.name} is "
                        f"{model_type!r}.", "use --runtime transformers.")
    if evaluator.loaded.tokenizer is None:  # a .gguf carries its vocabulary; nothing is written without one
        raise QenvError(f"{evaluator.loaded.name} has no tokenizer, which a .gguf must carry.",
                        "quantize a model with its tokenizer (a transformers folder, a .gguf, or a llama2.c .bin "
                        "beside its tokenizer.model), or use --runtime transformers.")


def baselines(evaluator: Any, budget: float, recipe_bpw: float, menu: str) -> list[str]:
    """The human presets the recipe is compared with, picked as ``eval_agent.py --presets`` picks them
    (:func:`qenv.cli.presets.select_presets`): rtn/gptq/awq at the widths bracketing the budget and the
    recipe's bpw, on the gguf menu llama.cpp's mixes nearest them and within 1 bpw, and fp16."""
    from qenv.cli.presets import select_presets

    words = ["default"] if menu == "gguf" else ["rtn", "gptq", "awq", "fp16"]
    return select_presets(words, evaluator, budget, recipe_bpw)


def score_row(method: str, kind: str, metrics: Any, budget: float, wall: float, note: str = "") -> dict[str, Any]:
    return {"method": method, "kind": kind, "bpw": metrics.bpw, "model_mb": metrics.model_mb, "kl": metrics.kl,
            "ppl": metrics.ppl, "top1": metrics.top1, "wall_s": wall, "over_budget": metrics.bpw > budget + _TOL,
            "note": note}


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    from qenv.io import write_text_atomic

    buf = io.StringIO()
    cols = ["method", "kind", "bpw", "model_mb", "kl", "ppl", "top1", "wall_s", "over_budget", "note"]
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r[k] for k in cols})
    return write_text_atomic(path, buf.getvalue())


def _body(argv: list[str] | None) -> int:
    from qenv.cli.envs import set_torch_threads
    from qenv.eval.tokens import read_text_file

    quiet_libraries()
    args = build_parser().parse_args(argv)
    budget = budget_bpw(args.budget_bpw)  # a preset's name becomes its bpw once the model is loaded
    from qenv.progress import enable

    enable(not args.no_progress)  # main() puts it back as it was
    set_torch_threads(args.threads)
    for flag, value, low in (("--search-evals", args.search_evals, 1), ("--n-tokens", args.n_tokens, 1),
                             ("--seq-len", args.seq_len, 2), ("--seed", args.seed, 0)):
        if value is not None and value < low:
            raise QenvError(f"{flag}={value} must be at least {low}.", f"pass {flag} {max(low, 1)} or more.")
    for path in args.data or []:
        if not Path(path).is_file():
            raise QenvError(f"Calibration text file {path} does not exist.", "pass an existing UTF-8 text file.")
        read_text_file(path)
    from qenv.cli.common import QUANTIZE_OUTPUT, discard_output_folder

    out, lock, created = claim_out(Path(args.out).expanduser(), args.overwrite)
    try:
        with lock:
            return _quantize(args, budget, out)
    except BaseException:
        discard_output_folder(out, created, QUANTIZE_OUTPUT)  # nothing half-written
        raise


def _quantize(args: Any, budget_spec: float | str, out: Path) -> int:
    """Everything after the arguments are checked and ``--out`` is claimed."""
    from qenv.cli.envs import make_quant_env
    from qenv.io import write_json_atomic
    from qenv.quant.presets import preset

    kwargs: dict[str, Any] = {}
    if args.policy:
        from qenv.policies import resolve

        args.policy_name = str(args.policy)
        args.policy = str(resolve(args.policy))  # qenv:<name>: a shipped policy (an unknown name lists them)
        args.agent_name, kwargs = policy_settings(Path(args.policy))
        from qenv.agents.registry import resolve_agent

        resolve_agent(args.agent_name)
        if args.menu and str(kwargs.get("menu", "default")) != args.menu:
            raise QenvError(f"--menu {args.menu} differs from the menu the policy was trained on "
                            f"({kwargs.get('menu', 'default')}).", "leave --menu out with --policy.")
    else:
        args.agent = args.agent or "greedy"
    menu_name = args.menu or (str(kwargs["menu"]) if isinstance(kwargs.get("menu"), str) else "default")
    runtime = args.runtime if args.runtime != "auto" else ("gguf" if menu_name == "gguf" else "transformers")
    notes: list[str] = []
    from qenv.envs.spaces import parse_menu
    from qenv.models.loading import load_model

    t0 = time.perf_counter()
    from qenv.progress import progress_bar, stage

    with stage(f"loading model {args.model}"):
        loaded = load_model(args.model, device=args.device or kwargs.get("device"), dtype=kwargs.get("dtype"),
                            include_lm_head=bool(kwargs.get("include_lm_head", False)))
    if args.policy and policy_card_applies(Path(args.policy)):  # a shipped policy: a model it cannot describe is one line
        from qenv.policies import check_describes, read_card

        check_describes(read_card(args.policy), loaded.layers, str(args.model), args.policy_name)
    from qenv.quant.presets import budget_label, resolve_budget

    budget, budget_preset = resolve_budget(budget_spec, list(loaded.layers))  # gptq-w4: its exact bpw here
    if not args.policy:
        kwargs["action_kind"] = "discrete"
        if menu_name == "gguf":
            kwargs["menu"] = "gguf"
        elif runtime == "transformers":
            menu_rules, menu_note = packable_menu(list(loaded.layers), menu_name)
            kwargs["menu"] = [r.to_dict() for r in menu_rules]
            notes.append(menu_note)
        elif menu_name != "default":
            kwargs["menu"] = menu_name
    kwargs.update(budget_bpw=budget, seed=args.seed)
    for key, value, default in (("n_tokens", args.n_tokens, DEFAULT_N_TOKENS), ("seq_len", args.seq_len, DEFAULT_SEQ_LEN)):
        kwargs[key] = value if value is not None else kwargs.get(key, default)
    if args.data:
        kwargs["data"] = list(args.data)
    if args.device:
        kwargs["device"] = args.device

    print(f"quantizing {args.model} at {budget_label(budget, budget_preset)} with "
          f"{args.policy or args.agent} for {runtime} ({menu_name} menu)", flush=True)
    check_runtime_possible(runtime, loaded, None if args.policy else list(parse_menu(kwargs.get("menu"))))
    env = make_quant_env(model=loaded, **kwargs)
    try:
        task = env.unwrapped.task
        evaluator = task.evaluator
        t_search = time.perf_counter()
        recipe, method, note = find_recipe(args, env, len(task.layers))
        check_runtime(runtime, evaluator, recipe)
        metrics = evaluator.evaluate(recipe)
        rows = [score_row(method, "policy" if args.policy else "searcher", metrics, budget,
                          time.perf_counter() - t_search, note)]
        names = baselines(evaluator, budget, metrics.bpw, menu_name)
        bar = progress_bar(len(names), f"scoring {len(names)} presets", "preset")
        from qenv.eval.preset_cache import cached_metrics

        for name in names:  # cached on disk as eval_agent.py's are: a warm run scores none of them again
            t1 = time.perf_counter()
            scored, hit = cached_metrics(evaluator, preset(name, task.layers))
            rows.append(score_row(name, "preset", scored, budget, time.perf_counter() - t1, "cached" if hit else ""))
            bar.update(1)
        bar.close()
        rows.sort(key=lambda r: (r["bpw"], r["kind"] == "preset", r["method"]))
        table = [[("* " if r["over_budget"] else "  ") + r["method"], r["kind"], f"{r['bpw']:.3f}",
                  f"{r['model_mb']:.4f}", fmt(r["kl"]), fmt(r["ppl"]), f"{r['top1']:.3f}", r["note"]] for r in rows]
        tokens = f"{evaluator.tokens.n_tokens} calibration tokens ({evaluator.tokens.source})"
        reference, bpw_counts = task.loaded.reference_label, bpw_scope(task.layers)
        print(f"\n{task.name}, budget {budget_label(budget, budget_preset)} (over the quantized layers), "
              f"scored on {tokens}")
        if task.loaded.reference_note:
            print(f"  reference: {reference}, not a full-precision model: every KL below measures re-quantizing it")
        print(plain_table(["method", "kind", "bpw", "MB", "KL", "ppl", "top1", "note"], table, align="llrrrrrl"))
        print(f"  (* over the {budget_label(budget, budget_preset)} budget)")
        print(table_legend(reference, bpw_counts))

        metadata = {"model": task.name, "spec": args.model, "budget_bpw": budget, "budget_preset": budget_preset,
                    "method": method,
                    "menu": menu_name, "runtime": runtime, "metrics": metrics.to_dict(), "tokens": tokens,
                    "reference": reference, "bpw_counts": bpw_counts}
        recipe.save(out / "recipe.json", **metadata)
        write_csv(out / "comparison.csv", rows)
        written = ["recipe.json", "comparison.csv", "results.json"]
        check: dict[str, Any] = {}
        if runtime == "transformers":
            from qenv.export_packed import packed_kl, write_packed_checkpoint

            write_packed_checkpoint(evaluator, recipe, out / "model", metadata, overwrite=True)
            kl = packed_kl(out / "model", evaluator, recipe, max_batches=1)
            check = {"loaded_by": "transformers", "kl_to_scored": kl, "max_kl": MAX_FILE_KL}
            if not kl <= MAX_FILE_KL:
                raise QenvError(f"The packed checkpoint in {out / 'model'} loads in transformers, but its logits are "
                                f"KL {kl:.3g} from the model qenv scored (over {MAX_FILE_KL:g}).",
                                "report this as a qenv bug; use --save-model of eval_agent.py meanwhile.")
            written.append("model/ (packed checkpoint: AutoModelForCausalLM.from_pretrained loads it)")
            notes.append(f"transformers loaded model/ back: KL {kl:.3g} to the model qenv scored")
            check["file_bytes"] = sum(p.stat().st_size for p in (out / "model").glob("*.safetensors"))
            notes.append(f"model/*.safetensors: {check['file_bytes'] / 1e6:.4f} MB on disk, every tensor "
                         f"(the table's bpw is {metrics.bpw:.3f} over the quantized layers alone)")
        else:
            from qenv.export_gguf import write_gguf

            write_gguf(evaluator, recipe, out / "model.gguf",
                       {k: v for k, v in metadata.items() if not isinstance(v, dict)})
            written.append("model.gguf (llama.cpp; load it with --no-repack / use_extra_bufts=False on CPUs whose "
                           "repacked kernels crash, see the README)")
            check["file_bytes"] = (out / "model.gguf").stat().st_size
            notes.append(f"model.gguf: {check['file_bytes'] / 1e6:.4f} MB on disk, every tensor and the vocabulary "
                         f"(the table's bpw is {metrics.bpw:.3f} over the quantized layers alone)")
        write_json_atomic(out / "results.json", json.loads(json.dumps(
            {**metadata, "rows": rows, "recipe": recipe.to_dict(), "check": check, "notes": notes,
             "wall_s": time.perf_counter() - t0}, default=str)))
    finally:
        env.close()
    for line in notes:
        print(f"note: {line}")
    print(f"\nwrote {out}: " + ", ".join(written))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 done, 2 bad input, 130 interrupted)."""
    from qenv.progress import shown

    with shown(False):  # _body turns progress on (unless --no-progress); as it was afterwards
        return run_cli(lambda: _body(argv))


if __name__ == "__main__":
    sys.exit(main())
