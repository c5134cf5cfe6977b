"""rl-zoo style hyperparameter files.

A config is YAML keyed by environment id, as in rl-baselines3-zoo::

    QuantLLM-v0:
      n_timesteps: 16384        # default length of a run (--timesteps overrides)
      policy: MlpPolicy
      n_steps: 512              # everything else goes to the agent's constructor
      learning_rate: lin_1e-3   # rl-zoo's linear schedule notation works
      policy_kwargs: {net_arch: [64, 64], activation_fn: tanh}
      env_kwargs: {budget_bpw: 3.0}

Besides the agent's own hyperparameters, a section may hold ``n_timesteps``, ``n_envs``,
``env_kwargs`` and ``normalize`` (rl-zoo's keys: ``true`` or VecNormalize arguments such as
``{norm_obs: true, norm_reward: false}``), and ``vec_env`` (``dummy``, ``subproc`` or ``ray``)
and ``checkpoint_freq`` (timesteps). rl-zoo3 passes every key of the environment's section that
it does not know to the algorithm, so qenv-only keys belong in a top-level ``qenv:`` section,
which rl-zoo3 never reads; the files in ``configs/`` load in ``python -m rl_zoo3.train``::

    QuantLLM-v0:
      n_timesteps: 24576
      policy: MlpPolicy
    qenv:                       # read by train_agent.py only
      checkpoint_freq: 2048
      plan_deviations: 2        # qenv's SB3 wrappers: start a residual policy at greedy's plan

``plan_deviations`` (a number d) initialises a categorical policy's action head so that the
untrained policy keeps the ``residual`` kind's plan (action 0) and deviates d times per episode
in expectation (``qenv.agents.sb3.start_at_plan``); rl-zoo3's algorithms do not take it.

Anything else that the agent does not take is an error naming the accepted keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qenv.errors import QenvError

#: keys of a config section that configure the run, not the agent
RESERVED_KEYS: tuple[str, ...] = ("n_timesteps", "n_envs", "vec_env", "checkpoint_freq", "env_kwargs", "normalize")
#: the top-level section of qenv-only run settings (rl-zoo3 reads only the environment's section)
QENV_SECTION = "qenv"
QENV_ONLY_KEYS: tuple[str, ...] = ("vec_env", "checkpoint_freq", "plan_deviations")
#: qenv-only keys of the ``qenv:`` section that go to the agent's constructor (not to rl-zoo3's algorithm)
QENV_AGENT_KEYS: tuple[str, ...] = ("plan_deviations",)
VEC_ENVS: tuple[str, ...] = ("dummy", "subproc", "ray")
_FLOAT_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")  # fullmatch: "$" passes a final newline
_ACTIVATIONS = {"tanh": "Tanh", "relu": "ReLU", "elu": "ELU", "leaky_relu": "LeakyReLU", "gelu": "GELU",
                "silu": "SiLU", "sigmoid": "Sigmoid"}


class LinearSchedule:
    """rl-zoo's ``lin_<value>``: decays linearly from ``value`` to 0 over the run (picklable)."""

    def __init__(self, initial: float) -> None:
        self.initial = float(initial)

    def __call__(self, progress_remaining: float) -> float:
        return progress_remaining * self.initial

    def __repr__(self) -> str:
        return f"lin_{self.initial:g}"


@dataclass
class AgentConfig:
    """One environment's section of a config file, split into run settings and agent hyperparameters."""

    source: str | None = None
    n_timesteps: int | None = None
    n_envs: int | None = None
    vec_env: str | None = None
    checkpoint_freq: int | None = None
    normalize: dict[str, Any] | None = None  # VecNormalize arguments; None: no normalisation
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    hyperparams: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


def _positive_int(value: Any, key: str, where: str) -> int:
    if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):  # YAML 1.1 reads 1e5 as a string
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise QenvError(f"{where}: {key}={value!r} must be a positive whole number.", f"write e.g. {key}: 1000.")
    return int(value)


def _convert_value(key: str, value: Any, where: str) -> Any:
    """YAML 1.1 reads ``3e-4`` as a string; rl-zoo writes schedules as ``lin_3e-4``."""
    if isinstance(value, str):
        text = value.strip()
        if _FLOAT_RE.fullmatch(text):
            return float(text)
        if text.startswith("lin_"):
            number = text[4:]
            if not _FLOAT_RE.fullmatch(number):
                raise QenvError(f"{where}: {key}={value!r} is not a linear schedule.", "write e.g. lin_3e-4.")
            return LinearSchedule(float(number))
    return value


def _policy_kwargs(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        raise QenvError(f"{where}: policy_kwargs is the string {value!r}; code in configs is not evaluated.",
                        "write it as a YAML mapping, e.g. policy_kwargs: {net_arch: [64, 64], activation_fn: tanh}.")
    if not isinstance(value, dict):
        raise QenvError(f"{where}: policy_kwargs must be a mapping.", "write e.g. policy_kwargs: {net_arch: [64, 64]}.")
    out = dict(value)
    act = out.get("activation_fn")
    if isinstance(act, str):
        name = act.split(".")[-1]
        key = name.lower()
        cls_name = _ACTIVATIONS.get(key, name)
        import torch.nn as nn

        cls = getattr(nn, cls_name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise QenvError(f"{where}: activation_fn {act!r} is not a torch activation.",
                            f"use one of {sorted(_ACTIVATIONS)}.")
        out["activation_fn"] = cls
    return out


_NORMALIZE_KEYS = ("norm_obs", "norm_reward", "clip_obs", "clip_reward", "gamma", "epsilon")


def _normalize_kwargs(value: Any, where: str) -> dict[str, Any] | None:
    """rl-zoo's ``normalize``: ``true``/``false`` or a mapping of VecNormalize arguments."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, str) and value.strip().startswith("dict("):
        raise QenvError(f"{where}: normalize={value!r} is code; configs are not evaluated.",
                        "write it as a YAML mapping, e.g. normalize: {norm_obs: true, norm_reward: false}.")
    if not isinstance(value, dict) or set(value) - set(_NORMALIZE_KEYS):
        raise QenvError(f"{where}: normalize={value!r} is not true/false or VecNormalize arguments.",
                        f"write normalize: true, or a mapping of {list(_NORMALIZE_KEYS)}.")
    return {k: _convert_value(k, v, where) for k, v in value.items()}


def env_kwarg_names() -> list[str]:
    """The environment's keyword arguments: :class:`~qenv.envs.config.EnvConfig`'s fields and ``render_mode``."""
    import dataclasses

    from qenv.envs.config import EnvConfig

    return [f.name for f in dataclasses.fields(EnvConfig)] + ["render_mode"]


def check_env_kwargs(env_kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(env_kwargs, dict):
        raise QenvError(f"{where}: env_kwargs must be a mapping.", "write e.g. env_kwargs: {budget_bpw: 3.0}.")
    from qenv.envs.config import check_env_arguments, drop_removed_settings

    try:
        env_kwargs = drop_removed_settings(env_kwargs)  # a removed setting: dropped where off, else one line
    except QenvError as exc:
        raise QenvError(f"{where}: {exc.problem}", exc.fix) from None
    known = env_kwarg_names()
    unknown = sorted(set(env_kwargs) - set(known))
    if unknown:
        raise QenvError(f"{where}: unknown environment argument(s) {unknown}.", f"use only {known}.")
    out = {k: _convert_value(k, v, where) for k, v in env_kwargs.items()}
    try:
        check_env_arguments(out)
    except QenvError as exc:
        raise QenvError(f"{where}: {exc.problem}", exc.fix) from None
    return out


#: a config file's largest size, and the largest size its settings may resolve to (characters of
#: scalars plus one per node, each alias counted where it is used): a config is a few hundred bytes,
#: and a 588-byte file of nested aliases resolves to gigabytes ("billion laughs")
MAX_CONFIG_BYTES = 1 * 2**20
MAX_RESOLVED_SIZE = 4 * 2**20


def resolved_size(data: Any, limit: int = MAX_RESOLVED_SIZE) -> int:
    """The size ``data`` takes once every alias is expanded: one per node plus the characters of its
    scalars, each alias counted where it is used; at most ``limit + 1`` (a self-reference counts as
    more than ``limit``). Shared objects (what aliases load as) are sized once, so this costs one step
    per object and reference in the file, however far the aliases would expand."""
    def scalar(item: Any) -> int:
        return 1 + len(item) if isinstance(item, (str, bytes)) else 1

    def children(item: Any) -> list[Any]:
        return [*item.keys(), *item.values()] if isinstance(item, dict) else list(item)

    containers = (dict, list, tuple, set)
    if not isinstance(data, containers):
        return min(scalar(data), limit + 1)
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()  # containers whose children are being sized: met again, a cycle
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        item, finished = stack.pop()
        key = id(item)
        if finished:
            total = 1 + sum(sizes[id(c)] if isinstance(c, containers) else scalar(c) for c in children(item))
            sizes[key] = min(total, limit + 1)
            open_ids.discard(key)
        elif key in open_ids:
            return limit + 1
        elif key not in sizes:
            open_ids.add(key)
            stack.append((item, True))
            stack.extend((c, False) for c in children(item) if isinstance(c, containers) and id(c) not in sizes)
    return sizes[id(data)]


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise QenvError(f"Config file {path} does not exist.", "pass an existing YAML file, e.g. --config configs/ppo.yaml.")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise QenvError(f"Config file {path} is {path.stat().st_size / 2**20:,.1f} MiB, more than the "
                        f"{MAX_CONFIG_BYTES // 2**20} MiB a config may have; it is not read.",
                        "pass an rl-zoo style YAML file of hyperparameters.")
    try:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except RecursionError:  # PyYAML composes nested collections recursively
            raise QenvError(f"Config file {path} nests too deeply to read.",
                            "write the hyperparameters as an rl-zoo style YAML mapping.") from None
        if resolved_size(data) > MAX_RESOLVED_SIZE:  # aliases share objects: nothing was expanded yet
            raise QenvError(f"Config file {path} resolves to more than {MAX_RESOLVED_SIZE // 2**20} MiB of settings "
                            "once its aliases (*name) are expanded; it is not used.",
                            "write the hyperparameters out plainly, without nested aliases.")
        return data
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise QenvError(f"Config file {path} is not valid YAML{where} ({problem}).",
                        "fix the YAML syntax (indentation, colons, brackets).") from None
    except UnicodeDecodeError:
        raise QenvError(f"Config file {path} is not UTF-8 text.", "pass a YAML text file.") from None


def load_agent_config(path: str | Path, env_id: str) -> AgentConfig:
    """Read the section for ``env_id`` (``QuantLLM-v0``) of an rl-zoo style YAML file."""
    import gymnasium as gym

    path = Path(path)
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise QenvError(f"Config file {path} must map environment ids to hyperparameters.",
                        f"start it with a line '{env_id}:' followed by indented hyperparameters.")
    aliases = {env_id, f"qenv:{env_id}"}
    for key in data:
        if key == QENV_SECTION:
            continue
        if key not in aliases and (not isinstance(key, str) or key not in gym.registry):
            raise QenvError(f"Config file {path} has an unknown top-level key {key!r}.",
                            f"top-level keys are environment ids; put the hyperparameters under '{env_id}:'.")
    sections = [k for k in data if k in aliases]
    if not sections:
        raise QenvError(f"Config file {path} has no section for {env_id}.", f"add a '{env_id}:' section.")
    cfg = parse_section(data[sections[0]] or {}, f"{path} [{env_id}]", source=str(path))
    extra = data.get(QENV_SECTION) or {}
    if not isinstance(extra, dict) or set(extra) - set(QENV_ONLY_KEYS):
        bad = sorted(set(extra) - set(QENV_ONLY_KEYS)) if isinstance(extra, dict) else extra
        raise QenvError(f"Config file {path}: the '{QENV_SECTION}:' section holds {bad!r}.",
                        f"put only {list(QENV_ONLY_KEYS)} there; hyperparameters go under '{env_id}:'.")
    if extra:
        qenv_cfg = parse_section(extra, f"{path} [{QENV_SECTION}]")
        cfg.vec_env = qenv_cfg.vec_env or cfg.vec_env
        cfg.checkpoint_freq = qenv_cfg.checkpoint_freq or cfg.checkpoint_freq
        cfg.hyperparams.update({k: v for k, v in qenv_cfg.hyperparams.items() if k in QENV_AGENT_KEYS})
        cfg.raw = {**cfg.raw, **extra}
    return cfg


def parse_section(section: Any, where: str, source: str | None = None) -> AgentConfig:
    """Split one environment's section into run settings and agent hyperparameters (checked)."""
    if not isinstance(section, dict):
        raise QenvError(f"{where} must be a mapping of hyperparameters.", "indent 'key: value' lines under it.")
    cfg = AgentConfig(source=source, raw=dict(section))
    for key, value in section.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise QenvError(f"{where}: {key!r} is not a hyperparameter name.", "use names like n_steps or learning_rate.")
        if key == "n_timesteps":
            cfg.n_timesteps = _positive_int(value, key, where)
        elif key == "n_envs":
            cfg.n_envs = _positive_int(value, key, where)
        elif key == "checkpoint_freq":
            cfg.checkpoint_freq = _positive_int(value, key, where)
        elif key == "vec_env":
            if value not in VEC_ENVS:
                raise QenvError(f"{where}: vec_env={value!r} is unknown.", f"use one of {VEC_ENVS}.")
            cfg.vec_env = value
        elif key == "env_kwargs":
            cfg.env_kwargs = check_env_kwargs(value or {}, where)
        elif key == "normalize":
            cfg.normalize = _normalize_kwargs(value, where)
        elif key == "policy_kwargs":
            cfg.hyperparams[key] = _policy_kwargs(value, where)
        else:
            cfg.hyperparams[key] = _convert_value(key, value, where)
    return cfg
