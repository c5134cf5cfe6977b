"""Agents by name: the built-in ones, plug-ins by import path, and installed entry points.

``make_agent(name_or_path, env, seed=0, **hyperparams)`` accepts

- a registered name: ``ppo`` (default), ``maskable_ppo`` (needs sb3-contrib; samples only the
  actions ``env.action_masks()`` allows), ``a2c``, ``dqn``, ``sac``, ``td3``, ``ddpg``,
  ``recurrent_ppo`` (needs sb3-contrib), and the searchers ``uniform``, ``llamacpp``, ``greedy``,
  ``random``, ``evolution``;
- a plug-in ``package.module:Class`` (or ``path/to/file.py:Class``), called as
  ``Class(env, seed=seed, **hyperparams)``;
- the name of an entry point in the ``qenv.agents`` group of any installed package::

      [project.entry-points."qenv.agents"]
      depth = "mypkg.agents:DepthAgent"

Built-ins are registered by import path, so nothing heavy is imported until an agent is built.
A factory's ``action_kinds`` (given to :func:`register_agent`, or a class attribute of a plug-in)
lists the action-space kinds it handles; asking for another kind is a :class:`QenvError` that
names the kinds that work and the agents that handle the environment's kind.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from qenv.agents.base import Agent, action_kind
from qenv.cli.config import RESERVED_KEYS
from qenv.envs.spaces import ACTION_SPACE_KINDS, MASKABLE_KINDS, RULE_KINDS, SPACE_FAMILY
from qenv.errors import QenvError

DEFAULT_AGENT = "ppo"
ENTRY_POINT_GROUP = "qenv.agents"


@dataclass(frozen=True)
class AgentSpec:
    """A registered agent: its factory (a callable, or a ``module:attr`` string imported on use)."""

    name: str
    factory: Callable[..., Any] | str
    action_kinds: tuple[str, ...] | None = None  # None: read the factory's attribute, else all kinds
    description: str = ""
    entry_point: Any = None  # an importlib.metadata.EntryPoint, loaded on use

    def load(self) -> Callable[..., Any]:
        if self.entry_point is not None:
            return _load_entry_point(self.entry_point)
        if isinstance(self.factory, str):
            return import_object(self.factory, self.name)
        return self.factory

    def kinds(self) -> tuple[str, ...]:
        if self.action_kinds is not None:
            return self.action_kinds
        return _check_kinds(getattr(self.load(), "action_kinds", ACTION_SPACE_KINDS), self.name)


AGENTS: dict[str, AgentSpec] = {}


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _check_kinds(kinds: Sequence[str] | str, name: str) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in ACTION_SPACE_KINDS]
    if bad or not kinds:
        raise QenvError(f"Agent {name!r} declares unknown action kinds {bad or list(kinds)}.",
                        f"use a non-empty subset of {ACTION_SPACE_KINDS}.")
    return kinds


def register_agent(name: str, factory: Callable[..., Any] | str, action_kinds: Sequence[str] | None = None,
                   description: str = "", overwrite: bool = False) -> AgentSpec:
    """Register ``factory`` (called as ``factory(env, seed=seed, **hyperparams)``) under ``name``.

    ``factory`` may be a ``"module:attr"`` string, imported only when the agent is built.
    ``action_kinds`` defaults to the factory's ``action_kinds`` attribute, else all kinds.
    """
    key = _normalize(name)
    if not key or ":" in key:
        raise QenvError(f"Agent name {name!r} is not valid.", "use a short name without ':' such as 'my_agent'.")
    if key in AGENTS and not overwrite:
        raise QenvError(f"An agent named {key!r} is already registered.", "pick another name or pass overwrite=True.")
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise QenvError(f"The factory of agent {key!r} must be callable or a 'module:attr' string.")
    kinds = None if action_kinds is None else _check_kinds(action_kinds, key)
    spec = AgentSpec(key, factory, kinds, description)
    AGENTS[key] = spec
    return spec


def import_object(target: str, name: str | None = None) -> Any:
    """Import ``package.module:attr`` or ``path/to/file.py:attr``."""
    module_name, _, attr = target.rpartition(":")
    what = f"agent {name!r}" if name and name != target else f"plug-in {target!r}"
    if not module_name or not attr:
        raise QenvError(f"{target!r} is not an import path.", "write a plug-in as 'package.module:Class'.")
    path = Path(module_name).expanduser()
    if module_name.endswith(".py"):
        if not path.is_file():
            raise QenvError(f"The file {path} of {what} does not exist.", "check the path before ':'.")
        mod_key = f"qenv_plugin_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
        module = sys.modules.get(mod_key)
        if module is None:
            spec = importlib.util.spec_from_file_location(mod_key, path)
            if spec is None or spec.loader is None:
                raise QenvError(f"Cannot import {path} for {what}.", "pass a Python source file.")
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_key] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[mod_key]
                raise
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise QenvError(f"Could not import module {module_name!r} for {what} ({exc}).",
                            "install the package that provides it, or add its folder to PYTHONPATH.") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise QenvError(f"Module {module_name!r} has no attribute {attr!r} (needed by {what}).",
                            "check the name after ':' (it is case-sensitive).")
        obj = getattr(obj, part)
    return obj


def _entry_points() -> dict[str, Any]:
    """Installed ``qenv.agents`` entry points by normalized name (loaded only when used)."""
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # a broken installed distribution must not break the built-in agents
        return {}
    return {_normalize(ep.name): ep for ep in eps}


def _load_entry_point(ep: Any) -> Any:
    try:
        return ep.load()
    except ImportError as exc:
        raise QenvError(f"The entry point {ep.name!r} ({ep.value}) of group {ENTRY_POINT_GROUP!r} could not be "
                        f"imported ({exc}).", "reinstall the package that provides it.") from None


def available_agents() -> list[str]:
    """Registered agent names, then installed entry-point names not shadowed by them."""
    names = list(AGENTS)
    names += sorted(n for n in _entry_points() if n not in AGENTS)
    return names


def agents_for(kind: str) -> list[str]:
    """Registered agents (with declared kinds) that handle the ``kind`` action space."""
    return [n for n, spec in AGENTS.items() if spec.action_kinds is None or kind in spec.action_kinds]


def resolve_agent(name_or_path: str) -> AgentSpec:
    """The spec of a registered name, an entry point or a ``module:Class`` plug-in."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise QenvError(f"Agent {name_or_path!r} is not a name.", f"use one of {available_agents()}.")
    key = _normalize(name_or_path)
    if key in AGENTS:
        return AGENTS[key]
    eps = _entry_points()
    if key in eps:
        ep = eps[key]
        return AgentSpec(key, str(getattr(ep, "value", key)), None, f"entry point {getattr(ep, 'value', '')}", ep)
    if ":" in name_or_path:
        return AgentSpec(name_or_path.strip(), name_or_path.strip(), None, "plug-in")
    names = available_agents()
    close = difflib.get_close_matches(key, names, n=1)
    raise QenvError(f"Unknown agent {name_or_path!r}" + (f" (did you mean {close[0]!r}?)." if close else "."),
                    f"use one of {', '.join(names)}, or a plug-in as 'package.module:Class'.")


def is_plugin(name_or_path: str) -> bool:
    """Whether ``name_or_path`` names code by import path (``module:Class``, ``file.py:Class``)
    rather than an agent of the registry."""
    return ":" in str(name_or_path)


def agent_named_by_file(value: Any, source: str) -> str | None:
    """The registered agent a file names (a run folder's ``summary.json``/``config.json``, the agent
    record of a zip), or ``None`` when it names none.

    Files are input, and run folders are shared: a name from a file may only pick an agent of the
    registry (built-in or installed entry point), never code by path. A plug-in
    (``file.py:Class``, ``module:Class``) is taken from the command line alone (``--agent``), and its
    path is not repeated back as advice: following it would run what the file chose.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and not is_plugin(value) and _normalize(value) in available_agents():
        return _normalize(value)
    what = "a plug-in by import path" if isinstance(value, str) and is_plugin(value) else \
        "an agent that is not registered here"
    raise QenvError(f"{source} names {what}, and a file never chooses code to run (only the registry's names: "
                    f"{', '.join(available_agents())}).",
                    "pass --agent yourself: a registered name, or the plug-in that trained this policy if you "
                    "wrote or trust it.")


def _check_hyperparams(factory: Callable[..., Any], name: str, hyperparams: dict[str, Any]) -> None:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if n not in ("self", "env", "seed")
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    unknown = sorted(set(hyperparams) - set(accepted))
    if unknown:
        raise QenvError(f"Agent {name!r} does not take hyperparameter(s) {unknown}.",
                        f"use only {accepted}." if accepted else "it takes no hyperparameters.")


def check_action_kind(spec: AgentSpec, env: Any) -> None:
    """Refuse an agent that does not act in ``env``'s action kind; ``env`` may be the kind's name
    (a program's ``EnvConfig.action_kind``, checked before any model loads)."""
    kind = env if isinstance(env, str) else action_kind(env)
    kinds = spec.kinds()
    if kind not in kinds:
        others = [n for n in agents_for(kind) if n != spec.name]
        raise QenvError(
            f"Agent {spec.name!r} does not support the {kind!r} action space; it works with: {', '.join(kinds)}.",
            f"make the environment with action_kind={kinds[0]!r}"
            + (f", or pick an agent for {kind} actions: {', '.join(others)}." if others else "."),
        )


def make_agent(name_or_path: str, env: Any, seed: int = 0, **hyperparams: Any) -> Agent:
    """Build an agent for ``env`` by name, entry point or ``module:Class`` path."""
    spec = resolve_agent(name_or_path)
    check_action_kind(spec, env)
    factory = spec.load()
    if not callable(factory):
        raise QenvError(f"Agent {spec.name!r} resolves to {type(factory).__name__}, which cannot be called.",
                        "point at a class or a function taking (env, seed=..., **hyperparams).")
    _check_hyperparams(factory, spec.name, hyperparams)
    agent = factory(env, seed=seed, **hyperparams)
    missing = [m for m in ("learn", "predict", "save") if not callable(getattr(agent, m, None))]
    if missing:
        raise QenvError(f"Agent {spec.name!r} built a {type(agent).__name__} without {', '.join(missing)}().",
                        "implement the qenv.agents.base.Agent protocol: learn, predict, save and load.")
    return agent


def load_agent(name_or_path: str, path: str | Path, env: Any = None) -> Agent:
    """Load a saved agent with the ``load`` classmethod of the named agent's class."""
    spec = resolve_agent(name_or_path)
    factory = spec.load()
    loader = getattr(factory, "load", None)
    if not callable(loader):
        raise QenvError(f"Agent {spec.name!r} cannot be loaded: its factory has no load().",
                        "register a class with a `load(path, env=None)` classmethod.")
    if env is not None:
        check_action_kind(spec, env)
    return loader(path, env=env)


def agent_parameters(agent: str) -> tuple[list[str] | None, Any]:
    """The hyperparameter names the agent's constructor accepts (``None``: anything), and its factory."""
    spec = resolve_agent(agent)
    factory = spec.load()
    names: set[str] = set()
    open_ended = False
    targets = [factory]
    algorithm = getattr(factory, "algorithm_class", None)
    if callable(algorithm):  # SB3 wrappers pass extra keywords on to the SB3 algorithm
        targets.append(algorithm())
    for n, target in enumerate(targets):
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            return None, factory
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        names |= {k for k, p in params.items() if k not in ("self", "env", "seed")
                  and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
        if var_kw and n == len(targets) - 1:
            open_ended = True
    return (None if open_ended else sorted(names)), factory


def check_hyperparams(agent: str, hyperparams: dict[str, Any], where: str) -> None:
    """Unknown hyperparameters are an error that lists the accepted ones."""
    accepted, _ = agent_parameters(agent)
    unknown = sorted(set(hyperparams) - set(accepted)) if accepted is not None else []
    if unknown and accepted is not None:
        shown = [k for k in accepted if k not in ("env", "seed")]
        raise QenvError(f"{where}: unknown key(s) {unknown} for agent {agent!r}.",
                        f"use {list(RESERVED_KEYS)} or the agent's hyperparameters: {shown}.")
    check_hyperparam_values(agent, hyperparams, where)


#: value ranges of common SB3 hyperparameters: (low, high, low inclusive); numbers only
_RANGES: dict[str, tuple[float, float, bool]] = {
    **{k: (1, float("inf"), True) for k in ("n_steps", "batch_size", "n_epochs", "buffer_size", "target_update_interval",
                                            "policy_delay", "stats_window_size")},
    **{k: (0, 1, True) for k in ("gamma", "gae_lambda", "tau", "exploration_fraction", "exploration_initial_eps",
                                 "exploration_final_eps")},
    **{k: (0, float("inf"), False) for k in ("plan_deviations", "learning_rate", "clip_range", "clip_range_vf",
                                             "max_grad_norm", "rms_prop_eps", "target_kl")},
    **{k: (0, float("inf"), True) for k in ("ent_coef", "vf_coef", "learning_starts", "target_policy_noise",
                                            "target_noise_clip")},
}


def _matches(value: Any, annotation: Any) -> bool | None:
    """Whether ``value`` fits a constructor annotation; ``None`` when the annotation is not understood."""
    import collections.abc
    import types
    import typing

    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, (str, typing.ForwardRef)):
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, a) for a in typing.get_args(annotation)]
        return True if any(r is True for r in results) else (None if any(r is None for r in results) else False)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        import math

        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    if origin is collections.abc.Callable or annotation is collections.abc.Callable:
        return callable(value) and not isinstance(value, type)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if origin in (tuple, list) or annotation in (tuple, list):
        return isinstance(value, (tuple, list))
    if origin is type:
        return isinstance(value, type)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return None


def check_hyperparam_values(agent: str, hyperparams: dict[str, Any], where: str) -> None:
    """Types and ranges of hyperparameters, from the agent's own constructor annotations (and SB3's),
    before anything is built: ``learning_rate: fast``, ``n_steps: -1``, ``policy: NoSuchPolicy`` or
    ``gamma: [1, 2]`` (which SB3 accepts and only fails on after the first rollout) are one clear
    error instead of a traceback, or a run that ``--resume`` cannot continue."""
    _, factory = agent_parameters(agent)
    targets = [factory]
    algorithm = getattr(factory, "algorithm_class", None)
    algo = algorithm() if callable(algorithm) else None
    if algo is not None:
        targets.append(algo)
    params: dict[str, inspect.Parameter] = {}
    for target in reversed(targets):  # the wrapper's own annotations win
        try:
            params.update(inspect.signature(target).parameters)
        except (TypeError, ValueError):
            continue
    for key, value in hyperparams.items():
        if key == "policy" and algo is not None:
            aliases = sorted(getattr(algo, "policy_aliases", {}) or {})
            if isinstance(value, str) and aliases and value not in aliases:
                raise QenvError(f"{where}: policy={value!r} is not a policy of {algo.__name__}.",
                                f"use one of {aliases}.")
            continue
        param = params.get(key)
        if param is not None and _matches(value, param.annotation) is False:
            shown = param.annotation.__name__ if isinstance(param.annotation, type) else \
                str(param.annotation).replace("collections.abc.", "").replace("typing.", "")
            example = param.default if param.default is not inspect.Parameter.empty and param.default is not None else ""
            raise QenvError(f"{where}: {key}={value!r} has the wrong type (expected {shown}).",
                            f"write e.g. {key}: {example}." if example != "" else f"give {key} a value of type {shown}.")
        if key in _RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high, inclusive = _RANGES[key]
            if value > high or value < low or (value == low and not inclusive):
                span = f"{'[' if inclusive else '('}{low:g}, {high:g}]" if high != float("inf") else \
                    (f"at least {low:g}" if inclusive else f"more than {low:g}")
                raise QenvError(f"{where}: {key}={value!r} is out of range ({span}).",
                                f"write e.g. {key}: {param.default}." if param is not None and
                                param.default not in (inspect.Parameter.empty, None) else f"use a value {span}.")


def accepts(agent: str, name: str) -> bool:
    accepted, _ = agent_parameters(agent)
    return accepted is None or name in accepted


_ALL = ACTION_SPACE_KINDS
_DISCRETE = tuple(k for k, family in SPACE_FAMILY.items() if family == "discrete")
_BOX = tuple(k for k, family in SPACE_FAMILY.items() if family == "continuous")
for _name, _target, _kinds, _text in (
    ("ppo", "qenv.agents.sb3:PPOAgent", _ALL, "Proximal Policy Optimization (Stable-Baselines3)"),
    ("maskable_ppo", "qenv.agents.sb3:MaskablePPOAgent", MASKABLE_KINDS,
     "PPO that only samples actions allowed by env.action_masks() (needs sb3-contrib)"),
    ("a2c", "qenv.agents.sb3:A2CAgent", _ALL, "Advantage Actor-Critic (Stable-Baselines3)"),
    ("dqn", "qenv.agents.sb3:DQNAgent", _DISCRETE, "Deep Q-Network (Stable-Baselines3)"),
    ("sac", "qenv.agents.sb3:SACAgent", _BOX, "Soft Actor-Critic (Stable-Baselines3)"),
    ("td3", "qenv.agents.sb3:TD3Agent", _BOX, "Twin Delayed DDPG (Stable-Baselines3)"),
    ("ddpg", "qenv.agents.sb3:DDPGAgent", _BOX, "Deep Deterministic Policy Gradient (Stable-Baselines3)"),
    ("recurrent_ppo", "qenv.agents.sb3:RecurrentPPOAgent", _ALL, "PPO with an LSTM policy (needs sb3-contrib)"),
    ("uniform", "qenv.agents.searchers:UniformSearch", RULE_KINDS, "best single rule that fits the budget"),
    ("llamacpp", "qenv.agents.searchers:LlamaCppSearch", RULE_KINDS, "llama.cpp-like Q4_K_M / Q3_K_M mix"),
    ("greedy", "qenv.agents.searchers:GreedySearch", RULE_KINDS, "HAWQ-style sensitivity allocation"),
    ("random", "qenv.agents.searchers:RandomSearch", RULE_KINDS, "random budget-feasible recipes, keep the best"),
    ("evolution", "qenv.agents.searchers:EvolutionSearch", RULE_KINDS, "EvoPress-like evolutionary search"),
):
    register_agent(_name, _target, _kinds, _text)
