"""Action-space kinds: how an agent's action becomes a survival rule.

``discrete`` picks from a menu of rules (PPO, A2C, DQN); ``multidiscrete`` picks each knob
(bits × group × surviving fraction × rounding; with ``menu="gguf"``: llama.cpp type × importance
matrix); ``continuous`` maps a Box in [-1, 1] to the same knobs HAQ-style, so SAC, TD3 and DDPG
have something to act on. Every kind can also list the
rules it can produce, which the budget enforcement uses to find a cheaper substitute.
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

ACTION_SPACE_KINDS: tuple[str, ...] = ("discrete", "multidiscrete", "continuous")

DEFAULT_MENU: tuple[Rule, ...] = (
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

#: ``menu="gguf"``: llama.cpp's own types (quantized by llama.cpp, charged at its bytes), with and without
#: the importance matrix, from 2.3 to 8.5 bpw (:data:`qenv.quant.gguf.MENU_TYPES`)
GGUF_MENU: tuple[Rule, ...] = tuple(Rule(gguf=t, imatrix=im) for t, im in _gguf.MENU_TYPES)
#: named menus
MENUS: dict[str, tuple[Rule, ...]] = {"default": DEFAULT_MENU, "gguf": GGUF_MENU}

#: knob values of the multidiscrete and continuous kinds
KNOB_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
KNOB_GROUPS: tuple[int, ...] = (32, 64, 128, -1)
KNOB_OUTLIERS: tuple[float, ...] = (0.0, 0.005, 0.01)
KNOB_ROUNDINGS: tuple[str, ...] = ("nearest", "gptq")


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


class ActionMapper:
    """Maps actions of one space kind to rules."""

    def __init__(self, kind: str, menu: Sequence[Rule] | None = None) -> None:
        if kind not in ACTION_SPACE_KINDS:
            raise QenvError(f"Unknown action space kind {kind!r}.", f"use one of {ACTION_SPACE_KINDS}.")
        self.kind = kind
        self.menu = parse_menu(menu)
        if kind == "discrete":
            self.space: spaces.Space = spaces.Discrete(len(self.menu))
            self.rules: tuple[Rule, ...] = self.menu
        else:
            # over llama.cpp's types when the menu is the GGUF one: (type, importance matrix)
            self.gguf = all(r.gguf is not None for r in self.menu)
            knobs = self._knobs()
            self.rules = tuple(dict.fromkeys(self._knob_rule(*combo) for combo in itertools.product(*knobs)))
            if kind == "multidiscrete":
                self.space = spaces.MultiDiscrete([len(k) for k in knobs])
            else:
                self.space = spaces.Box(-1.0, 1.0, shape=(len(knobs),), dtype=np.float32)

    def _knobs(self) -> tuple[tuple[Any, ...], ...]:
        if getattr(self, "gguf", False):
            types = tuple(dict.fromkeys(r.gguf for r in sorted(self.menu, key=lambda r: _gguf.nominal_bpw(r.gguf))))
            return (types, (False, True))
        return (KNOB_BITS, KNOB_GROUPS, KNOB_OUTLIERS, KNOB_ROUNDINGS)

    def _knob_rule(self, *values: Any) -> Rule:
        if getattr(self, "gguf", False):
            qtype, imatrix = values
            return Rule(gguf=qtype, imatrix=bool(imatrix) or qtype in _gguf.REQUIRES_IMATRIX)
        bits, group, outliers, rounding = values
        return Rule(bits=bits, group_size=group, outlier_fraction=outliers, rounding=rounding)

    def to_rule(self, action: Any) -> Rule:
        raw = np.asarray(action)
        if raw.size == 0 or (np.issubdtype(raw.dtype, np.number) and not np.isfinite(raw.astype(np.float64)).all()) \
                or not (np.issubdtype(raw.dtype, np.number) or raw.dtype == bool):
            raise QenvError(f"Action {action!r} is not a finite number (NaN, inf or not numeric).",
                            "check the agent's output: a policy that returns NaN has diverged (lower the learning "
                            "rate, or clip the actions it returns).")
        if self.kind == "discrete":
            index = int(raw.reshape(-1)[0])
            if not 0 <= index < len(self.menu):
                raise QenvError(f"Action {index} is outside the menu of {len(self.menu)} rules.")
            return self.menu[index]
        knobs = self._knobs()
        values = np.asarray(action, dtype=np.float64).reshape(-1)
        if values.shape[0] != len(knobs):
            names = "(type, imatrix)" if getattr(self, "gguf", False) else "(bits, group, outliers, rounding)"
            raise QenvError(f"Action {action!r} must have {len(knobs)} entries {names}.")
        if self.kind == "multidiscrete":
            idx = [int(np.clip(v, 0, len(k) - 1)) for v, k in zip(values, knobs)]
        else:  # HAQ-style: [-1, 1] split into equal bins per knob
            idx = [int(np.clip(np.floor((v + 1.0) / 2.0 * len(k)), 0, len(k) - 1)) for v, k in zip(values, knobs)]
        return self._knob_rule(*(k[i] for k, i in zip(knobs, idx)))

    def rule_index(self, rule: Rule) -> int:
        """Position of ``rule`` among the rules this space can produce (for observations)."""
        try:
            return self.rules.index(rule)
        except ValueError:
            return -1
