#!/usr/bin/env python3
"""Quality benchmark of qenv (issue 5, part 2): searched rules vs human-designed ones.

For every model and budget (bits per weight) it measures, with the project's own environment,
evaluator, presets and agents (nothing re-implemented here):

- **KL** (mean per-token KL(full precision || quantized)) and **top-1 agreement** on the
  environment's calibration tokens, and **perplexity on held-out text** (an
  :class:`~qenv.eval.evaluator.Evaluator` on ``tokens_from_text`` of the held-out file that shares
  the environment's quantized weights, i.e. rules are calibrated on calibration tokens only:
  ``eval_agent.scoring_evaluator``), plus held-out KL / top-1 in the JSON;
- for these methods:

  ========================  ==============================================================
  ``rtn_frontier``          the uniform-RTN frontier interpolated at the budget, as the env
                            reports it (``task.reference(budget)``; held-out ppl from the same
                            function on the held-out evaluator). A reference, not a recipe.
  ``rtn``, ``gptq``, ``awq``  the best uniform preset of that family that fits the budget
                            (``rtn-w<b>[-g32|-g64|-gc]`` etc., lowest calibration KL)
  ``llamacpp``              the llama.cpp-like ``q4_k_m``/``q3_k_m`` mix (the larger that fits,
                            else the nearer one: its own bpw is reported, marked over budget)
  ``greedy``                HAWQ-style sensitivity allocation (deterministic, one evaluation)
  ``random``, ``evolution`` searchers, N evaluations each, seeds 0..S-1
  ``ppo``                   PPO (``configs/ppo.yaml``), N episodes of training, then one
                            deterministic rollout; seeds 0..S-1
  ``rl_best``               the same training run reported like the searchers: the best
                            recipe of its N training episodes (``EpisodeTracker``, the
                            tracker behind train_agent.py's ``best_recipe.json``)
  ``rl_eval``               its own training run of N − K episodes whose deterministic
                            rollout is evaluated K times along the way (``--rl-eval-points``,
                            ``DeterministicEvalCallback``: SB3's EvalCallback habit, the
                            ``best_model.zip`` of ``train_agent.py --eval-freq``); the best
                            of the K rollouts is reported. Not in the default methods.
  ========================  ==============================================================

  Every seeded method gets the same number of environment evaluations N (``--episodes``): PPO
  trains for ``N × n_layers`` steps, searchers get ``learn(N × n_layers)`` = N evaluations.
- **transfer**: PPO trained on a multi-model environment (``--transfer-train``), rolled out
  zero-shot (deterministic) on models it never saw (``--transfer-test``), against the best
  human-designed preset at or under the budget on that model.

Layout: ``run`` starts one worker process per (model, budget) and per (transfer budget, seed),
all at once (each with one torch thread), with a wall-clock deadline; workers append one JSON line
per finished method to ``<out>/raw/*.jsonl`` as they go (a crash or the deadline loses only the
unit in flight), then ``report`` turns the lines into ``quality_results.json``, ``.csv``, markdown
tables (``quality_tables.md``) and one Pareto plot per model (``quality_pareto_<model>.png``).
Workers for a model given as a folder that does not exist yet wait for it (the GPU run trains the
bench models with ``scripts/train_bench_models.py`` at the same time).
``--fill-from RUN...`` runs only the quality units that earlier runs did not complete (merge them
afterwards with ``report --runs RUN... OUT``, which leaves out a later run's rows of a model whose
full-precision perplexities differ: another instance of it). ``--transfer-eval-jobs`` evaluates the
transfer policies in one worker per model, which prepares that model's baselines while they train.

Examples::

    # CPU smoke test
    python bench/bench_quality.py run --models stories260K --budgets 3.0 --seeds 0 --episodes 4 \\
        --out /tmp/q --transfer-train default --transfer-test stories260K --transfer-episodes 8
    # the GPU run: see BENCHMARKS.md ("## Quality") for the exact command
    python bench/bench_quality.py report --out /tmp/q
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
FAMILIES = ("rtn", "gptq", "awq")
PRESET_BITS = (2, 3, 4, 5, 6, 8)
PRESET_GROUPS = ("", "-g64", "-g32", "-gc")
SEEDED = ("random", "evolution", "ppo", "rl_best", "rl_eval")
METHOD_ORDER = ("fp16", "rtn_frontier", "rtn", "gptq", "awq", "llamacpp", "greedy", "random", "evolution", "ppo",
                "rl_best", "rl_eval")
METHOD_LABEL = {
    "fp16": "full precision", "rtn_frontier": "uniform RTN frontier (env reference, interpolated)",
    "rtn": "uniform RTN (best fitting)", "gptq": "uniform GPTQ (best fitting)", "awq": "AWQ-like (best fitting)",
    "llamacpp": "llama.cpp-like mix", "greedy": "greedy (HAWQ-style)", "random": "random search",
    "evolution": "evolution (EvoPress-like)", "ppo": "RL policy (--rl-agent on --action-kind)",
    "rl_best": "RL, best training episode",
    "rl_eval": "RL, best of K deterministic evaluations during training",
}
#: what ``run`` measures without --methods (rl_eval trains the RL method a second time)
DEFAULT_METHODS = tuple(m for m in METHOD_ORDER if m != "rl_eval")
HUMAN = ("rtn", "gptq", "awq", "llamacpp")
SEARCHED = ("greedy", "random", "evolution", "ppo", "rl_best", "rl_eval")
_TOL = 1e-9


# ------------------------------------------------------------------------------------------------
# models and data
# ------------------------------------------------------------------------------------------------
def resolve_model(entry: str, data_dir: Path) -> dict[str, str]:
    """``stories260K``, ``default``, ``NAME=PATH`` or a path → name, spec and which corpus it speaks."""
    if "=" in entry:
        name, spec = entry.split("=", 1)
    elif entry == "stories260K":
        name, spec = entry, str(data_dir / "stories260K" / "stories260K.bin")
    elif entry == "default":
        name, spec = entry, "default"
    else:
        name, spec = Path(entry).name, entry
    corpus = "tinystories" if spec.endswith(".bin") else "wikitext"
    return {"name": name, "spec": spec, "corpus": corpus}


def corpus_files(corpus: str, data_dir: Path, work: Path) -> tuple[str | None, str]:
    """(calibration text or None = tokens sampled from the model, held-out text) of a corpus.

    WikiText models calibrate on ``wikitext-2/train.txt`` and are scored on ``test.txt``. The
    TinyStories model (stories260K) has no training split here: it calibrates on tokens sampled from
    itself (the env's default) and is scored on the TinyStories validation stories, whose
    ``<|endoftext|>`` separators ``tokens_from_text`` turns into document boundaries (BOS + story, as
    llama2.c trained it; see ``qenv/eval/tokens.py``). ``work`` is unused, kept for the callers.
    """
    if corpus == "wikitext":
        return str(data_dir / "wikitext-2" / "train.txt"), str(data_dir / "wikitext-2" / "test.txt")
    return None, str(data_dir / "tinystories" / "TinyStories-valid-first1000.txt")


def wait_for_model(spec: str, deadline: float) -> None:
    """A model folder that is being trained appears (renamed into place) when complete."""
    path = Path(spec)
    if spec in ("default",) or spec.endswith(".bin") or not (path.is_absolute() or "/" in spec):
        return
    while not (path / "config.json").is_file():
        if time.time() > deadline:
            raise RuntimeError(f"model folder {spec} did not appear before the deadline")
        time.sleep(2.0)


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------
# worker helpers
# ------------------------------------------------------------------------------------------------
class Recorder:
    """Appends one JSON line per result (flushed at once: a crash loses only the unit in flight)."""

    def __init__(self, path: Path, base: dict[str, Any]) -> None:
        self.path = path
        self.base = base
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **row: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({**self.base, **row, "time": time.time()}, default=_json_default) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def measure(task: Any, held: Any, recipe: Any, budget: float) -> dict[str, Any]:
    """Calibration KL / ppl / top-1 and held-out KL / ppl / top-1 of a recipe (the project's evaluator)."""
    cal = task.evaluator.evaluate(recipe)
    hm = held.evaluate(recipe)
    return {"kl": cal.kl, "calib_ppl": cal.ppl, "top1": cal.top1, "bpw": cal.bpw, "model_mb": cal.model_mb,
            "ppl": hm.ppl, "held_kl": hm.kl, "held_top1": hm.top1, "over_budget": cal.bpw > budget + _TOL}


def menu_use(recipe: Any, menu: Any = None) -> dict[str, Any]:
    """How far a recipe leaves the rule menu (``discrete`` kind's ``DEFAULT_MENU``): its rules per
    layer, the distinct rules, and how many of those (and of the layers) use a rule the menu does
    not list; an agent on the ``rule`` or ``continuous`` kind invents rules, one on the menu cannot."""
    from qenv.envs.spaces import DEFAULT_MENU

    menu = set(DEFAULT_MENU if menu is None else menu)
    rules = dict(recipe.items())
    distinct = set(rules.values())
    return {"rules": {name: rule.to_dict() for name, rule in rules.items()}, "distinct_rules": len(distinct),
            "off_menu_rules": sum(r not in menu for r in distinct),
            "off_menu_layers": sum(r not in menu for r in rules.values())}


def preset_candidates(task: Any, budget: float, family: str) -> list[tuple[str, float]]:
    """Presets of ``family`` that fit the budget, at the widest fitting bit width and the one below."""
    from qenv.quant.presets import preset

    sizes = []
    for bits in PRESET_BITS:
        for group in PRESET_GROUPS:
            name = f"{family}-w{bits}{group}"
            bpw = task.evaluator.size(preset(name, task.layers))[0]
            if bpw <= budget + _TOL:
                sizes.append((name, bpw, bits))
    if not sizes:
        return []
    top = max(b for _, _, b in sizes)
    return [(n, bpw) for n, bpw, b in sizes if b >= top - 1 or b == min(x[2] for x in sizes)]


def prebuild_recipes(task: Any, recipes: list[Any]) -> None:
    """On a GPU, quantize the recipes' (layer, rule) pairs up front in batches (``QuantizedWeights.prebuild``:
    one GPTQ column loop for all layers of a shape instead of one per layer); on a CPU, or when the
    weight cache cannot hold them, they are quantized on demand as the evaluation asks (same weights)."""
    from qenv.errors import QenvError

    weights = task.evaluator.weights
    if task.loaded.device.type != "cuda":
        return
    by_rule: dict[Any, list[str]] = {}
    for recipe in recipes:
        for name, rule in recipe.items():
            by_rule.setdefault(rule, []).append(name)
    for rule, names in by_rule.items():
        try:
            weights.prebuild([rule], names=sorted(set(names)))
        except QenvError:
            return


def best_preset(task: Any, budget: float, family: str) -> tuple[str, Any] | None:
    """(name, recipe) of the family's fitting preset with the lowest calibration KL."""
    from qenv.quant.presets import preset

    best = None
    recipes = [(name, preset(name, task.layers)) for name, _ in preset_candidates(task, budget, family)]
    prebuild_recipes(task, [recipe for _, recipe in recipes])
    for name, recipe in recipes:
        kl = task.evaluator.evaluate(recipe).kl
        if best is None or kl < best[0]:
            best = (kl, name, recipe)
    return None if best is None else (best[1], best[2])


def agent_config_path(agent: str, config: str | None = None) -> Path:
    """The RL method's config: ``--rl-config`` when given, else ``configs/<agent>.yaml``."""
    return Path(config) if config else REPO_ROOT / "configs" / f"{agent}.yaml"


def ppo_hyperparams(n_layers: int, episodes: int, per_rollout: bool = True, agent: str = "ppo",
                    action_kind: str = "residual", config: str | None = None) -> dict[str, Any]:
    """``configs/<agent>.yaml``'s (or ``config``'s) hyperparameters, with on-policy rollouts (PPO's
    family) of whole episodes (k episodes, k dividing N, so that training plays exactly N episodes)
    about as long as the config's 256 steps. ``plan_deviations`` starts a policy at greedy's plan,
    which only the residual kind has: it is left out for every other ``action_kind``."""
    from qenv.cli.config import load_agent_config

    hp = dict(load_agent_config(agent_config_path(agent, config), "QuantLLM-v0").hyperparams)
    if action_kind != "residual":
        hp.pop("plan_deviations", None)
    if per_rollout and "n_steps" in hp:  # off-policy agents (sac, td3, dqn) have no rollouts to size
        target = max(1.0, hp.get("n_steps", 256) / n_layers)
        divisors = [k for k in range(1, episodes + 1) if episodes % k == 0]
        k = min(divisors, key=lambda d: (abs(math.log(d / target)), d))
        hp["n_steps"] = k * n_layers
        hp["batch_size"] = max(16, hp["n_steps"] // 2)
        if hp["n_steps"] % hp["batch_size"] == 1:  # a minibatch of one sample: its advantages normalise to NaN
            hp["batch_size"] = hp["n_steps"]
    return hp


def config_env_kwarg(agent: str, key: str, default: Any, config: str | None = None) -> Any:
    """``configs/<agent>.yaml``'s (or ``config``'s) env_kwargs[key] (``default`` when it sets none
    or has no file)."""
    from qenv.cli.config import load_agent_config

    path = agent_config_path(agent, config)
    if not path.is_file():
        return default
    return load_agent_config(path, "QuantLLM-v0").env_kwargs.get(key, default)


def config_shaping(agent: str, config: str | None = None) -> float:
    """The ``shaping_weight`` in ``configs/<agent>.yaml``'s (or ``config``'s) env_kwargs (0 when it
    sets none or has no file)."""
    return float(config_env_kwarg(agent, "shaping_weight", 0.0, config))


def deadline_callbacks(deadline: float) -> tuple[Any, Any]:
    """(SB3 callback, searcher callback) that stop training/search at the deadline."""
    from stable_baselines3.common.callbacks import BaseCallback

    class Deadline(BaseCallback):
        def _on_step(self) -> bool:
            return time.time() < deadline

    return Deadline(), (lambda searcher: time.time() < deadline)


def common_setup(cfg: dict[str, Any]) -> None:
    import torch

    from qenv.cli.common import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(int(cfg.get("threads", 1)))
    os.environ["QENV_TORCH_THREADS"] = str(int(cfg.get("threads", 1)))


def budget_tag(budget: float | str) -> str:
    """A budget in file and job names: ``3`` for a number, the preset's name for a preset."""
    return budget if isinstance(budget, str) else f"{budget:g}"


def job_budget(model: dict[str, str], cfg: dict[str, Any]) -> tuple[float, str | None]:
    """``(bpw, preset name or None)`` of a job's budget: a preset's exact bpw on this model
    (:func:`qenv.quant.presets.resolve_budget`, the programs' own resolver), a number as it is."""
    from qenv.models.loading import load_model
    from qenv.quant.presets import resolve_budget

    spec = cfg["budget"]
    if not isinstance(spec, str):
        return float(spec), None
    wait_for_model(model["spec"], cfg["deadline"])
    return resolve_budget(spec, load_model(model["spec"], device="cpu").layers)


def make_env(model: dict[str, str], budget: float, cfg: dict[str, Any], work: Path,
             action_kind: str = "discrete", shaping_weight: float = 0.0,
             observation: str = "full", **extra: Any) -> tuple[Any, str]:
    """The model's env (searchers and presets use the menu kind; the RL agent ``cfg['action_kind']``,
    with ``cfg['rl_shaping']`` as its shaping weight, ``cfg['rl_observation']`` as its observation
    and :func:`rl_env_kwargs` as ``extra``: both share one task, i.e. one model, evaluator and
    cache, in the process)."""
    from qenv.cli.envs import make_quant_env

    calib, held_path = corpus_files(model["corpus"], Path(cfg["data_dir"]), work)
    # a caller's own text split (bench/equal_size.py) and menu (menu="gguf" for llama.cpp's mixes)
    calib, held_path = model.get("calib", calib), model.get("held", held_path)
    if cfg.get("menu") is not None:
        extra.setdefault("menu", cfg["menu"])
    if cfg.get("validation_fraction"):  # calibration sequences held back for the searchers' final pick
        extra.setdefault("validation_fraction", cfg["validation_fraction"])
    wait_for_model(model["spec"], cfg["deadline"])
    env = make_quant_env(model=model["spec"], budget_bpw=budget, data=calib, n_tokens=cfg["n_tokens"],
                         seq_len=cfg["seq_len"], batch_size=cfg["batch_size"], device=pick_device(cfg["device"]),
                         dtype=cfg["dtype"], seed=0, cache_dir=cfg["cache_dir"], action_kind=action_kind,
                         weight_cache_gib=cfg.get("weight_cache_gib"), shaping_weight=shaping_weight,
                         observation=observation, **extra)
    return env, held_path


def rl_observation(cfg: dict[str, Any]) -> str:
    """The RL method's observation kind (``--rl-observation``, else its config's, else ``full``)."""
    return str(cfg.get("rl_observation") or "full")


def rl_env_kwargs(cfg: dict[str, Any], evaluation: bool = False) -> dict[str, Any]:
    """The RL method's further env arguments (``--rl-env``, e.g. ``max_deviations`` or
    ``size_weight``); for a zero-shot rollout, ``--transfer-eval-env`` over them (a limit at
    evaluation only)."""
    extra = dict(cfg.get("rl_env") or {})
    if evaluation:
        extra.update(cfg.get("transfer_eval_env") or {})
    return extra


def rl_settings(cfg: dict[str, Any]) -> tuple[str, str]:
    """(agent, action kind) of the RL method (``--rl-agent``, ``--action-kind``)."""
    return str(cfg.get("rl_agent", "ppo")), str(cfg.get("action_kind", "discrete"))


# ------------------------------------------------------------------------------------------------
# worker: one model at one budget
# ------------------------------------------------------------------------------------------------
def quality_job(cfg: dict[str, Any]) -> None:
    from qenv.agents import make_agent, rollout_recipe
    from qenv.agents.base import recipe_of
    from eval_agent import scoring_evaluator
    from qenv.envs.reward import uniform_frontier

    from qenv.quant.presets import preset

    common_setup(cfg)
    model, deadline, episodes = cfg["model"], float(cfg["deadline"]), int(cfg["episodes"])
    budget, budget_preset = job_budget(model, cfg)
    out = Path(cfg["out"])
    rec = Recorder(out / "raw" / f"quality_{model['name']}_{budget_tag(cfg['budget'])}.jsonl",
                   {"kind": "quality", "model": model["name"], "budget": budget, "budget_preset": budget_preset,
                    "menu": cfg.get("menu") or "default"})
    t0 = time.perf_counter()
    env, held_path = make_env(model, budget, cfg, out / "work")
    inner = env.unwrapped
    task = inner.task
    n_layers = len(task.layers)
    held, held_desc = scoring_evaluator(task, [held_path], cfg["held_tokens"], cfg["seq_len"], cfg["batch_size"])
    fp_cal = task.evaluator.evaluate({})
    fp_held = held.evaluate({})
    ref = task.reference(budget)
    held_ref = uniform_frontier(held, budget)
    rec.write(method="meta", n_layers=n_layers, n_params=task.loaded.n_params, device=str(task.loaded.device),
              calib=task.evaluator.tokens.source, calib_tokens=task.evaluator.tokens.n_tokens, held=held_desc,
              episodes=episodes, setup_s=time.perf_counter() - t0, reference=ref.description)
    rec.write(method="fp16", kl=0.0, top1=1.0, calib_ppl=fp_cal.ppl, ppl=fp_held.ppl, held_kl=0.0, held_top1=1.0,
              bpw=16.0, over_budget=True)
    rec.write(method="rtn_frontier", kl=ref.kl, top1=ref.top1, calib_ppl=ref.ppl, ppl=held_ref.ppl,
              held_kl=held_ref.kl, held_top1=held_ref.top1, bpw=budget, over_budget=False, note=ref.description)
    log(f"{model['name']} @ {budget:g}: {n_layers} layers on {task.loaded.device}, setup {time.perf_counter() - t0:.1f}s,"
        f" frontier KL {ref.kl:.4g}")

    skip = [tuple(u) for u in cfg.get("skip", [])]

    def unit(method: str, seed: int | None, fn: Any) -> None:
        if (method, seed) in skip:  # --fill-from: measured by an earlier run
            return
        if time.time() > deadline:
            rec.write(method=method, seed=seed, skipped="deadline")
            return
        t = time.perf_counter()
        try:
            row = fn()
        except Exception as exc:  # one method's failure must not lose the others
            traceback.print_exc()
            rec.write(method=method, seed=seed, error=f"{type(exc).__name__}: {exc}")
            return
        row["wall_s"] = time.perf_counter() - t
        rec.write(method=method, seed=seed, **row)
        log(f"{model['name']} @ {budget:g} {method} seed={seed}: KL {row.get('kl', float('nan')):.4g} "
            f"ppl {row.get('ppl', float('nan')):.4g} bpw {row.get('bpw', float('nan')):.3f} ({row['wall_s']:.1f}s)")

    def family(name: str) -> Any:
        def run() -> dict[str, Any]:
            found = best_preset(task, budget, name)
            if found is None:
                return {"note": "no preset of this family fits the budget", "missing": True}
            return {**measure(task, held, found[1], budget), "preset": found[0]}
        return run

    def llamacpp() -> dict[str, Any]:
        agent = make_agent("llamacpp", env, seed=0)
        recipe, info = agent.search(env)
        return {**measure(task, held, recipe, budget), "preset": info.get("mix", "").lower(), "evals": 1}

    def picked(agent: Any) -> dict[str, Any]:
        """A searcher's budget and, with held-back validation tokens, its final pick's validation KL."""
        info = agent.best_info or {}
        return {"evals": agent.evaluations, "evals_spent": agent.spent, "screenings": agent.screenings,
                "validation_kl": info.get("validation_kl"), "validations": agent.validations,
                "validation_finalists": info.get("validation_finalists")}

    def greedy() -> dict[str, Any]:
        agent = make_agent("greedy", env, seed=0)
        recipe, _ = agent.search(env, total_timesteps=episodes * n_layers)
        return {**measure(task, held, recipe, budget), **picked(agent)}

    def greedy_plan() -> dict[str, Any]:
        """The old one-evaluation greedy: the proxy plan (HAWQ-style on per-layer errors), measured."""
        return {**measure(task, held, task.plan_recipe(task.greedy_plan(budget)), budget), "evals": 1}

    def best_uniform() -> dict[str, Any]:
        """The best uniform menu rule that fits (lowest calibration KL): the bar greedy must clear."""
        agent = make_agent("uniform", env, seed=0)
        recipe, _ = agent.search(env)
        return {**measure(task, held, recipe, budget), "evals": agent.evaluations,
                "rule": sorted({rule.label() for rule in recipe.values()})}

    def best_start() -> dict[str, Any]:
        """The best measured of greedy's plan, the presets and uniform rules that fit (the RL kinds' anchor)."""
        start = task.start_plan(budget)
        return {**measure(task, held, task.plan_recipe(start.candidate.choice), budget),
                "evals": len(start.measured), "start": start.candidate.label}

    sb3_cb, search_cb = deadline_callbacks(deadline)

    def searcher(name: str, seed: int) -> Any:
        def run() -> dict[str, Any]:
            agent = make_agent(name, env, seed=seed)
            agent.learn(episodes * n_layers, callback=search_cb)
            assert agent.best_recipe is not None
            return {**measure(task, held, agent.best_recipe, budget), **picked(agent),
                    "truncated": agent.spent + 1e-9 < episodes}
        return run

    rl_agent, rl_kind = rl_settings(cfg)
    shaping = float(cfg.get("rl_shaping") or 0.0)
    observation = rl_observation(cfg)

    def make_rl_env() -> Any:
        """An env of the RL method's kind, shaping, observation and --rl-env on this task."""
        return make_env(model, budget, cfg, out / "work", rl_kind, shaping_weight=shaping, observation=observation,
                        **rl_env_kwargs(cfg))[0]

    rl_env = env if rl_kind == "discrete" and not shaping and observation == "full" and not rl_env_kwargs(cfg) else \
        make_rl_env()
    eval_envs: list[Any] = []  # rl_eval's second env, for the evaluations during training (made once, when needed)

    def rl_fields() -> dict[str, Any]:
        """What every RL row records of the method's settings."""
        return {"agent": rl_agent, "action_kind": rl_kind, "shaping_weight": rl_env.unwrapped.shaping_weight,
                "observation": rl_env.unwrapped.observation_kind, "rl_env": rl_env_kwargs(cfg)}

    trained: dict[int, Any] = {}  # seed -> the training run's episode tracker (for rl_best); None: it failed

    def ppo(seed: int) -> dict[str, Any]:
        from stable_baselines3.common.callbacks import CallbackList

        from qenv.training.callbacks import QuantEpisodeCallback
        from qenv.training.episodes import EpisodeTracker

        trained[seed] = None  # until the training below has finished
        hp = ppo_hyperparams(n_layers, episodes, agent=rl_agent, action_kind=rl_kind, config=cfg.get("rl_config"))
        agent = make_agent(rl_agent, rl_env, seed=seed, **hp)
        tracker = EpisodeTracker()
        agent.learn(episodes * n_layers, callback=CallbackList([sb3_cb, QuantEpisodeCallback(tracker)]))
        trained[seed] = tracker
        played = agent.num_timesteps / n_layers
        recipe, info = rollout_recipe(agent, rl_env, deterministic=True)
        return {**measure(task, held, recipe_of(info), budget), **menu_use(recipe_of(info)), "evals": played,
                "n_steps": hp.get("n_steps"),
                "truncated": played + 1e-9 < episodes, "clamped_actions": info.get("clamped_actions", 0),
                "plan_deviations": hp.get("plan_deviations"), **rl_fields()}

    def rl_eval(seed: int) -> dict[str, Any]:
        """The RL method trained on N − K episodes, its deterministic rollout evaluated every
        (N − K) / K episodes (``DeterministicEvalCallback``, SB3's EvalCallback habit), and the
        best of those K rollouts reported: N evaluations in all, as the searchers have."""
        from stable_baselines3.common.callbacks import CallbackList

        from qenv.training.evaluation import DeterministicEvalCallback

        points = min(int(cfg.get("rl_eval_points", 8)), max(1, episodes // 2))
        train = episodes - points
        every = -(-train // points)  # whole episodes between evaluations, so at most K of them
        hp = ppo_hyperparams(n_layers, train, agent=rl_agent, action_kind=rl_kind, config=cfg.get("rl_config"))
        agent = make_agent(rl_agent, rl_env, seed=seed, **hp)
        eval_envs[:] = eval_envs or [make_rl_env()]
        evaluator = DeterministicEvalCallback(eval_envs[0], every * n_layers)
        agent.learn(train * n_layers, callback=CallbackList([sb3_cb, evaluator]))
        played = agent.num_timesteps / n_layers
        if evaluator.best is None:
            raise RuntimeError("no evaluation of the policy happened (the deadline stopped its training)")
        info = evaluator.best["infos"][0]
        recipe = recipe_of(info)
        return {**measure(task, held, recipe, budget), **menu_use(recipe),
                "evals": played + len(evaluator.evaluations), "train_episodes": played,
                "eval_points": len(evaluator.evaluations), "best_at_episode": evaluator.best["timesteps"] / n_layers,
                "eval_kls": [e["kl"][0] for e in evaluator.evaluations], "deviations": info.get("deviations"),
                "n_steps": hp.get("n_steps"), "truncated": played + 1e-9 < train,
                "plan_deviations": hp.get("plan_deviations"), **rl_fields()}

    def rl_best(seed: int) -> dict[str, Any]:
        """The best recipe of the N training episodes, measured like the searchers' best."""
        if seed not in trained:
            raise RuntimeError("this seed's RL training did not run here (its ppo row came from an earlier run)")
        tracker = trained.pop(seed)
        if tracker is None:
            raise RuntimeError("this seed's RL training failed (its ppo row has the error)")
        best = tracker.best_recipe()
        if best is None:
            raise RuntimeError("the RL run finished no episode")
        return {**measure(task, held, best, budget), **menu_use(best), "evals": len(tracker),
                "best_episode": tracker.best["n"],
                "episode_kl_min": min(e["kl"] for e in tracker.episodes if e.get("kl") is not None),
                "truncated": len(tracker) < episodes, **rl_fields()}

    for name in cfg.get("presets") or ():  # named presets, measured as they are (bench/equal_size.py)
        unit(f"preset:{name}", None,
             lambda name=name: {**measure(task, held, preset(name, task.layers), budget), "preset": name})
    only = set(cfg.get("methods") or DEFAULT_METHODS)
    for name in ("rtn", "gptq", "awq"):
        if name in only:
            unit(name, None, family(name))
    if "llamacpp" in only:
        unit("llamacpp", None, llamacpp)
    if "greedy_plan" in only:
        unit("greedy_plan", None, greedy_plan)
    if "best_uniform" in only:
        unit("best_uniform", None, best_uniform)
    if "best_start" in only:
        unit("best_start", None, best_start)
    if "greedy" in only:
        unit("greedy", None, greedy)
    for seed in cfg["seeds"]:
        for name in ("random", "evolution"):
            if name in only:
                unit(name, seed, searcher(name, seed))
        if only & {"ppo", "rl_best"} and not {("ppo", seed), ("rl_best", seed)} <= set(skip):
            unit("ppo", seed, lambda seed=seed: ppo(seed))  # one training run gives both rows
            unit("rl_best", seed, lambda seed=seed: rl_best(seed))
        if "rl_eval" in only:
            unit("rl_eval", seed, lambda seed=seed: rl_eval(seed))
    rec.write(method="done", wall_s=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# worker: transfer (PPO on several models, zero-shot on unseen ones)
# ------------------------------------------------------------------------------------------------
def human_baselines(task: Any, held: Any, env: Any, budget: float) -> list[tuple[str, dict[str, Any]]]:
    """The human-designed recipes at or under the budget on one model: the best preset of each
    family, and the llama.cpp-like mix where it fits."""
    from qenv.agents import make_agent

    humans = []
    for fam in FAMILIES:
        found = best_preset(task, budget, fam)
        if found is not None:
            humans.append((found[0], measure(task, held, found[1], budget)))
    mix_agent = make_agent("llamacpp", env, seed=0)
    mix_recipe, mix_info = mix_agent.search(env)
    mix = measure(task, held, mix_recipe, budget)
    if not mix["over_budget"]:
        humans.append((mix_info.get("mix", "llamacpp").lower(), mix))
    return humans


def searched_baselines(task: Any, held: Any, env: Any, budget: float, evals: int) -> dict[str, dict[str, Any]]:
    """Greedy (one evaluation) and, with ``evals`` > 0, random search and evolution (seed 0, that
    many evaluations each) on one model: what a zero-shot policy is compared with."""
    from qenv.agents import make_agent

    out: dict[str, dict[str, Any]] = {}
    n_layers = len(task.layers)
    for name, budget_evals in (("greedy", 1), ("random", evals), ("evolution", evals)):
        if budget_evals < 1:
            continue
        t = time.perf_counter()
        agent = make_agent(name, env, seed=0)
        recipe, _ = agent.search(env, total_timesteps=budget_evals * n_layers)
        out[name] = {**measure(task, held, recipe, budget), "evals": agent.evaluations,
                     "wall_s": time.perf_counter() - t}
    return out


def eval_row(model: dict[str, str], seen: bool, policy: dict[str, Any], info: dict[str, Any],
             humans: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One transfer evaluation: the policy's recipe against the best human recipe (lowest KL)."""
    best_name, best = min(humans, key=lambda h: h[1]["kl"])
    return {"method": "eval", "model": model["name"], "seen": seen, "policy": policy, "best_human": best_name,
            "human": best, "kl_ratio": best["kl"] / max(policy["kl"], 1e-30), "ppl_diff": policy["ppl"] - best["ppl"],
            "top1_diff": policy["top1"] - best["top1"], "clamped_actions": info.get("clamped_actions", 0),
            "deviations": info.get("deviations"),
            "humans": {n: {k: m[k] for k in ("kl", "ppl", "top1", "bpw")} for n, m in humans}}


def policy_file(out: Path, budget: float, seed: int) -> Path:
    """Where a transfer job leaves its trained policy's weights for the evaluation jobs."""
    return out / "work" / f"transfer_{budget:g}_s{seed}.policy.pt"


def transfer_job(cfg: dict[str, Any]) -> None:
    from qenv.agents import make_agent, rollout_recipe
    from qenv.agents.base import recipe_of
    from eval_agent import scoring_evaluator
    from qenv.cli.envs import make_quant_env

    common_setup(cfg)
    budget, seed, deadline = float(cfg["budget"]), int(cfg["seed"]), float(cfg["deadline"])
    out = Path(cfg["out"])
    rec = Recorder(out / "raw" / f"transfer_{budget:g}_s{seed}.jsonl", {"kind": "transfer", "budget": budget,
                                                                        "seed": seed})
    train_models = cfg["train_models"]
    data_dir = Path(cfg["data_dir"])
    corpora = {m["corpus"] for m in train_models}
    if len(corpora) != 1:
        raise SystemExit("transfer training models must share one calibration corpus (one env, one `data`)")
    calib, _ = corpus_files(corpora.pop(), data_dir, out / "work")
    target = policy_file(out, budget, seed)
    try:
        t0 = time.perf_counter()
        for m in train_models:
            wait_for_model(m["spec"], deadline)
        device = pick_device(cfg["device"])
        rl_agent, rl_kind = rl_settings(cfg)
        # --transfer-train-budget: every budget's job trains the one policy at that budget (the same
        # policy per seed: training is deterministic) and its rollouts are at `budget`
        train_budget = float(cfg.get("train_budget") or budget)
        env = make_quant_env(model=[m["spec"] for m in train_models], budget_bpw=train_budget, data=calib,
                             n_tokens=cfg["n_tokens"], seq_len=cfg["seq_len"], batch_size=cfg["batch_size"],
                             device=device, dtype=cfg["dtype"], seed=0, cache_dir=cfg["cache_dir"],
                             weight_cache_gib=cfg.get("weight_cache_gib"), action_kind=rl_kind,
                             shaping_weight=float(cfg.get("rl_shaping") or 0.0), observation=rl_observation(cfg),
                             **rl_env_kwargs(cfg))
        steps = int(cfg["timesteps"])
        hp = ppo_hyperparams(0, 1, per_rollout=False, agent=rl_agent, action_kind=rl_kind,
                             config=cfg.get("rl_config"))
        agent = make_agent(rl_agent, env, seed=seed, **hp)
        # training stops early enough to leave time for the zero-shot evaluations
        sb3_cb, _ = deadline_callbacks(deadline - float(cfg.get("eval_reserve_s", 0.0)))
        t1 = time.perf_counter()
        agent.learn(steps, callback=sb3_cb)
        rec.write(method="train", train_models=[m["name"] for m in train_models], timesteps=agent.num_timesteps,
                  asked_timesteps=steps, truncated=agent.num_timesteps < steps, train_s=time.perf_counter() - t1,
                  setup_s=t1 - t0, device=device, observation=env.unwrapped.observation_kind,
                  agent=rl_agent, action_kind=env.unwrapped.mapper.kind, rl_config=cfg.get("rl_config"),
                  train_budget=train_budget,
                  shaping_weight=env.unwrapped.shaping_weight, rl_env=rl_env_kwargs(cfg),
                  eval_env=rl_env_kwargs(cfg, evaluation=True))
        log(f"transfer {budget:g} s{seed}: trained {agent.num_timesteps} steps in {time.perf_counter() - t1:.0f}s")
        if cfg.get("eval_jobs"):
            import torch

            # the evaluation jobs (one per model, baselines ready) roll this policy out as soon as it appears
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            torch.save(agent.model.policy.state_dict(), tmp)
            os.replace(tmp, target)
            return
    except BaseException:
        if cfg.get("eval_jobs"):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.with_suffix(".failed").write_text(traceback.format_exc())
        raise
    tests = [(m, False) for m in cfg["test_models"]] + [(m, True) for m in train_models]
    for model, seen in tests:
        try:
            tenv, held_path = make_env(model, budget, cfg, out / "work")
            renv = make_env(model, budget, cfg, out / "work", rl_kind, observation=rl_observation(cfg),
                            **rl_env_kwargs(cfg, evaluation=True))[0]
            task = tenv.unwrapped.task
            held, _ = scoring_evaluator(task, [held_path], cfg["held_tokens"], cfg["seq_len"], cfg["batch_size"])
            recipe, info = rollout_recipe(agent, renv, deterministic=True)
            policy = measure(task, held, recipe_of(info), budget)
            row = eval_row(model, seen, policy, info, human_baselines(task, held, tenv, budget))
            row["eval_env"] = rl_env_kwargs(cfg, evaluation=True)
            rec.write(**row)
            log(f"transfer {budget:g} s{seed} -> {model['name']} (seen={seen}): policy KL {policy['kl']:.4g} vs "
                f"{row['best_human']} {row['human']['kl']:.4g}")
        except Exception as exc:
            traceback.print_exc()
            rec.write(method="eval", model=model["name"], seen=seen, error=f"{type(exc).__name__}: {exc}")


def transfer_eval_job(cfg: dict[str, Any]) -> None:
    """Zero-shot evaluation of the transfer policies on one model (``--transfer-eval-jobs``).

    The same measurements as the sequential evaluation at the end of :func:`transfer_job`, in a
    process of its own: it builds the model's env, held-out evaluator and human baselines while
    the policies train, then rolls out each seed's policy (deterministic) as its weights appear.
    """
    import torch

    from qenv.agents import make_agent, rollout_recipe
    from qenv.agents.base import recipe_of
    from eval_agent import scoring_evaluator

    common_setup(cfg)
    budget = float(cfg["budget"])
    model, seen = cfg["model"], bool(cfg["seen"])
    out = Path(cfg["out"])
    rec = Recorder(out / "raw" / f"transfer_{budget:g}_eval_{model['name']}.jsonl",
                   {"kind": "transfer", "budget": budget})
    pending = [int(s) for s in cfg["seeds"]]
    try:
        t0 = time.perf_counter()
        tenv, held_path = make_env(model, budget, cfg, out / "work")
        rl_agent, rl_kind = rl_settings(cfg)
        renv = make_env(model, budget, cfg, out / "work", rl_kind, observation=rl_observation(cfg),
                            **rl_env_kwargs(cfg, evaluation=True))[0]
        task = tenv.unwrapped.task
        held, _ = scoring_evaluator(task, [held_path], cfg["held_tokens"], cfg["seq_len"], cfg["batch_size"])
        humans = human_baselines(task, held, tenv, budget)
        log(f"transfer {budget:g} eval {model['name']}: baselines ready in {time.perf_counter() - t0:.0f}s")
        searched = searched_baselines(task, held, tenv, budget, int(cfg.get("search_evals", 0)))
        log(f"transfer {budget:g} eval {model['name']}: searchers done in {time.perf_counter() - t0:.0f}s")
    except Exception as exc:
        traceback.print_exc()
        for seed in pending:
            rec.write(method="eval", seed=seed, model=model["name"], seen=seen, error=f"{type(exc).__name__}: {exc}")
        return
    hp = ppo_hyperparams(0, 1, per_rollout=False, agent=rl_agent, action_kind=rl_kind,
                             config=cfg.get("rl_config"))
    while pending:
        for seed in list(pending):
            path = policy_file(out, budget, seed)
            if path.with_suffix(".failed").is_file():
                pending.remove(seed)
                rec.write(method="eval", seed=seed, model=model["name"], seen=seen, error="training failed")
                continue
            if not path.is_file():
                continue
            pending.remove(seed)
            try:
                agent = make_agent(rl_agent, renv, seed=seed, **hp)
                agent.model.policy.load_state_dict(torch.load(path, map_location=agent.model.device,
                                                              weights_only=True))
                t1 = time.perf_counter()
                recipe, info = rollout_recipe(agent, renv, deterministic=True)
                policy = measure(task, held, recipe_of(info), budget)
                policy["rollout_s"] = time.perf_counter() - t1
                row = eval_row(model, seen, policy, info, humans)
                row["searched"] = searched
                row["eval_env"] = rl_env_kwargs(cfg, evaluation=True)
                rec.write(seed=seed, **row)
                log(f"transfer {budget:g} s{seed} -> {model['name']} (seen={seen}): policy KL {policy['kl']:.4g} vs "
                    f"{row['best_human']} {row['human']['kl']:.4g}")
            except Exception as exc:
                traceback.print_exc()
                rec.write(method="eval", seed=seed, model=model["name"], seen=seen,
                          error=f"{type(exc).__name__}: {exc}")
        if pending:
            time.sleep(1.0)


# ------------------------------------------------------------------------------------------------
# orchestration
# ------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    (out / "raw").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir).resolve()
    start = time.time()
    deadline = start + args.deadline_s
    models = [resolve_model(m, data_dir) for m in args.models]
    base = {"data_dir": str(data_dir), "out": str(out), "deadline": deadline, "device": args.device,
            "dtype": args.dtype,
            "n_tokens": args.n_tokens, "seq_len": args.seq_len, "batch_size": args.batch_size,
            "held_tokens": args.held_tokens, "cache_dir": str(Path(args.cache_dir).resolve()), "threads": 1,
            "rl_agent": args.rl_agent, "action_kind": args.action_kind, "rl_config": args.rl_config,
            "rl_shaping": args.rl_shaping if args.rl_shaping is not None else config_shaping(args.rl_agent,
                                                                                             args.rl_config),
            "rl_observation": args.rl_observation or str(config_env_kwarg(args.rl_agent, "observation", "full",
                                                                          args.rl_config)),
            "rl_env": args.rl_env, "transfer_eval_env": args.transfer_eval_env, "methods": args.methods,
            "search_evals": args.transfer_search_evals, "weight_cache_gib": args.weight_cache_gib,
            "rl_eval_points": args.rl_eval_points}
    jobs: list[tuple[str, dict[str, Any]]] = []
    done = completed_units(args.fill_from) if args.fill_from else set()
    for model in models:
        for budget in args.budgets:
            selected = set(args.methods or DEFAULT_METHODS)
            units = [(m, None) for m in ("rtn", "gptq", "awq", "llamacpp", "greedy") if m in selected]
            units += [(m, s) for s in args.seeds for m in SEEDED if m in selected]
            # --fill-from matches numbers; a preset's size is known only in its job
            skip = [] if isinstance(budget, str) else [[m, s] for m, s in units if (model["name"], float(budget), m, s)
                                                       in done]
            if units and len(skip) == len(units):
                continue  # --fill-from: every unit of this cell is already measured
            jobs.append((f"quality_{model['name']}_{budget_tag(budget)}", {**base, "job": "quality", "model": model,
                                                                  "budget": budget, "seeds": args.seeds,
                                                                  "episodes": args.episodes, "skip": skip}))
    if args.transfer_train and args.transfer_test:
        train = [resolve_model(m, data_dir) for m in args.transfer_train]
        test = [resolve_model(m, data_dir) for m in args.transfer_test]
        for budget in args.transfer_budgets:
            for seed in args.transfer_seeds:
                jobs.append((f"transfer_{budget:g}_s{seed}", {**base, "job": "transfer", "budget": budget,
                                                              "seed": seed, "train_models": train,
                                                              "test_models": test,
                                                              "timesteps": args.transfer_timesteps,
                                                              "eval_reserve_s": args.transfer_eval_reserve_s,
                                                              "eval_jobs": args.transfer_eval_jobs,
                                                              "train_budget": args.transfer_train_budget}))
            if args.transfer_eval_jobs:
                seen_too = [(m, True) for m in train] if args.transfer_eval_seen else []
                for model, seen in [(m, False) for m in test] + seen_too:
                    jobs.append((f"transfer_{budget:g}_eval_{model['name']}",
                                 {**base, "job": "transfer_eval", "budget": budget, "model": model, "seen": seen,
                                  "seeds": args.transfer_seeds}))
    settings = {"command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]), "args": vars(args), "start": start,
                "models": models}
    (out / "raw" / "settings.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
    procs: dict[str, tuple[subprocess.Popen, Any]] = {}
    pending = list(jobs)

    def launch(name: str, cfg: dict[str, Any]) -> None:
        spec = out / "logs" / f"{name}.json"
        spec.write_text(json.dumps(cfg, default=str))
        handle = open(out / "logs" / f"{name}.log", "w")
        cmd = [sys.executable, str(Path(__file__).resolve()), "worker", str(spec)]
        procs[name] = (subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
                                        preexec_fn=(lambda: os.nice(args.nice)) if args.nice else None,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                                             "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}), handle)

    log(f"{len(jobs)} jobs, at most {args.max_procs} at once, deadline in {args.deadline_s:.0f}s")
    hard = deadline + args.grace_s
    gpu = pick_device(args.device) if args.device else "cpu"
    queued_note = [False]

    def gpu_room() -> bool:
        """On a GPU shared by the workers: room for one more (else it queues, said once per wait)."""
        if not gpu.startswith("cuda") or not procs:
            return True
        import torch

        from qenv.memory import available_memory, gib

        free = available_memory(torch.device(gpu))
        if free is None or free >= args.worker_gpu_gib * 2**30:
            queued_note[0] = False
            return True
        if not queued_note[0]:
            log(f"{len(pending)} job(s) queued: {gib(free)} of GPU memory free, a worker starts with "
                f"{args.worker_gpu_gib:g} GiB (--worker-gpu-gib)")
            queued_note[0] = True
        return False

    while pending or procs:
        while pending and len(procs) < args.max_procs and gpu_room():
            launch(*pending.pop(0))
        for name, (proc, handle) in list(procs.items()):
            if proc.poll() is not None:
                handle.close()
                log(f"job {name} ended with code {proc.returncode} ({time.time() - start:.0f}s)")
                del procs[name]
        if time.time() > hard:
            for name, (proc, handle) in procs.items():
                log(f"job {name} still running at the hard deadline: stopped")
                proc.send_signal(signal.SIGTERM)
            time.sleep(3)
            for name, (proc, handle) in procs.items():
                if proc.poll() is None:
                    proc.kill()
                handle.close()
            procs.clear()
            break
        time.sleep(1.0)
    for name, _ in pending:
        log(f"job {name} never started")
    log(f"all jobs done in {time.time() - start:.0f}s; writing the report")
    return report(args)


def worker(spec_path: str) -> int:
    cfg = json.loads(Path(spec_path).read_text())
    if cfg["job"] == "quality":
        quality_job(cfg)
    elif cfg["job"] == "transfer_eval":
        transfer_eval_job(cfg)
    else:
        transfer_job(cfg)
    return 0


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    if all(v == values[0] for v in values):  # seeds that agree: their value, not a mean an ulp off it
        return float(values[0]), 0.0
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


#: relative margin below which two KLs count as equal when the report says who beats whom
SAME_KL = 1e-9


def lower(a: float, b: float) -> bool:
    """``a`` is a lower KL than ``b`` by more than float noise (a mean of equal recipes is no win)."""
    return a < b - SAME_KL * abs(b)


def load_rows(out: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted((out / "raw").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def _unit_key(r: dict[str, Any]) -> tuple:
    return (r.get("kind"), r.get("model"), r.get("budget"), r.get("method"), r.get("seed"))


def _fp_signature(rows: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per model: the full-precision calibration and held-out perplexity a run measured. Two runs
    with different numbers measured different weights (e.g. a bench model trained again)."""
    return {r["model"]: (float(r["calib_ppl"]), float(r["ppl"])) for r in rows
            if r.get("kind") == "quality" and r.get("method") == "fp16" and "calib_ppl" in r}


def merge_runs(runs: list[list[dict[str, Any]]], notes: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of several runs of the same settings (a later run filling what an earlier one missed).

    Per (model, budget, method, seed) the first complete result wins; a later run's complete result
    replaces an earlier truncated one; skipped or failed entries are dropped where a result exists.
    Seeded methods are deterministic per seed, so a unit measured twice gives the same numbers.

    A later run's quality rows of a model are left out when its full-precision perplexities differ
    from the first run's: they measured another instance of the model (a bench model trained
    again) and cannot fill its cells. Transfer rows are merged per (budget, seed): the first run
    whose training finished (not truncated) supplies that seed's training and evaluations, else
    the run whose training got furthest (the first of equals); a later run whose training of
    that (budget, seed) was complete and as long (the same policy: training is deterministic)
    fills the zero-shot evaluations of models the chosen run lacks (one cut short by its
    deadline). What is left out or filled is described in ``notes``.
    """
    notes = [] if notes is None else notes
    chosen: dict[tuple, dict[str, Any]] = {}
    other: list[dict[str, Any]] = []
    meta_seen: set[tuple] = set()
    first_fp: dict[str, tuple[float, float, int]] = {}
    for index, rows in enumerate(runs):
        for model, sig in _fp_signature(rows).items():
            first_fp.setdefault(model, (*sig, index))
    transfer_run: dict[tuple, tuple[int, bool, int]] = {}
    for index, rows in enumerate(runs):
        for r in rows:
            if r.get("kind") == "transfer" and r.get("method") == "train":
                key, cut, steps = (r["budget"], r["seed"]), bool(r.get("truncated")), int(r.get("timesteps", 0))
                old = transfer_run.get(key)
                if old is None or (old[1] and (not cut or steps > old[2])):
                    transfer_run[key] = (index, cut, steps)
    # a run whose training of (budget, seed) was complete and as long as the chosen run's trained the same
    # policy (training is deterministic): its zero-shot rows fill models the chosen run did not evaluate
    trained_as: dict[tuple, dict[int, str]] = {}
    evaluated: dict[tuple, set] = {}

    def training(r: dict[str, Any]) -> str:  # what makes two trainings the same: length, zoo and env settings
        keys = ("timesteps", "train_models", "observation", "shaping_weight", "rl_env", "eval_env", "train_budget")
        return json.dumps({k: r.get(k) for k in keys}, sort_keys=True, default=str)

    for index, rows in enumerate(runs):
        for r in rows:
            if r.get("kind") == "transfer" and r.get("method") == "train" and not r.get("truncated"):
                trained_as.setdefault((r["budget"], r["seed"]), {})[index] = training(r)
            elif r.get("kind") == "transfer" and r.get("method") == "eval" and "policy" in r and "error" not in r:
                key = (r.get("budget"), r.get("seed"))
                if key in transfer_run and transfer_run[key][0] == index:
                    evaluated.setdefault(key, set()).add((r.get("model"), bool(r.get("seen"))))
    for index, rows in enumerate(runs):
        sig = _fp_signature(rows)
        foreign = {m for m, v in sig.items() if m in first_fp and first_fp[m][2] != index
                   and v != first_fp[m][:2]}
        for m in sorted(foreign):
            notes.append(f"run {index}: quality rows of {m} left out: another instance of the model (full-precision "
                         f"calibration / held-out ppl {sig[m][0]:.6g} / {sig[m][1]:.6g}, run {first_fp[m][2]}: "
                         f"{first_fp[m][0]:.6g} / {first_fp[m][1]:.6g})")
        dropped = set()
        for r in rows:
            r = {**r, "run": index}
            if r.get("kind") == "quality" and r.get("model") in foreign:
                continue
            if r.get("kind") == "transfer":
                key = (r.get("budget"), r.get("seed"))
                if key in transfer_run and transfer_run[key][0] != index:
                    chosen_run, cut, steps = transfer_run[key]
                    cell = (r.get("model"), bool(r.get("seen")))
                    same = trained_as.get(key, {})
                    if (r.get("method") == "eval" and "policy" in r and "error" not in r and not cut
                            and index in same and same.get(index) == same.get(chosen_run)
                            and cell not in evaluated.setdefault(key, set())):
                        evaluated[key].add(cell)
                        other.append(r)
                        notes.append(f"run {index}: zero-shot rows of {cell[0]} at budget {r.get('budget'):g} seed "
                                     f"{r.get('seed')} kept: the same complete training as run {chosen_run}'s, "
                                     "which did not evaluate it")
                        continue
                    dropped.add(key)
                    continue
                other.append(r)
            elif r.get("kind") == "quality" and "kl" in r:
                key = _unit_key(r)
                old = chosen.get(key)
                if old is None or (old.get("truncated") and not r.get("truncated")):
                    chosen[key] = r
            elif r.get("kind") == "quality" and r.get("method") == "meta":
                if (r["model"], r["budget"]) not in meta_seen:
                    meta_seen.add((r["model"], r["budget"]))
                    other.append(r)
            elif r.get("kind") != "quality" or r.get("method") != "done":
                other.append(r)
        for budget, seed in sorted(dropped, key=str):
            notes.append(f"run {index}: transfer rows of budget {budget:g} seed {seed} left out: run "
                         f"{transfer_run[(budget, seed)][0]} has that seed's "
                         f"{'complete' if not transfer_run[(budget, seed)][1] else 'longest'} training")
    other = [r for r in other if not ((r.get("error") or r.get("skipped")) and _unit_key(r) in chosen)]
    return other + list(chosen.values())


def completed_units(run_dirs: list[str]) -> set[tuple]:
    """(model, budget, method, seed) of the quality units that ``run_dirs`` (merged) completed."""
    rows = merge_runs([load_rows(Path(d)) for d in run_dirs])
    return {(r["model"], float(r["budget"]), r["method"], r.get("seed")) for r in rows
            if r.get("kind") == "quality" and "kl" in r and not r.get("truncated")}


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (model, budget, method): mean ± std over complete seeded runs (or the single value)."""
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("kind") != "quality":
            continue
        key = f"{r['budget']:g}"
        if r["method"] == "meta":
            meta.setdefault(r["model"], {})[key] = r
            continue
        if r["method"] == "done" or "kl" not in r:
            if r.get("error") or r.get("skipped"):
                cell = cells.setdefault(r["model"], {}).setdefault(key, {}).setdefault(r["method"], {"runs": []})
                cell.setdefault("problems", []).append(r.get("error") or f"skipped ({r['skipped']})")
            continue
        cell = cells.setdefault(r["model"], {}).setdefault(key, {}).setdefault(r["method"], {"runs": []})
        cell["runs"].append(r)
    for model, budgets in cells.items():
        for key, methods in budgets.items():
            for method, cell in methods.items():
                runs = cell["runs"]
                full = [r for r in runs if not r.get("truncated")]
                use = full or runs
                cell["n"] = len(use)
                cell["n_truncated"] = len(runs) - len(full)
                cell["truncated_only"] = bool(runs) and not full
                for metric in ("kl", "ppl", "top1", "bpw", "held_kl", "held_top1", "calib_ppl", "wall_s", "evals"):
                    vals = [float(r[metric]) for r in use if r.get(metric) is not None]
                    cell[metric] = _mean_std(vals) if vals else (math.nan, math.nan)
                cell["over_budget"] = any(r.get("over_budget") for r in use)
                cell["preset"] = sorted({r["preset"] for r in use if r.get("preset")})
    return {"cells": cells, "meta": meta}


def fmt_num(value: float, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "nan"
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.001:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def cell_text(cell: dict[str, Any] | None, method: str) -> str:
    if not cell or not cell.get("runs"):
        if cell and cell.get("problems"):
            return "failed: " + cell["problems"][0][:60]
        return "—"
    kl, ppl, top1 = cell["kl"], cell["ppl"], cell["top1"]
    if method in SEEDED and cell["n"] > 1:
        text = (f"{fmt_num(kl[0])} ± {fmt_num(kl[1], 2)} / {ppl[0]:.2f} ± {ppl[1]:.2f} / "
                f"{top1[0]:.3f} ± {top1[1]:.3f}")
    else:
        text = f"{fmt_num(kl[0])} / {ppl[0]:.2f} / {top1[0]:.3f}"
    extra = []
    if cell.get("preset"):
        extra.append(",".join(cell["preset"]))
    if method not in ("rtn_frontier", "fp16"):
        extra.append(f"{cell['bpw'][0]:.2f} bpw")
    if method in SEEDED:
        extra.append(f"n={cell['n']}")
    if cell.get("truncated_only"):
        extra.append(f"cut short at {cell['evals'][0]:.0f} evals")
    text += " (" + ", ".join(extra) + ")" if extra else ""
    if cell.get("over_budget") and method not in ("fp16",):
        text = "**over budget** " + text
    return text


def headline(agg: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model and budget: the best searched method vs the best human preset within the budget."""
    out = []
    for model, budgets in agg["cells"].items():
        for key, methods in sorted(budgets.items(), key=lambda kv: float(kv[0])):
            humans = [(m, methods[m]) for m in HUMAN if m in methods and methods[m].get("runs")
                      and not methods[m]["over_budget"]]
            searched = [(m, methods[m]) for m in SEARCHED if m in methods and methods[m].get("runs")]
            if not humans or not searched:
                continue
            h_name, h = min(humans, key=lambda x: x[1]["kl"][0])
            s_name, s = min(searched, key=lambda x: x[1]["kl"][0])
            ppo = methods.get("ppo")
            out.append({"model": model, "budget": float(key), "best_human": h_name,
                        "best_human_preset": ",".join(h["preset"]), "human_kl": h["kl"][0], "human_ppl": h["ppl"][0],
                        "best_searched": s_name, "searched_kl": s["kl"][0], "searched_ppl": s["ppl"][0],
                        "kl_ratio": h["kl"][0] / max(s["kl"][0], 1e-30),
                        "ppo_kl_ratio": (h["kl"][0] / max(ppo["kl"][0], 1e-30)) if ppo and ppo.get("runs") else None,
                        "frontier_kl": methods.get("rtn_frontier", {}).get("kl", (math.nan,))[0]})
    return out


def transfer_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    evals: dict[tuple, list[dict[str, Any]]] = {}
    trains = {}
    for r in rows:
        if r.get("kind") != "transfer":
            continue
        if r["method"] == "train":
            trains[(r["budget"], r["seed"])] = r
        elif r["method"] == "eval" and "policy" in r:
            evals.setdefault((r["model"], r["budget"], r["seen"]), []).append(r)
    out = []
    for (model, budget, seen), rs in sorted(evals.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        ratios = [r["kl_ratio"] for r in rs]
        out.append({"model": model, "budget": budget, "seen": seen, "seeds": [r["seed"] for r in rs],
                    "policy_kl": _mean_std([r["policy"]["kl"] for r in rs]),
                    "policy_ppl": _mean_std([r["policy"]["ppl"] for r in rs]),
                    "policy_top1": _mean_std([r["policy"]["top1"] for r in rs]),
                    "policy_bpw": _mean_std([r["policy"]["bpw"] for r in rs]),
                    "best_human": sorted({r["best_human"] for r in rs}), "human_kl": rs[0]["human"]["kl"],
                    "human_ppl": rs[0]["human"]["ppl"], "human_top1": rs[0]["human"]["top1"],
                    "human_bpw": rs[0]["human"]["bpw"], "kl_ratio": _mean_std(ratios),
                    "log_kl_gain": _mean_std([math.log(x) for x in ratios]),
                    "ppl_diff": _mean_std([r["ppl_diff"] for r in rs]),
                    "train": [trains.get((budget, s)) for s in [r["seed"] for r in rs]],
                    "searched": {k: {m: v[m] for m in ("kl", "ppl", "top1", "bpw", "evals") if m in v}
                                 for k, v in (rs[0].get("searched") or {}).items()},
                    "train_timesteps": _mean_std([trains[(budget, s)]["timesteps"] for s in [r["seed"] for r in rs]
                                                  if (budget, s) in trains])})
    return out


def transfer_markdown(transfer: list[dict[str, Any]]) -> list[str]:
    """Markdown: each zero-shot rollout beside the best human recipe at or under the budget (its bpw
    shown) and greedy, random search and evolution on the same model (calibration KL, all at or under
    the budget), then how many unseen-model cells the policy wins against each (strictly lower KL)."""
    md = ["### Transfer (RL policy, deterministic zero-shot rollout)\n",
          "| model | seen in training | budget | policy KL / ppl / top1 (bpw) | best human at or under budget "
          "(KL / ppl / top1, bpw) | human KL / policy KL | ppl policy − human | greedy KL (bpw) | "
          "random KL (evals) | evolution KL (evals) | policy vs greedy |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    tally = {"greedy": [0, 0], "human": [0, 0], "human_3plus": [0, 0], "random": [0, 0], "evolution": [0, 0]}

    def count(key: str, won: bool) -> None:
        tally[key][0] += int(won)
        tally[key][1] += 1

    for t in transfer:
        n = len(t["seeds"])
        pm = lambda v: f"{fmt_num(v[0])} ± {fmt_num(v[1], 2)}" if n > 1 else fmt_num(v[0])  # noqa: E731
        searched = t.get("searched") or {}
        cols = []
        for name in ("greedy", "random", "evolution"):
            m = searched.get(name)
            if m is None:
                cols.append("—")
                continue
            extra = f"{m['bpw']:.2f}" if name == "greedy" else str(m.get("evals", ""))
            cols.append(f"{fmt_num(m['kl'])} ({extra})" if extra else fmt_num(m["kl"]))
        kl = t["policy_kl"][0]
        g = searched.get("greedy")
        versus = "—" if g is None else ("**better**" if lower(kl, g["kl"]) else "worse" if lower(g["kl"], kl) else "same")
        if versus != "—":
            versus += f" ({g['kl'] / max(kl, 1e-30):.2f}x)"
        md.append(f"| {t['model']} | {'yes' if t['seen'] else '**no**'} | {t['budget']:g} | {pm(t['policy_kl'])} / "
                  f"{t['policy_ppl'][0]:.2f} / {t['policy_top1'][0]:.3f} ({t['policy_bpw'][0]:.2f}) | "
                  f"{','.join(t['best_human'])}: {fmt_num(t['human_kl'])} / {t['human_ppl']:.2f} / "
                  f"{t['human_top1']:.3f} ({t['human_bpw']:.2f}) | {pm(t['kl_ratio'])} | "
                  f"{t['ppl_diff'][0]:+.3g} | {' | '.join(cols)} | {versus} |")
        if t["seen"]:
            continue
        for name in ("greedy", "random", "evolution"):
            if name in searched:
                count(name, lower(kl, searched[name]["kl"]))
        count("human", lower(kl, t["human_kl"]))
        if t["budget"] >= 3.0:
            count("human_3plus", lower(kl, t["human_kl"]))
    steps = transfer[0]["train_timesteps"]
    fixed = sorted({r["train_budget"] for t in transfer for r in t.get("train") or []
                    if r and r.get("train_budget") is not None and r["train_budget"] != t["budget"]})
    where = f" at {', '.join(f'{b:g}' for b in fixed)} bpw (one policy for every budget)" if fixed else \
        " at each budget"
    md.append(f"\n(n = {len(transfer[0]['seeds'])} seeds, mean ± std where n > 1; trained "
              f"{steps[0]:.0f} ± {steps[1]:.0f} timesteps{where}; searchers seed 0)\n")
    words = {"greedy": "greedy", "random": "random search", "evolution": "evolution",
             "human": "the best human recipe at or under the budget",
             "human_3plus": "the best human recipe at or under the budget, at 3.0 bpw and above"}
    for key, (won, total) in tally.items():
        if total:
            md.append(f"- unseen models: the policy beats {words[key]} in {won}/{total} cells")
    md.append("")
    return md


#: the RL method's rows of one training run each (rl_eval: its own run), as the report names them
RL_ROWS = {"ppo": "RL deterministic rollout", "rl_best": "RL best training episode",
           "rl_eval": "RL best of K evaluated rollouts"}


def rl_vs_searchers(agg: dict[str, Any]) -> list[str]:
    """Markdown: per cell, the RL run's deterministic rollout (ppo), its best training episode
    (rl_best) and the best of K deterministic rollouts evaluated during a training run of N − K
    episodes (rl_eval), those that ran, against greedy, random search and evolution (mean
    calibration KL over the seeds), and how many cells each RL row wins (lower mean KL by more than
    float noise, :func:`lower`)."""
    rl = tuple(m for m in RL_ROWS if any(m in budgets[k] for budgets in agg["cells"].values() for k in budgets))
    # per RL row and opponent: [cells won, cells where both ran]
    rows, wins = [], {m: {o: [0, 0] for o in ("greedy", "random", "evolution")} for m in rl}
    evo_close: dict[str, list[bool]] = {m: [] for m in rl}
    for model, budgets in agg["cells"].items():
        for key in sorted(budgets, key=float):
            methods = budgets[key]
            kl = {m: methods[m]["kl"] for m in ("greedy", "random", "evolution", *rl)
                  if methods.get(m, {}).get("runs")}
            if not any(m in kl for m in rl):
                continue
            text = []
            for m in rl:
                if m not in kl:
                    text.append("—")
                    continue
                beaten = [o for o in ("greedy", "random", "evolution") if o in kl and lower(kl[m][0], kl[o][0])]
                for o in ("greedy", "random", "evolution"):
                    if o in kl:
                        wins[m][o][0] += o in beaten
                        wins[m][o][1] += 1
                if float(key) == 3.0 and "evolution" in kl:
                    evo_close[m].append(kl[m][0] <= 1.05 * kl["evolution"][0])
                text.append(f"{fmt_num(kl[m][0])} ± {fmt_num(kl[m][1], 2)} (beats {', '.join(beaten) or 'none'})")
            cells = [fmt_num(kl[o][0]) + (f" ± {fmt_num(kl[o][1], 2)}" if o != "greedy" else "") if o in kl else "—"
                     for o in ("greedy", "random", "evolution")]
            rows.append(f"| {model} | {key} | " + " | ".join(text + cells) + " |")
    if not rows:
        return []
    out = ["### RL against the searchers (calibration KL, mean ± std over seeds; same N evaluations)\n",
           "| model | budget | " + " | ".join(f"{RL_ROWS[m]} ({m})" for m in rl) + " | greedy | random | evolution |",
           "|---|---|" + "---|" * (len(rl) + 3), *rows, ""]
    for m in rl:
        w = wins[m]
        close = evo_close[m]
        out.append(f"- {m}: beats random in {w['random'][0]}/{w['random'][1]} cells, greedy in "
                   f"{w['greedy'][0]}/{w['greedy'][1]}, evolution in {w['evolution'][0]}/{w['evolution'][1]}; at 3.0 "
                   f"bpw within 5% of evolution's KL (or better) in {sum(close)}/{len(close)}")
    out.append("")
    return out


def pareto_png(path: Path, model: str, budgets: dict[str, dict[str, Any]]) -> None:
    from matplotlib.figure import Figure

    from qenv.training.plots import save_figure

    fig = Figure(figsize=(7.0, 4.6), dpi=90)
    ax = fig.add_subplot()
    styles = {"rtn": ("o", "tab:blue"), "gptq": ("s", "tab:cyan"), "awq": ("D", "tab:purple"),
              "llamacpp": ("P", "tab:brown"), "greedy": ("v", "tab:orange"), "random": ("^", "tab:gray"),
              "evolution": ("X", "tab:green"), "ppo": ("*", "tab:red"), "rl_best": ("h", "tab:pink"),
              "rl_eval": ("p", "tab:olive")}
    keys = sorted(budgets, key=float)
    front = [(float(k), budgets[k]["rtn_frontier"]["kl"][0]) for k in keys
             if budgets[k].get("rtn_frontier", {}).get("runs")]
    if front:
        ax.plot([x for x, _ in front], [y for _, y in front], "--", color="black", linewidth=1,
                label="uniform RTN frontier (env reference)")
    for method, (marker, color) in styles.items():
        xs, ys, xe, ye = [], [], [], []
        for k in keys:
            cell = budgets[k].get(method)
            if not cell or not cell.get("runs") or not cell["kl"][0] > 0:
                continue
            xs.append(cell["bpw"][0])
            ys.append(cell["kl"][0])
            xe.append(cell["bpw"][1])
            ye.append(cell["kl"][1])
        if xs:
            if method in SEEDED:
                ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt=marker, color=color, markersize=8 if method == "ppo" else 6,
                            capsize=2, label=f"{method} (mean ± std)", markeredgecolor="black", markeredgewidth=0.4)
            else:
                ax.scatter(xs, ys, marker=marker, color=color, s=45, label=method, edgecolor="black", linewidth=0.4)
    for k in keys:
        ax.axvline(float(k), color="gray", linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantized layers)")
    ax.set_ylabel("KL(fp || quantized), calibration tokens")
    ax.set_title(f"{model}: KL vs bits per weight (dotted: budgets)", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    save_figure(fig, path)


def report(args: argparse.Namespace) -> int:
    from qenv.quant.presets import budget_label

    out = Path(args.out).resolve()
    run_dirs = [Path(d).resolve() for d in (getattr(args, "runs", None) or [out])]
    notes: list[str] = []
    rows = merge_runs([load_rows(d) for d in run_dirs], notes)
    agg = aggregate(rows)
    heads = headline(agg)
    transfer = transfer_summary(rows)
    settings, bench_models, machine, per_run = [], {}, {}, []
    for d in run_dirs:
        path = d / "raw" / "settings.json"
        settings.append(json.loads(path.read_text()) if path.is_file() else {})
        trained = {stats.stem: json.loads(stats.read_text()) for stats in sorted((d / "train").glob("*.json"))}
        for name, stats in trained.items():
            bench_models.setdefault(name, stats)
        if (d / "machine.txt").is_file():
            machine.setdefault("machine", (d / "machine.txt").read_text())
        per_run.append({"folder": str(d), "bench_models": trained,
                        "machine": (d / "machine.txt").read_text() if (d / "machine.txt").is_file() else None})
    result = {"settings": settings, "machine": machine.get("machine"), "bench_models": bench_models,
              "runs": per_run, "merge_notes": notes,
              "meta": agg["meta"], "cells": agg["cells"], "headline": heads, "transfer": transfer}
    out.mkdir(parents=True, exist_ok=True)
    for cells in result["cells"].values():
        for methods in cells.values():
            for cell in methods.values():
                for r in cell["runs"]:
                    r.pop("time", None)
    (out / "quality_results.json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")

    buf = io.StringIO()
    cols = ["model", "budget", "method", "seed", "preset", "kl", "ppl", "top1", "bpw", "over_budget", "held_kl",
            "held_top1", "calib_ppl", "evals", "truncated", "wall_s", "error"]
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        if r.get("kind") == "quality" and r["method"] not in ("meta", "done"):
            writer.writerow(r)
    (out / "quality_results.csv").write_text(buf.getvalue())

    md = []
    for model, budgets in agg["cells"].items():
        keys = sorted(budgets, key=float)
        meta = next(iter(agg["meta"].get(model, {}).values()), {})
        md.append(f"### {model}\n")
        if meta:
            md.append(f"{meta.get('n_params', 0):,} parameters, {meta.get('n_layers')} quantized layers, on "
                      f"{meta.get('device')}; calibration: {meta.get('calib_tokens')} tokens ({meta.get('calib')}); "
                      f"held-out: {meta.get('held')}; N = {meta.get('episodes')} evaluations per search.\n")
        named = {k: agg["meta"].get(model, {}).get(k, {}).get("budget_preset") for k in keys}
        md.append("| method | " + " | ".join(budget_label(float(k), named[k]) for k in keys) + " |")
        md.append("|---|" + "---|" * len(keys))
        for method in METHOD_ORDER:
            if not any(method in budgets[k] for k in keys):
                continue
            md.append(f"| {METHOD_LABEL[method]} | " + " | ".join(cell_text(budgets[k].get(method), method)
                                                                  for k in keys) + " |")
        md.append("")
        try:
            pareto_png(out / f"quality_pareto_{model}.png", model, budgets)
        except Exception:
            traceback.print_exc()
    md.extend(rl_vs_searchers(agg))
    md.append("### Best searched vs best human-designed recipe within the budget (calibration KL)\n")
    md.append("| model | budget | best human (KL, ppl) | best searched (KL, ppl) | human KL / searched KL | "
              "human KL / PPO KL |")
    md.append("|---|---|---|---|---|---|")
    for h in heads:
        ppo = "—" if h["ppo_kl_ratio"] is None else f"{h['ppo_kl_ratio']:.3g}"
        md.append(f"| {h['model']} | {h['budget']:g} | {h['best_human']} {h['best_human_preset']} "
                  f"({fmt_num(h['human_kl'])}, {h['human_ppl']:.2f}) | {h['best_searched']} "
                  f"({fmt_num(h['searched_kl'])}, {h['searched_ppl']:.2f}) | {h['kl_ratio']:.3g} | {ppo} |")
    md.append("")
    if transfer:
        md.extend(transfer_markdown(transfer))
    if notes:
        md.append("### Merge notes\n")
        md.extend(f"- {n}" for n in notes)
        md.append("")
    problems = [r for r in rows if r.get("error")]
    if problems:
        md.append("### Failures\n")
        for r in problems:
            md.append(f"- {r.get('model', '')} {r.get('budget', '')} {r['method']} seed={r.get('seed')}: "
                      f"{r['error'][:200]}")
        md.append("")
    (out / "quality_tables.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from qenv.quant.presets import parse_budget

    p = argparse.ArgumentParser(description="qenv quality benchmark (issue 5, part 2)")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the benchmark (workers in parallel), then the report")
    r.add_argument("--models", nargs="*", default=["stories260K", "default"],
                   help="stories260K, default, NAME=FOLDER or a model folder")
    r.add_argument("--budgets", nargs="+", type=parse_budget, default=[2.5, 3.0, 3.5, 4.0],
                   help="bits per weight, or presets' names (gptq-w4: that preset's exact bpw on each model)")
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--episodes", type=int, default=128, help="N: evaluations per search = PPO training episodes")
    r.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder with wikitext-2/, tinystories/, stories260K/")
    r.add_argument("--out", required=True)
    r.add_argument("--cache-dir", default=None, help="qenv cache (default <out>/cache)")
    r.add_argument("--device", default="auto", help="where the models run (auto: cuda if present)")
    r.add_argument("--dtype", default="float32", help="model dtype during quantization and scoring")
    r.add_argument("--n-tokens", type=int, default=4096, help="calibration tokens")
    r.add_argument("--held-tokens", type=int, default=16384, help="held-out tokens")
    r.add_argument("--seq-len", type=int, default=128)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--transfer-train", nargs="*", default=[])
    r.add_argument("--transfer-test", nargs="*", default=[])
    r.add_argument("--transfer-budgets", nargs="+", type=float, default=[3.0])
    r.add_argument("--transfer-train-budget", type=float, default=None, metavar="BPW",
                   help="train the transfer policies at this budget and roll them out at every --transfer-budgets "
                        "value: one policy for all budgets (each budget's job trains that same policy, which "
                        "costs compute, not wall time); default: one policy trained at each budget")
    r.add_argument("--transfer-seeds", nargs="+", type=int, default=[0])
    r.add_argument("--transfer-timesteps", type=int, default=24576)
    r.add_argument("--transfer-eval-reserve-s", type=float, default=90.0,
                   help="transfer training stops this long before the deadline, leaving time for evaluation")
    r.add_argument("--transfer-eval-seen", action=argparse.BooleanOptionalAction, default=True,
                   help="with --transfer-eval-jobs, roll the policies out on the training models too")
    r.add_argument("--transfer-eval-jobs", action="store_true",
                   help="evaluate the transfer policies in one worker per model, which prepares the model's "
                        "baselines while the policies train (same measurements, less time after training)")
    r.add_argument("--fill-from", nargs="+", default=None, metavar="RUN",
                   help="earlier run folders: run only the quality units they did not complete (cut short, "
                        "skipped or failed); merge afterwards with `report --runs RUN... <out>`")
    r.add_argument("--rl-agent", default="maskable_ppo",
                   help="the RL method's agent (its configs/<agent>.yaml hyperparameters; default: %(default)s)")
    r.add_argument("--rl-config", default=None, metavar="YAML",
                   help="the RL method's hyperparameters and env_kwargs (rl-zoo style, as train_agent.py --config; "
                        "default: configs/<--rl-agent>.yaml), e.g. configs/ppo_allocation.yaml")
    r.add_argument("--action-kind", default=None,
                   help="the RL method's action kind (default: its config's env_kwargs, else residual)")
    r.add_argument("--rl-observation", default=None, choices=["full", "relative"],
                   help="the RL method's observation kind (default: its config's env_kwargs, else full)")
    r.add_argument("--rl-shaping", type=float, default=None,
                   help="the RL method's env shaping_weight (potential-based shaping from the streamed block "
                        "errors; the searchers' env is unshaped; default: the agent config's env_kwargs, else 0)")
    r.add_argument("--rl-eval-points", type=int, default=8, metavar="K",
                   help="the rl_eval method: K of the N evaluations go to the deterministic policy during "
                        "training, N - K to training episodes; the best is reported. Evaluations fall on rollout "
                        "boundaries, so short runs get fewer (the rows say how many) (default: %(default)s)")
    r.add_argument("--rl-env", nargs="+", default=[], metavar="KEY=VALUE",
                   help="further env arguments of the RL method, in training and evaluation (e.g. "
                        "max_deviations=12 size_weight=0.1)")
    r.add_argument("--transfer-eval-env", nargs="+", default=[], metavar="KEY=VALUE",
                   help="env arguments over --rl-env for the zero-shot rollouts only (e.g. max_deviations=12)")
    r.add_argument("--methods", nargs="+", default=None, choices=METHOD_ORDER[2:],
                   help="run only these quality methods (default: all)")
    r.add_argument("--transfer-search-evals", type=int, default=0,
                   help="evaluations of random search and evolution on each transfer test model (0: only greedy)")
    r.add_argument("--weight-cache-gib", type=float, default=None,
                   help="the env's quantized-weight cache (default: the env's, sized from the model)")
    r.add_argument("--max-procs", type=int, default=64)
    r.add_argument("--worker-gpu-gib", type=float, default=3.0,
                   help="on a GPU, a worker starts only when this much GPU memory is free (others queue); each "
                        "worker also waits for its own evaluation's memory, then shrinks its batches (qenv.memory)")
    r.add_argument("--nice", type=int, default=0, help="niceness of the workers")
    r.add_argument("--deadline-s", type=float, default=3600.0, help="no new work after this many seconds")
    r.add_argument("--grace-s", type=float, default=30.0, help="then workers are stopped after this long")
    w = sub.add_parser("worker", help="(internal) one job")
    w.add_argument("spec")
    rp = sub.add_parser("report", help="rebuild tables and plots from <out>/raw")
    rp.add_argument("--out", required=True, help="where the report goes (and, without --runs, the run to read)")
    rp.add_argument("--runs", nargs="+", default=None,
                    help="run folders to merge (a later run fills units an earlier one missed or cut short)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        return worker(args.spec)
    if args.command == "report":
        return report(args)
    from qenv.cli.common import parse_key_values
    from qenv.cli.config import env_kwarg_names
    from qenv.envs.config import RESIDUAL_ONLY, check_env_arguments
    from qenv.errors import QenvError

    # set by this benchmark itself (per model, budget and method, or by its own flags)
    own = {"model": "--models", "budget_bpw": "--budgets", "budgets": "--budgets", "data": "--data-dir",
           "n_tokens": "--n-tokens", "seq_len": "--seq-len", "batch_size": "--batch-size", "device": "--device",
           "dtype": "--dtype", "seed": "--seeds", "cache_dir": "--cache-dir", "weight_cache_gib": "--weight-cache-gib",
           "action_kind": "--action-kind", "observation": "--rl-observation", "shaping_weight": "--rl-shaping",
           "render_mode": "nothing (the benchmark draws nothing)"}
    try:  # before anything is written: a bad --rl-env is one line
        if args.rl_config is not None:
            if not Path(args.rl_config).is_file():
                raise QenvError(f"--rl-config {args.rl_config} is not a file.",
                                "pass an rl-zoo style YAML, e.g. configs/ppo_allocation.yaml.")
            args.rl_config = str(Path(args.rl_config).resolve())  # the workers run from the repository root
        if args.rl_eval_points < 1:
            raise QenvError(f"--rl-eval-points={args.rl_eval_points} must be at least 1.",
                            "pass how many of the N evaluations go to the policy during training, e.g. 8.")
        if args.action_kind is None:  # the RL config's kind (its hyperparameters were chosen for it)
            args.action_kind = str(config_env_kwarg(args.rl_agent, "action_kind", "residual", args.rl_config))
        known = set(env_kwarg_names())
        for flag in ("rl_env", "transfer_eval_env"):
            name = "--" + flag.replace("_", "-")
            values = parse_key_values(getattr(args, flag), name)
            unknown = sorted(set(values) - known)
            if unknown:
                raise QenvError(f"{name} {unknown[0]}=... is not an argument of QuantLLM-v0.",
                                f"use one of its arguments, e.g. {name} max_deviations=12.")
            taken = sorted(set(values) & set(own))
            if taken:
                raise QenvError(f"{name} {taken[0]}=... is set by bench_quality.py itself.",
                                f"use {own[taken[0]]} instead.")
            try:
                check_env_arguments(values)
            except QenvError as exc:
                raise QenvError(f"{name}: {exc.problem}", exc.fix) from None
            residual = sorted(k for k in values if k in RESIDUAL_ONLY)
            if residual and args.action_kind != "residual":
                raise QenvError(f"{name} {residual[0]}=... applies to the residual action kind, not --action-kind "
                                f"{args.action_kind}.", "pass --action-kind residual, or leave it out.")
            setattr(args, flag, values)
    except QenvError as exc:
        print(f"bench_quality.py: error: {exc}", file=sys.stderr)
        return 2
    if args.cache_dir is None:
        args.cache_dir = str(Path(args.out) / "cache")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
