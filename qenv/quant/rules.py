"""Survival rules: how one layer's weights survive quantization.

A :class:`Rule` is frozen and hashable so that quantized weights can be cached per
``(layer, rule)`` and recipes can be compared, hashed and stored as JSON.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qenv.errors import QenvError
from qenv.io import read_json, write_json_atomic
from qenv.quant import gguf as _gguf

ALLOWED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 16)
ALLOWED_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, -1)  # -1: one group per output channel
ROUNDINGS: tuple[str, ...] = ("nearest", "gptq", "learned")
#: roundings that read the layer's calibration Hessian ``XᵀX / n``
HESSIAN_ROUNDINGS: tuple[str, ...] = ("gptq", "learned")
MAX_OUTLIER_FRACTION = 0.05
#: bits used to store one fp16 value (scales, surviving weights, kept layers)
FP16_BITS = 16


@dataclass(frozen=True)
class Rule:
    """How the weights of one layer survive.

    ``bits=16`` keeps the layer in fp16. Otherwise weights are split into groups of
    ``group_size`` consecutive input channels (``-1``: one group per output row), each group
    stores an fp16 scale (and a ``bits``-wide zero point when asymmetric), and a fraction
    ``outlier_fraction`` of the weights with the highest salience
    ``|w|^a * rms(x)^b * diag(H)^c`` (``salience=(a, b, c)``) survive in fp16 beside the codes.
    ``clip`` shrinks each group's range (``mse_clip`` searches it per group instead);
    ``rounding="gptq"`` feeds the rounding error forward through the calibration Hessian;
    ``rounding="learned"`` starts from GPTQ and then learns the codes and the group scales on the
    same Hessian (coordinate descent on the codes, least squares on the scales; no human preset
    does this): the layer's output error on calibration inputs never ends above GPTQ's, and the
    storage (codes, scales, zero points) is GPTQ's, so the bits are identical;
    ``act_scale`` > 0 scales input channels by ``rms(x)^act_scale`` before quantizing and back
    after (AWQ's equivalent transform, free at inference because it folds into the previous op).

    ``gguf="Q4_K"`` (a llama.cpp type, see :data:`qenv.quant.gguf.RULE_TYPES`) makes the rule
    llama.cpp's own: the layer is quantized by llama.cpp's ``ggml_quantize_chunk`` (with the
    calibration importance matrix when ``imatrix=True``) and charged at llama.cpp's exact bytes,
    after llama-quantize's fallback for rows the type cannot hold. The other knobs do not apply
    to such a rule and are normalised away; ``bits`` reports the type's nominal width.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    clip: float = 1.0
    mse_clip: bool = False
    outlier_fraction: float = 0.0
    salience: tuple[float, float, float] = (1.0, 0.0, 0.0)
    rounding: str = "nearest"
    act_scale: float = 0.0
    gguf: str | None = None
    imatrix: bool = False

    def __hash__(self) -> int:
        # Rules key every cache (quantized weights per (layer, rule), prefix keys of whole recipes):
        # the hash is computed once per rule instead of over its eleven fields at every lookup
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in fields(self)))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_hash", None)  # str hashes differ between processes: never carried over
        return state

    def __post_init__(self) -> None:
        if self.gguf is not None:
            qtype = _gguf.check_type(self.gguf)
            imatrix = self.imatrix
            if not isinstance(imatrix, bool):
                raise QenvError(f"Rule imatrix={imatrix!r} must be true or false.")
            if qtype in _gguf.REQUIRES_IMATRIX and not imatrix:
                raise QenvError(f"llama.cpp type {qtype} needs an importance matrix (llama-quantize refuses it "
                                "without one).", f"use {{'gguf': '{qtype}', 'imatrix': true}}.")
            for f in fields(self):
                object.__setattr__(self, f.name, f.default)
            object.__setattr__(self, "bits", _gguf.RULE_TYPES[qtype])
            object.__setattr__(self, "gguf", qtype)
            object.__setattr__(self, "imatrix", imatrix)
            return
        if self.imatrix:
            raise QenvError("Rule imatrix=True applies only to llama.cpp types.",
                            "add gguf='<type>' (e.g. gguf='Q4_K') or drop imatrix.")
        if self.bits not in ALLOWED_BITS:
            raise QenvError(f"Rule bits={self.bits!r} is not supported.", f"use one of {ALLOWED_BITS}.")
        if self.group_size not in ALLOWED_GROUP_SIZES:
            raise QenvError(
                f"Rule group_size={self.group_size!r} is not supported.",
                f"use one of {ALLOWED_GROUP_SIZES} (-1 means per output channel).",
            )
        if not 0.0 < float(self.clip) <= 1.0:
            raise QenvError(f"Rule clip={self.clip!r} must be in (0, 1].", "use 1.0 for no clipping.")
        if not 0.0 <= float(self.outlier_fraction) <= MAX_OUTLIER_FRACTION:
            raise QenvError(
                f"Rule outlier_fraction={self.outlier_fraction!r} is out of range.",
                f"use a fraction between 0 and {MAX_OUTLIER_FRACTION}.",
            )
        if self.rounding not in ROUNDINGS:
            raise QenvError(f"Rule rounding={self.rounding!r} is unknown.", f"use one of {ROUNDINGS}.")
        salience = tuple(float(x) for x in self.salience)
        if len(salience) != 3 or not all(math.isfinite(x) for x in salience):
            raise QenvError(f"Rule salience={self.salience!r} must be three finite exponents (a, b, c).")
        object.__setattr__(self, "salience", salience)
        if not 0.0 <= float(self.act_scale) <= 1.0:
            raise QenvError(f"Rule act_scale={self.act_scale!r} must be in [0, 1].")
        if self.bits == 16:
            # Keeping the layer ignores every other knob: normalise so that all keep-rules are equal.
            for f in fields(self):
                if f.name != "bits":
                    object.__setattr__(self, f.name, f.default)

    @property
    def keeps(self) -> bool:
        """True when the layer stays in fp16."""
        return self.bits == 16

    @property
    def needs_calibration(self) -> bool:
        """True when quantizing with this rule reads activation statistics."""
        if self.gguf is not None:
            return self.imatrix
        b, c = self.salience[1], self.salience[2]
        uses_salience = self.outlier_fraction > 0 and (b != 0 or c != 0)
        return self.uses_hessian or self.act_scale > 0 or uses_salience or self.mse_clip

    @property
    def uses_hessian(self) -> bool:
        """True when the rounding reads the layer's calibration Hessian (GPTQ, learned)."""
        return self.gguf is None and self.rounding in HESSIAN_ROUNDINGS

    def label(self) -> str:
        """A short human-readable name, e.g. ``w4g128a`` or ``w3g64s-gptq-o1%``."""
        if self.keeps:
            return "fp16"
        if self.gguf is not None:
            return self.gguf + ("-im" if self.imatrix else "")
        group = "c" if self.group_size == -1 else str(self.group_size)
        text = f"w{self.bits}g{group}{'s' if self.symmetric else 'a'}"
        if self.rounding != "nearest":
            text += f"-{self.rounding}"
        if self.mse_clip:
            text += "-mse"
        elif self.clip < 1.0:
            text += f"-clip{self.clip:g}"
        if self.outlier_fraction > 0:
            text += f"-o{self.outlier_fraction * 100:g}%"
            if self.salience != (1.0, 0.0, 0.0):
                text += "[" + ",".join(f"{x:g}" for x in self.salience) + "]"
        if self.act_scale > 0:
            text += f"-awq{self.act_scale:g}"
        return text

    def to_dict(self) -> dict[str, Any]:
        # asdict is slow (it deep-copies); episodes write every layer's rule into their info, so the
        # fields of each (immutable) rule are computed once
        if self.gguf is not None:
            return {"gguf": self.gguf, "imatrix": self.imatrix}
        data = {**_rule_fields(self), "salience": list(self.salience)}
        del data["gguf"], data["imatrix"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        if not isinstance(data, Mapping):
            raise QenvError(f"A rule must be a mapping of rule fields, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise QenvError(f"Unknown rule field(s) {unknown}.", f"use only {sorted(known)}.")
        values = dict(data)
        try:
            if "salience" in values:
                values["salience"] = tuple(values["salience"])
            return cls(**values)
        except (TypeError, ValueError) as exc:  # wrong value types (e.g. salience 1, clip "high")
            raise QenvError(f"Malformed rule {dict(data)!r}: {exc}.") from None


KEEP = Rule(bits=16)


@functools.lru_cache(maxsize=4096)
def _rule_fields(rule: Rule) -> dict[str, Any]:
    return asdict(rule)


def _storage_bits_for_index(numel: int) -> int:
    return max(1, math.ceil(math.log2(max(numel, 2))))


def n_outliers(rule: Rule, numel: int) -> int:
    """How many weights survive in fp16 under ``rule`` (deterministic, so bits are exact)."""
    if rule.keeps or rule.outlier_fraction <= 0:
        return 0
    return min(numel, int(round(rule.outlier_fraction * numel)))


def layer_bits(rule: Rule, out_features: int, in_features: int) -> int:
    """Exact storage bits of one ``[out, in]`` matrix under ``rule``.

    Counts the codes (``bits`` per weight), one fp16 scale per group, one ``bits``-wide zero
    point per group when asymmetric, and for each surviving weight its fp16 value plus a flat
    index of ``ceil(log2(out*in))`` bits. A kept layer costs 16 bits per weight. A GGUF rule costs
    llama.cpp's bytes of the type llama-quantize writes for rows of ``in_features`` (its fallback
    type when the row is not a multiple of the type's block).
    """
    numel = out_features * in_features
    if rule.keeps:
        return FP16_BITS * numel
    if rule.gguf is not None:  # llama.cpp's bytes (ggml_row_size) of the type it really writes
        return _gguf.tensor_bits(rule.gguf, out_features, in_features)
    group = in_features if rule.group_size == -1 else rule.group_size
    groups = out_features * math.ceil(in_features / group)
    per_group = FP16_BITS + (0 if rule.symmetric else rule.bits)
    outliers = n_outliers(rule, numel)
    return numel * rule.bits + groups * per_group + outliers * (FP16_BITS + _storage_bits_for_index(numel))


@dataclass(frozen=True)
class Recipe(Mapping[str, Rule]):
    """A survival rule per layer name. Layers not named are kept in fp16."""

    rules: Mapping[str, Rule] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", dict(self.rules))
        for name, rule in self.rules.items():
            if not isinstance(rule, Rule):
                raise QenvError(f"Recipe entry {name!r} is {type(rule).__name__}, not a Rule.")

    def __getitem__(self, name: str) -> Rule:
        return self.rules[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.rules.items())))

    def rule_for(self, name: str) -> Rule:
        return self.rules.get(name, KEEP)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: rule.to_dict() for name, rule in self.rules.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        if not isinstance(data, Mapping):
            raise QenvError("A recipe must be a JSON object mapping layer names to rules.")
        rules = data.get("rules", data) if "rules" in data and isinstance(data.get("rules"), Mapping) else data
        return cls({str(name): Rule.from_dict(rule) for name, rule in rules.items()})

    def save(self, path: str | Path, **extra: Any) -> Path:
        """Write the recipe as JSON atomically (temp file, then rename)."""
        payload = {"rules": self.to_dict(), **extra}
        return write_json_atomic(path, payload)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        return cls.from_dict(read_json(path, "Recipe file", "pass the path of a recipe JSON written by qenv."))
