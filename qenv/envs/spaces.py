"""Action-space kinds: how an agent's action becomes a survival rule.

Kinds whose action names one rule, whatever the state (``RULE_KINDS``):

- ``discrete``: an index into a menu of rules (PPO, A2C, DQN, MaskablePPO);
- ``multidiscrete``: one index per knob (bits × group × surviving fraction × rounding;
  with ``menu="gguf"``: llama.cpp type × importance matrix, also for ``continuous`` and ``rule``);
- ``continuous``: a Box in [-1, 1] split HAQ-style into equal bins per knob, over every knob a
  :class:`~qenv.quant.rules.Rule` has (``FULL_KNOBS``: bits, group, outlier fraction, rounding,
  clip (or MSE-searched clip), salience exponents a, b, c, ``act_scale``, symmetric), so SAC,
  TD3 and DDPG can invent rules that no menu lists;
- ``rule``: the same full knob set as a MultiDiscrete (one index per knob, maskable).

The rounding knob of ``continuous`` and ``rule`` has three values: nearest, GPTQ, and ``learned``
(GPTQ's storage with codes and scales learned on the layer's Hessian, a rule no human preset uses).

Budget-complete kinds, whose action is read against the episode's state (the environment
decodes them; ``mapper.rules`` is the menu they choose from):

- ``relative``: a shift of bits per weight from the even share of the budget left
  (``RELATIVE_DELTAS``); the layer gets the most accurate menu rule at or under that width;
- ``residual``: a shift along the layer's menu rules (sorted by cost) from greedy's plan
  (``RESIDUAL_SHIFTS``); action 0 everywhere reproduces the ``greedy`` searcher's recipe;
- ``allocation``: a preference in [-1, 1] per layer; after the last layer a deterministic
  projection (greedy on preference-weighted sensitivities, then filled) turns the preferences
  into a recipe that meets the budget with less than one menu step unused.

Every kind lists the rules it can produce (``rules``), which the budget enforcement uses to find
a cheaper substitute.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces

from qenv.errors import QenvError
from qenv.quant import gguf as _gguf
from qenv.quant.rules import Rule

ACTION_SPACE_KINDS: tuple[str, ...] = ("discrete", "multidiscrete", "continuous", "relative", "allocation",
                                       "residual", "rule")
#: kinds whose action always names the same rule (searchers replay recipes through these)
RULE_KINDS: tuple[str, ...] = ("discrete", "multidiscrete", "continuous", "rule")
#: kinds with an ``action_masks()`` (Discrete and MultiDiscrete spaces)
MASKABLE_KINDS: tuple[str, ...] = ("discrete", "multidiscrete", "relative", "residual", "rule")
#: the Gymnasium space family of each kind (what an algorithm must handle)
SPACE_FAMILY: dict[str, str] = {"discrete": "discrete", "multidiscrete": "multidiscrete", "continuous": "continuous",
                                "relative": "discrete", "residual": "discrete", "allocation": "continuous",
                                "rule": "multidiscrete"}

#: the menu of the 13 rules qenv had before every human rule joined it (``menu="compact"``): runs and
#: policies trained with it keep their action space
COMPACT_MENU: tuple[Rule, ...] = (
    Rule(bits=2, group_size=64),
    Rule(bits=2, group_size=32, act_scale=0.5, mse_clip=True),
    Rule(bits=3, group_size=128),
    Rule(bits=3, group_size=128, act_scale=0.5, mse_clip=True),
    Rule(bits=3, group_size=128, rounding="gptq"),
    Rule(bits=3, group_size=32, act_scale=0.5, mse_clip=True),
    Rule(bits=3, group_size=64, rounding="gptq", outlier_fraction=0.005),
    Rule(bits=4, group_size=128),
    Rule(bits=4, group_size=128, act_scale=0.5, mse_clip=True),
    Rule(bits=4, group_size=128, rounding="gptq"),
    Rule(bits=5, group_size=128),
    Rule(bits=6, group_size=128),
    Rule(bits=8, group_size=128),
)
#: the low bit widths where the presets' smaller groups (``-g64``, ``-g32``) are what fits a budget best
#: (bench_quality's best-fitting presets at 2.5-4.0 bpw are all w2/w3 at g64/g32)
SMALL_GROUP_BITS: tuple[int, ...] = (2, 3)
#: bit widths that also get GPTQ combined with AWQ's scale and with MSE clipping
COMBINED_BITS: tuple[int, ...] = (2, 3, 4)


def _human_rules() -> tuple[Rule, ...]:
    """Every human rule (see :data:`DEFAULT_MENU`), cheapest bit width first."""
    rules: list[Rule] = []
    for bits in (2, 3, 4, 5, 6, 8):
        groups = (128, 64, 32) if bits in SMALL_GROUP_BITS else (128,)
        for group in groups:
            rules += [Rule(bits=bits, group_size=group), Rule(bits=bits, group_size=group, rounding="gptq"),
                      Rule(bits=bits, group_size=group, act_scale=0.5, mse_clip=True)]
        if bits in COMBINED_BITS:
            rules += [Rule(bits=bits, group_size=128, rounding="gptq", act_scale=0.5),  # AWQ then GPTQ
                      Rule(bits=bits, group_size=128, rounding="gptq", mse_clip=True)]
    return tuple(rules)


#: the default menu: the compact menu's 13 rules (same indices), then every human rule it lacked:
#: RTN, GPTQ and AWQ (:func:`qenv.quant.presets.rtn` / ``gptq`` / ``awq``) at every bit width (2, 3, 4, 5,
#: 6, 8) with the presets' default group of 128, and at 2 and 3 bits with the groups of 64 and 32 the
#: ``-g64``/``-g32`` presets use; GPTQ after AWQ's activation scale ("AWQ then GPTQ") and GPTQ with
#: MSE-searched clipping at 2, 3 and 4 bits. Every uniform preset of those groups is one menu entry
#: (``tests/test_quant.py`` checks it); :func:`qenv.quant.presets.menu_table` prints each rule's bpw.
DEFAULT_MENU: tuple[Rule, ...] = COMPACT_MENU + tuple(r for r in _human_rules() if r not in COMPACT_MENU)

#: bit widths of the learned rules (``rounding="learned"``, group 128): the widths of the gptq-w2/w3/w4
#: presets, where a search at a human preset's size spends its bits
LEARNED_BITS: tuple[int, ...] = (2, 3, 4)
#: rules no human preset uses: GPTQ's storage (so GPTQ's size to the bit), started from GPTQ with
#: MSE-searched clipping (the best human rule of that size on stories260K and the default model), with
#: the codes and group scales then learned on the layer's calibration Hessian
#: (:func:`qenv.quant.quantizer._learned`); the clipped start measured better than the plain one in
#: all 8 (model, width, text) cells of BENCHMARKS.md
LEARNED_RULES: tuple[Rule, ...] = tuple(Rule(bits=b, group_size=128, rounding="learned", mse_clip=True)
                                        for b in LEARNED_BITS)
#: ``menu="learned"``: the default menu (same indices), then :data:`LEARNED_RULES`. Opt-in, because a
#: learned rule costs several GPTQs to build (BENCHMARKS.md) and the menu's build and greedy's
#: per-(layer, rule) errors grow with every rule
LEARNED_MENU: tuple[Rule, ...] = DEFAULT_MENU + LEARNED_RULES

#: ``menu="gguf"``: llama.cpp's own types (quantized by llama.cpp, charged at its bytes), with and without
#: the importance matrix, from 2.3 to 8.5 bpw (:data:`qenv.quant.gguf.MENU_TYPES`)
GGUF_MENU: tuple[Rule, ...] = tuple(Rule(gguf=t, imatrix=im) for t, im in _gguf.MENU_TYPES)
#: named menus
MENUS: dict[str, tuple[Rule, ...]] = {"default": DEFAULT_MENU, "compact": COMPACT_MENU, "gguf": GGUF_MENU,
                                      "learned": LEARNED_MENU}

#: knob values of the multidiscrete and continuous kinds
KNOB_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
KNOB_GROUPS: tuple[int, ...] = (32, 64, 128, -1)
KNOB_OUTLIERS: tuple[float, ...] = (0.0, 0.005, 0.01)
KNOB_ROUNDINGS: tuple[str, ...] = ("nearest", "gptq")
#: the rounding knob of the continuous and rule kinds, which also reach the learned rounding (the
#: multidiscrete kind keeps its two, so its space and the policies trained on it are unchanged)
KNOB_FULL_ROUNDINGS: tuple[str, ...] = KNOB_ROUNDINGS + ("learned",)
#: the further knobs of the continuous and rule kinds ("mse": the clip searched per group)
KNOB_CLIPS: tuple[float | str, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, "mse")
KNOB_SALIENCE: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
KNOB_ACT_SCALES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
KNOB_SYMMETRIC: tuple[bool, ...] = (False, True)
#: every knob of a Rule, in action order: bits, group, outliers, rounding, clip, a, b, c, act_scale, symmetric
FULL_KNOBS: tuple[tuple[Any, ...], ...] = (KNOB_BITS, KNOB_GROUPS, KNOB_OUTLIERS, KNOB_FULL_ROUNDINGS, KNOB_CLIPS,
                                           KNOB_SALIENCE, KNOB_SALIENCE, KNOB_SALIENCE, KNOB_ACT_SCALES, KNOB_SYMMETRIC)
#: residual kind: action -> shift along the layer's cost-sorted menu from greedy's plan (0 = greedy)
RESIDUAL_SHIFTS: tuple[int, ...] = (0, 1, -1, 2, -2, 3, -3)
#: relative kind: action -> bits per weight above the even share of the budget left
RELATIVE_DELTAS: tuple[float, ...] = (0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0)


def parse_menu(menu: Sequence[Rule | dict[str, Any] | str] | None) -> tuple[Rule, ...]:
    """A menu from rules, rule dicts or preset-style labels; rejects an empty or malformed menu."""
    if menu is None:
        return DEFAULT_MENU
    if isinstance(menu, str) and menu.lower() in MENUS:
        return MENUS[menu.lower()]
    if isinstance(menu, (str, bytes)) or not isinstance(menu, Sequence):
        raise QenvError(f"The rule menu must be a list of rules or one of {sorted(MENUS)}, got {menu!r}.",
                        "pass e.g. menu='gguf' or menu=[{'bits': 4}, {'bits': 8}].")
    if len(menu) == 0:
        raise QenvError("The rule menu is empty.", "pass at least one rule, or omit `menu` for the default menu.")
    rules = []
    for item in menu:
        if isinstance(item, Rule):
            rules.append(item)
        elif isinstance(item, dict):
            rules.append(Rule.from_dict(item))
        else:
            raise QenvError(f"Menu entry {item!r} is not a rule.", "give each entry as a dict of rule fields, e.g. {'bits': 4, 'group_size': 128}.")
    if len(set(rules)) != len(rules):
        raise QenvError("The rule menu lists the same rule twice.", "remove the duplicates.")
    return tuple(rules)


def check_finite_action(action: Any) -> np.ndarray:
    """``action`` as an array, or a clear error when it is empty, not numeric, NaN or infinite (a
    policy that returns NaN has diverged; rounding or clipping it would hide that)."""
    raw = np.asarray(action)
    if raw.dtype.kind in "iub" and raw.size:  # whole numbers and booleans are finite (the common case, fast)
        return raw
    if raw.size == 0 or (np.issubdtype(raw.dtype, np.number) and not np.isfinite(raw.astype(np.float64)).all()) \
            or not (np.issubdtype(raw.dtype, np.number) or raw.dtype == bool):
        raise QenvError(f"Action {action!r} is not a finite number (NaN, inf or not numeric).",
                        "check the agent's output: a policy that returns NaN has diverged (lower the learning "
                        "rate, or clip the actions it returns).")
    return raw


class ActionMapper:
    """Maps actions of one space kind to rules (state-dependent kinds are decoded by the env)."""

    def __init__(self, kind: str, menu: Sequence[Rule] | None = None, space: spaces.Space | None = None) -> None:
        """``space``: the space of a kind added beyond the built-in ones (:mod:`qenv.envs.kinds`),
        whose actions are read against the episode's state and choose from the menu."""
        if kind not in ACTION_SPACE_KINDS and space is None:
            raise QenvError(f"Unknown action space kind {kind!r}.", f"use one of {ACTION_SPACE_KINDS}.")
        self.kind = kind
        self.menu = parse_menu(menu)
        self.knobs: tuple[tuple[Any, ...], ...] = ()
        self.gguf = False
        self._rule_positions: dict[Rule, int] | None = None  # rule -> its index, built on first use
        if space is not None:
            self.rules: tuple[Rule, ...] = self.menu
            self.space: spaces.Space = space
        elif kind in ("discrete", "relative", "residual", "allocation"):
            self.rules = self.menu
            if kind == "discrete":
                self.space = spaces.Discrete(len(self.menu))
            elif kind == "relative":
                self.space = spaces.Discrete(len(RELATIVE_DELTAS))
            elif kind == "residual":
                self.space = spaces.Discrete(len(RESIDUAL_SHIFTS))
            else:
                self.space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        else:
            # over llama.cpp's types when the menu is the GGUF one: (type, importance matrix)
            self.gguf = all(r.gguf is not None for r in self.menu)
            if self.gguf:
                types = tuple(dict.fromkeys(r.gguf for r in sorted(self.menu, key=lambda r: _gguf.nominal_bpw(r.gguf))))
                lattice: tuple[tuple[Any, ...], ...] = (types, (False, True))
                self.knobs = lattice
            else:
                roundings = KNOB_ROUNDINGS if kind == "multidiscrete" else KNOB_FULL_ROUNDINGS
                lattice = (KNOB_BITS, KNOB_GROUPS, KNOB_OUTLIERS, roundings)
                self.knobs = lattice if kind == "multidiscrete" else FULL_KNOBS
            self.rules = tuple(dict.fromkeys(self._knob_rule(*combo) for combo in itertools.product(*lattice)))
            if kind == "continuous":
                self.space = spaces.Box(-1.0, 1.0, shape=(len(self.knobs),), dtype=np.float32)
            else:
                self.space = spaces.MultiDiscrete([len(k) for k in self.knobs])

    def check_action(self, action: Any) -> np.ndarray:
        """``action`` as an array of this kind's space, or a clear error: an action the space does
        not contain is refused, never rounded or cut (``2.7``, ``-0.5``, ``[3, 99]``, ``1+0j`` for a
        Discrete space; ``[1.9] * 4`` for a MultiDiscrete one; a Box vector of the wrong length or
        outside its bounds). Numpy integers and 0-d arrays, as SB3 passes them, are whole numbers;
        a single-entry vector counts as its entry."""
        space = self.space
        raw = np.asarray(action)
        # NaN and inf say the policy diverged (check_finite_action's message); other non-reals are refused below
        raw = check_finite_action(raw) if raw.dtype.kind in "iufb" else raw
        whole = raw.dtype.kind in "iu"  # bools and floats are not indices, even 2.0 (gymnasium agrees)
        if isinstance(space, spaces.Discrete):
            ok = whole and raw.ndim <= 1 and raw.size == 1 and space.contains(int(raw.reshape(-1)[0]))
            need = f"one whole number from 0 to {int(space.n) - 1}"
        elif isinstance(space, spaces.MultiDiscrete):
            ok = whole and raw.shape == space.shape and bool(np.all(raw >= 0)) and bool(np.all(raw < space.nvec))
            need = f"{len(space.nvec)} whole numbers, each from 0 to its knob's count - 1 ({space.nvec.tolist()})"
        else:
            box: spaces.Box = space  # type: ignore[assignment]
            values = raw.reshape(-1)
            ok = raw.dtype.kind in "iuf" and raw.ndim <= 1 and values.size == box.low.size \
                and bool(np.all(values >= box.low - 1e-6)) and bool(np.all(values <= box.high + 1e-6))
            need = f"{box.low.size} real number(s) in [{float(box.low.min()):g}, {float(box.high.max()):g}]"
        if not ok:
            raise QenvError(f"Action {action!r} is not in the {self.kind} action space {space}.",
                            f"pass {need}; an action outside the space is refused, not rounded.")
        return raw

    @property
    def stateful(self) -> bool:
        """True when an action's rule depends on the episode (relative, residual, allocation)."""
        return self.kind not in RULE_KINDS

    def _knob_rule(self, *values: Any) -> Rule:
        if getattr(self, "gguf", False):
            qtype, imatrix = values
            return Rule(gguf=qtype, imatrix=bool(imatrix) or qtype in _gguf.REQUIRES_IMATRIX)
        return self._lattice_rule(*values)

    @staticmethod
    def _lattice_rule(bits: int, group: int, outliers: float, rounding: str, clip: float | str = 1.0, a: float = 1.0,
                      b: float = 0.0, c: float = 0.0, act_scale: float = 0.0, symmetric: bool = False) -> Rule:
        return Rule(bits=bits, group_size=group, outlier_fraction=outliers, rounding=rounding,
                    clip=1.0 if clip == "mse" else float(clip), mse_clip=clip == "mse", salience=(a, b, c),
                    act_scale=act_scale, symmetric=symmetric)

    def knob_indices(self, action: Any) -> list[int]:
        """The knob indices of a multidiscrete, continuous or rule action."""
        values = np.asarray(action, dtype=np.float64).reshape(-1)
        if values.shape[0] != len(self.knobs):
            names = "(type, imatrix)" if getattr(self, "gguf", False) else "one per knob"
            raise QenvError(f"Action {action!r} must have {len(self.knobs)} entries, {names}.")
        if self.kind == "continuous":  # HAQ-style: [-1, 1] split into equal bins per knob
            return [int(np.clip(np.floor((v + 1.0) / 2.0 * len(k)), 0, len(k) - 1)) for v, k in zip(values, self.knobs)]
        for v, k in zip(values, self.knobs):
            if not 0 <= v < len(k):
                raise QenvError(f"Action {action!r} has a knob index outside its range: {v:g} is not in 0..{len(k) - 1}.",
                                f"give one index per knob within the action space ({self.kind}: "
                                f"{[len(k) for k in self.knobs]} choices).")
        return [int(v) for v in values]

    def to_rule(self, action: Any) -> Rule:
        if self.stateful:
            raise QenvError(f"A {self.kind!r} action has no rule of its own: it is read against the episode's state.",
                            "step the environment with it (env.step), or use a discrete/multidiscrete/continuous/rule env.")
        raw = self.check_action(action)
        if self.kind == "discrete":
            index = int(raw.reshape(-1)[0])
            if not 0 <= index < len(self.menu):
                raise QenvError(f"Action {index} is outside the menu of {len(self.menu)} rules.")
            return self.menu[index]
        idx = self.knob_indices(action)
        return self._knob_rule(*(k[i] for k, i in zip(self.knobs, idx)))

    def rule_indices(self, rule: Rule) -> list[int] | None:
        """The knob indices that produce ``rule`` (``None`` when the knobs cannot)."""
        if getattr(self, "gguf", False):
            values: tuple[Any, ...] = (rule.gguf, rule.imatrix)
        else:
            values = (rule.bits, rule.group_size, rule.outlier_fraction, rule.rounding,
                      "mse" if rule.mse_clip else rule.clip, *rule.salience, rule.act_scale, rule.symmetric)
        values = values[:len(self.knobs)]
        if not all(v in k for v, k in zip(values, self.knobs)):
            return None
        idx = [k.index(v) for v, k in zip(values, self.knobs)]
        return idx if self._knob_rule(*(k[i] for k, i in zip(self.knobs, idx))) == rule else None

    def rule_index(self, rule: Rule) -> int:
        """Position of ``rule`` among the rules this space can produce (for observations)."""
        if self._rule_positions is None:  # built once: a scan of the rules is slow for big spaces
            positions: dict[Rule, int] = {}
            for i, r in enumerate(self.rules):
                positions.setdefault(r, i)  # the first, as tuple.index
            self._rule_positions = positions
        return self._rule_positions.get(rule, -1)
