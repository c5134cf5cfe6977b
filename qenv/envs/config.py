"""The environment's settings: one frozen :class:`EnvConfig`, the one home of their validation.

The settings fall in four groups, as :meth:`EnvConfig.to_dict` writes them (a run's
``config.json`` holds this dict):

- ``task``: what is quantized and scored on what (model, calibration tokens, device, caches);
- ``reward``: what an episode is scored by (:mod:`qenv.envs.reward`);
- ``action``: what an action means (the kind, its menu and observation, the residual kind's own options);
- ``budget``: the bit budget and how it is enforced.

``QuantLLMEnv(**kwargs)`` and ``gym.make("QuantLLM-v0", **kwargs)`` build one with
:meth:`EnvConfig.from_kwargs`; a program builds one config and changes fields with
``dataclasses.replace``. A value of the wrong type or range is a one-line :class:`QenvError`
here, before anything slow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from qenv.envs.features import OBSERVATION_KINDS
from qenv.envs.reward import REWARD_KINDS
from qenv.envs.kinds import KINDS
from qenv.envs.spaces import MENUS, ActionMapper, parse_menu
from qenv.errors import QenvError
from qenv.models.loading import DEFAULT_MODEL, LoadedModel
from qenv.quant.rules import Rule

#: what ``render()`` can draw (the environment opens no window)
RENDER_MODES: tuple[str, ...] = ("ansi", "rgb_array")
BUDGET_MODES: tuple[str, ...] = ("hard", "penalty")
#: arguments only the residual action kind takes: an env of another kind made from a residual
#: run's settings (e.g. the searchers' menu env) leaves them out
RESIDUAL_ONLY: tuple[str, ...] = ("max_deviations",)
#: settings that were removed because their benchmarks moved no loss (BENCHMARKS.md, "What these
#: changes did": each measured once on the residual kind, none adopted), with the value that meant
#: "off". A run's config.json from an earlier version that holds one at that value still loads (the
#: setting changed nothing); at another value it is refused: this qenv cannot train or score it.
REMOVED_SETTINGS: dict[str, Any] = {"deviation_cost": 0.0, "replan": "lagrangian", "ladder": "menu"}
#: removed values of kept settings, by the same measure: ``observation="actions"``
REMOVED_VALUES: dict[str, tuple[Any, ...]] = {"observation": ("actions",)}


def is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating)) \
        and bool(np.isfinite(value))


def _is_path_like(value: Any) -> bool:
    return isinstance(value, (str, Path)) and str(value).strip() != ""


def check_env_arguments(arguments: dict[str, Any]) -> None:
    """Check the types and values of the environment's arguments that are given (others are skipped).

    The environment calls it first thing, and the programs call it on ``--env-kwargs`` and config
    files before anything slow, so a value of the wrong type (``include_lm_head="maybe"``, which
    Python would count as true) or out of range (``weight_cache_gib=-1``) is a one-line error, not
    a silent misreading or a traceback later.
    """
    def fail(key: str, value: Any, need: str, example: str) -> None:
        raise QenvError(f"{key}={value!r} {need}.", f"pass e.g. {key}={example}.")

    for key, value in arguments.items():
        if key == "model":
            items = value if isinstance(value, (list, tuple)) else [value]
            if not items or not all(_is_path_like(v) or isinstance(v, LoadedModel) for v in items):
                fail(key, value, "must be a model spec (a path, hub id or built-in name) or a list of them", "default")
        elif key == "data":
            items = value if isinstance(value, (list, tuple)) else [value]
            if value is not None and (not items or not all(_is_path_like(v) for v in items)):
                fail(key, value, "must be a text file path or a list of them", "train.txt")
        elif key == "budget_bpw":
            if not is_number(value) or not 0 < value <= 16:
                raise QenvError(f"budget_bpw={value!r} is out of range.", "use a number of bits per weight in (0, 16].")
        elif key in ("dense_weight", "shaping_weight", "size_weight", "penalty_weight"):
            if not is_number(value) or value < 0:
                fail(key, value, "must be a number of at least 0", "1.0")
        elif key == "weight_cache_gib":  # None: sized from the model; too small for a recipe: QuantizedWeights says so
            if value is not None and (not is_number(value) or value < 0):
                fail(key, value, "must be a number of at least 0", "8 (or leave it unset to size it from free memory)")
        elif key == "validation_fraction":
            if not is_number(value) or not 0 <= value < 1:
                fail(key, value, "must be a share of the calibration sequences in [0, 1)", "0.25 (or 0: none held back)")
        elif key == "prebuild":
            if value is not None and not isinstance(value, (bool, np.bool_)):
                fail(key, value, "must be true or false", "true")
        elif key in ("n_tokens", "seq_len", "batch_size", "seed"):
            low = {"seed": 0, "seq_len": 2}.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise QenvError(f"{key}={value!r} must be a whole number of at least {low}.",
                                f"pass e.g. {key}={ {'n_tokens': 2048, 'seq_len': 128, 'batch_size': 8, 'seed': 0}[key]}.")
        elif key == "include_lm_head":
            if not isinstance(value, (bool, np.bool_)):
                fail(key, value, "must be true or false", "true")
        elif key == "action_kind":
            if not isinstance(value, str) or value not in KINDS:
                raise QenvError(f"Unknown action space kind {value!r}.", f"use one of {tuple(KINDS)}.")
        elif key == "budgets":
            items = list(value) if isinstance(value, (list, tuple, np.ndarray)) and np.ndim(value) == 1 else None
            if value is not None and (not items or not all(is_number(b) and 0 < b <= 16 for b in items)):
                fail(key, value, "must be a list of budgets in bits per weight, each in (0, 16]", "[2.5, 3.0, 3.5, 4.0]")
        elif key == "budget_range":
            pair = list(value) if isinstance(value, (list, tuple, np.ndarray)) and np.ndim(value) == 1 else None
            if value is not None and (pair is None or len(pair) != 2 or not all(is_number(b) and 0 < b <= 16 for b in pair)
                                      or pair[0] > pair[1]):
                fail(key, value, "must be two budgets [low, high] in bits per weight, low <= high, each in (0, 16]",
                     "[2.5, 4.5]")
        elif key == "max_deviations":
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
                fail(key, value, "must be a whole number of at least 0 (or unset: no limit)", "6")
        elif key == "observation":
            if value in REMOVED_VALUES["observation"]:
                refuse_removed(key, value)
            if value not in OBSERVATION_KINDS:
                raise QenvError(f"Unknown observation kind {value!r}.", f"use one of {OBSERVATION_KINDS}.")
        elif key == "reward":
            if value not in REWARD_KINDS:
                raise QenvError(f"Unknown reward {value!r}.", f"use one of {REWARD_KINDS}.")
        elif key == "budget_mode":
            options = BUDGET_MODES
            if value not in options:
                raise QenvError(f"Unknown {key} {value!r}.", f"use one of {options}.")
        elif key == "render_mode":
            if value is not None and value not in RENDER_MODES:
                raise QenvError(f"render_mode={value!r} is not supported: the environment draws no window.",
                                "use render_mode='ansi' (a text table) or 'rgb_array' (an image), or leave it unset.")
        elif key in ("device", "dtype"):
            import torch

            if value is not None and not isinstance(value, (str, torch.device, torch.dtype)):
                fail(key, value, "must be a name", "cpu" if key == "device" else "float32")
        elif key == "cache_dir":
            if value is not None and not isinstance(value, bool) and not _is_path_like(value):
                fail(key, value, "must be a folder, or false to cache nothing", "false")
        elif key == "menu":
            named = isinstance(value, str) and value.lower() in MENUS  # menu="gguf"
            if value is not None and not named and (isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple))):
                raise QenvError("The rule menu must be a list of rules or one of "
                                f"{sorted(MENUS)}.", "pass e.g. menu='gguf' or menu=[{'bits': 4}, {'bits': 8}].")


#: the spacing of the budgets a ``budget_range`` draws from: a draw falls on this grid, so each budget's
#: reference, plan and best start are measured once and reused by later episodes at that budget
BUDGET_RANGE_STEP = 0.1


def budget_grid(low: float, high: float, step: float = BUDGET_RANGE_STEP) -> tuple[float, ...]:
    """The budgets of ``budget_range=(low, high)``: ``low``, ``low + step``, ... up to ``high`` (both
    ends included, rounded to 1e-6 so that equal budgets are equal keys of the per-budget caches)."""
    n = int(np.floor((high - low) / step + 1e-9))
    grid = [round(low + i * step, 6) for i in range(n + 1)]
    if high - grid[-1] > 1e-6:
        grid.append(round(float(high), 6))
    return tuple(grid)


class RemovedSettingError(QenvError):
    """A setting (or value) that an earlier version had and this one removed, turned on."""


def refuse_removed(key: str, value: Any) -> None:
    """One line for a removed setting (or value) that is not off: what it was, and why it went."""
    raise RemovedSettingError(f"{key}={value!r} was removed from QuantLLM-v0: its benchmark moved no loss (BENCHMARKS.md, "
                    "'What these changes did').",
                    f"leave {key} out (a run that trained with it needs the qenv version that wrote it).")


def drop_removed_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` without the removed ones that are off (:data:`REMOVED_SETTINGS`); one that is on
    is an error (:func:`refuse_removed`)."""
    out = dict(settings)
    for key, off in REMOVED_SETTINGS.items():
        if key in out:
            value = out.pop(key)
            same = is_number(value) and is_number(off) and float(value) == float(off)
            if not (same or (isinstance(value, str) and value == off)):
                refuse_removed(key, value)
    return out


#: the version of :meth:`EnvConfig.to_dict`'s layout (raise it when a field changes meaning)
CONFIG_VERSION = 1


@dataclass(frozen=True)
class EnvConfig:
    """Every setting of ``QuantLLM-v0``, checked once when the config is made.

    Task (what is quantized, and scored on what):
        model: a model spec (see :func:`qenv.load_model`) or a tuple of them; with several, each
            episode samples one, for policies that transfer across models.
        data: text file(s) for calibration tokens; default: tokens sampled from the model itself.
        n_tokens, seq_len, batch_size: calibration size and batching.
        device, dtype: where and how the model runs (default: cuda if present).
        seed: seeds the sampled calibration tokens (episodes are seeded through ``reset``).
        include_lm_head: quantize the output head too.
        cache_dir: the on-disk cache (default ``$QENV_CACHE_DIR``, else ``~/.cache/qenv``; false: none).
        weight_cache_gib: memory for quantized weights cached per (layer, rule). Default: sized from
            the model, four recipes of its quantized layers (the whole menu when it is prebuilt), within
            a share of the free memory. Size it to hold every menu rule of every layer for the fastest
            episodes; a size that cannot hold one recipe, or more than the free memory, is an error.
        prebuild: quantize the whole menu for every layer up front (default: on a GPU, when the whole
            menu fits the default cache or the ``weight_cache_gib`` given; else on demand).
        validation_fraction: share of the calibration sequences held back (``split_tokens``, seeded
            by ``seed``): episodes and quantization see only the rest, and the searchers pick their
            final recipe among their finalists by KL on the held-back ones (default 0: none held back).

    Reward (:mod:`qenv.envs.reward`):
        reward: ``kl`` (default), ``ppl`` or ``top1``: the fidelity against the uniform RTN frontier.
        dense_weight: ``-dense_weight · err_b`` at the end of each block (changes the optimum).
        shaping_weight: potential-based shaping from the streamed block errors (keeps the optimum).
        size_weight: ``size_weight · (budget − bpw) / budget`` rewards bits left unused.

    Action (:mod:`qenv.envs.spaces`):
        action_kind: one of :data:`~qenv.envs.kinds.KINDS` (the built-in ones: ``ACTION_SPACE_KINDS``).
        menu: the rules of the menu kinds (default :data:`~qenv.envs.spaces.DEFAULT_MENU`), or
            ``"gguf"``: llama.cpp's own types (needs the ``gguf`` extra).
        observation: ``full`` (default) or ``relative`` (no entry says how large the model is: for
            policies meant for models of other sizes).
        max_deviations: the residual kind's own option (refused for the other kinds): at most this
            many steps per episode leave greedy's plan. Its measured use (BENCHMARKS.md, "Zero-shot
            transfer with a relative observation"): residual policies trained without a limit and
            rolled out under ``max_deviations=12`` beat greedy in 7, 6 and 7 of 12 unseen (model,
            budget) cells on the CPU against 6, 4 and 5 without it; on the H100 zoo 5 of 12 against 3.

    Removed, because their benchmarks moved no loss (BENCHMARKS.md, "What these changes did"):
    ``deviation_cost``, ``replan`` (``greedy``, ``fresh``), ``ladder="frontier"`` and
    ``observation="actions"``. A run's settings that hold them at their old default still load.

    Budget:
        budget_bpw: target bits per weight over the quantizable layers.
        budgets: budgets that each episode samples one of; ``reset(options={"budget_bpw": b})``
            picks one. Default: ``budget_bpw`` only.
        budget_range: ``(low, high)``: each episode draws its budget from this range (on the grid
            of :data:`BUDGET_RANGE_STEP`, both ends included), for one policy over a range of
            budgets (the budget is in the observation). Not with ``budgets``.
        budget_mode: ``hard`` (an action that would break the budget is lowered, and ``info``
            says so; the maskable kinds expose ``action_masks()``) or ``penalty`` (see
            :mod:`qenv.envs.reward`: breaking the budget never pays).
        penalty_weight: the ``penalty`` mode's charge per bit per weight over the budget.
    """

    # task
    model: str | LoadedModel | tuple[str | LoadedModel, ...] = DEFAULT_MODEL
    data: str | tuple[str, ...] | None = None
    n_tokens: int = 2048
    seq_len: int = 128
    batch_size: int = 8
    device: Any = None
    dtype: Any = None
    seed: int = 0
    include_lm_head: bool = False
    cache_dir: str | bool | None = None
    weight_cache_gib: float | None = None
    prebuild: bool | None = None
    validation_fraction: float = 0.0
    # reward
    reward: str = "kl"
    dense_weight: float = 0.0
    shaping_weight: float = 0.0
    size_weight: float = 0.0
    # action
    action_kind: str = "discrete"
    menu: str | tuple[Rule, ...] | None = None
    observation: str = "full"
    max_deviations: int | None = None
    # budget
    budget_bpw: float = 3.0
    budgets: tuple[float, ...] | None = None
    budget_range: tuple[float, float] | None = None
    budget_mode: str = "hard"
    penalty_weight: float = 1.0

    #: the fields of each group, in :meth:`to_dict`'s order
    GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "task": ("model", "data", "n_tokens", "seq_len", "batch_size", "device", "dtype", "seed", "include_lm_head",
                 "cache_dir", "weight_cache_gib", "prebuild", "validation_fraction"),
        "reward": ("reward", "dense_weight", "shaping_weight", "size_weight"),
        "action": ("action_kind", "menu", "observation", *RESIDUAL_ONLY),
        "budget": ("budget_bpw", "budgets", "budget_range", "budget_mode", "penalty_weight"),
    }

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        check_env_arguments(values)
        kind = self.action_kind
        if self.max_deviations is not None and kind != "residual":
            raise QenvError(f"max_deviations={self.max_deviations} applies to the residual action kind, not {kind!r}.",
                            "use action_kind='residual', or leave max_deviations unset.")
        # one spelling per value, so that equal settings are equal configs (and from_dict(to_dict(c)) == c)
        model = self.model
        models = (model,) if isinstance(model, (str, Path, LoadedModel)) else tuple(model)
        if not models:
            raise QenvError("No model was given.", "pass model='default', a path, a hub id, or a list of them.")
        models = tuple(m if isinstance(m, LoadedModel) else str(m) for m in models)
        setattr_ = object.__setattr__
        setattr_(self, "model", models[0] if len(models) == 1 and not isinstance(model, (list, tuple)) else models)
        if isinstance(self.data, (list, tuple)):
            setattr_(self, "data", tuple(str(d) for d in self.data))
        elif isinstance(self.data, Path):
            setattr_(self, "data", str(self.data))
        if isinstance(self.cache_dir, Path):
            setattr_(self, "cache_dir", str(self.cache_dir))
        setattr_(self, "budget_bpw", float(self.budget_bpw))  # 3 and 3.0 are one budget (and one summary.json)
        if self.budgets is not None:
            setattr_(self, "budgets", tuple(float(b) for b in self.budgets))
        if self.budget_range is not None:
            if self.budgets is not None:
                raise QenvError(f"budgets={list(self.budgets)} and budget_range={list(self.budget_range)} both say "
                                "which budgets episodes draw.", "pass only one of them.")
            setattr_(self, "budget_range", tuple(float(b) for b in self.budget_range))
        if self.menu is not None and not isinstance(self.menu, str):
            setattr_(self, "menu", parse_menu(self.menu))

    @property
    def episode_budgets(self) -> tuple[float, ...] | None:
        """The budgets episodes draw from (``budgets``, or ``budget_range``'s grid); ``None``: ``budget_bpw`` only."""
        if self.budget_range is not None:
            return budget_grid(*self.budget_range)
        return self.budgets

    @property
    def models(self) -> tuple[str | LoadedModel, ...]:
        """The model specs, one per model of the env (a single model is a tuple of one)."""
        return self.model if isinstance(self.model, tuple) else (self.model,)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EnvConfig:
        """A config from the environment's keyword arguments (``gym.make("QuantLLM-v0", **kwargs)``);
        an unknown key is an error that lists the known ones, a removed one is dropped where it is
        off (:func:`drop_removed_settings`)."""
        kwargs = drop_removed_settings(kwargs)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in kwargs if k not in known)
        if unknown:
            raise QenvError(f"QuantLLM-v0 has no setting {', '.join(map(repr, unknown))}.",
                            f"use only {sorted(known)}.")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values, by group, with the layout's version."""
        out: dict[str, Any] = {"version": CONFIG_VERSION}
        for group, names in self.GROUPS.items():
            out[group] = {name: _plain(name, getattr(self, name)) for name in names}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EnvConfig:
        """The config :meth:`to_dict` wrote (from a run's ``config.json``: untrusted input, checked
        as any settings are; unknown groups, keys or versions are refused)."""
        if not isinstance(data, Mapping) or data.get("version") != CONFIG_VERSION:
            version = data.get("version") if isinstance(data, Mapping) else None
            raise QenvError(f"The environment settings have version {version!r}, not {CONFIG_VERSION}.",
                            "write them with EnvConfig.to_dict() of this qenv.")
        unknown = sorted(str(k) for k in data if k != "version" and k not in cls.GROUPS)
        if unknown:
            raise QenvError(f"The environment settings have unknown group(s) {unknown}.",
                            f"use only {sorted(cls.GROUPS)}.")
        kwargs: dict[str, Any] = {}
        for group, names in cls.GROUPS.items():
            values = data.get(group, {})
            if not isinstance(values, Mapping):
                raise QenvError(f"The environment settings' {group!r} group is not a mapping.",
                                "write them with EnvConfig.to_dict().")
            values = drop_removed_settings(values)  # written by an earlier version, with the removed ones
            extra = sorted(str(k) for k in values if k not in names)
            if extra:
                raise QenvError(f"The environment settings' {group!r} group has unknown key(s) {extra}.",
                                f"use only {list(names)}.")
            kwargs.update(values)
        if isinstance(kwargs.get("model"), list):
            kwargs["model"] = tuple(kwargs["model"])
        return cls(**kwargs)

    def action_mapper(self, kind: Any = None) -> ActionMapper:
        """The mapper of this config's actions: the env's own (``kind``: its :data:`KINDS` object, made
        here when not given), and what the programs check a policy or an agent against before any
        model loads."""
        kind = KINDS[self.action_kind].from_config(self) if kind is None else kind
        return ActionMapper(self.action_kind, self.menu, space=kind.space(parse_menu(self.menu)))

    def env_kwargs(self) -> dict[str, Any]:
        """The settings as ``QuantLLMEnv`` keyword arguments (what ``from_kwargs`` reads back)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _plain(name: str, value: Any) -> Any:
    """One setting as a JSON value (rules as their dicts, tuples as lists, devices and dtypes by name)."""
    if isinstance(value, LoadedModel) or (isinstance(value, tuple) and any(isinstance(v, LoadedModel) for v in value)):
        raise QenvError("A config with an already loaded model cannot be written out.",
                        "make the environment from a model spec (a path, hub id or built-in name).")
    if isinstance(value, tuple):
        return [v.to_dict() if isinstance(v, Rule) else v for v in value]
    if name in ("device", "dtype") and value is not None and not isinstance(value, str):
        return str(value).removeprefix("torch.")
    return value
