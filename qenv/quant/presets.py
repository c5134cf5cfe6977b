"""Human-designed recipes: the bar every searched rule has to clear.

Each preset maps the layer list from the layer walker to a recipe, so it works on every
architecture: uniform round-to-nearest, uniform GPTQ, an AWQ-like activation-aware scheme, and
llama.cpp's real mixes (Q2_K ... Q6_K, IQ2_XS, IQ3_XXS, IQ3_S, IQ4_XS; with and without the
importance matrix): per-tensor types chosen as ``llama_tensor_get_type`` chooses them, quantized
by llama.cpp's own code (GGUF rules, :mod:`qenv.quant.gguf`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace

from qenv.errors import QenvError
from qenv.models.layers import LayerInfo
from qenv.quant import gguf as _gguf
from qenv.quant.rules import Recipe, Rule, layer_bits

#: uniform llama.cpp types as GGUF rules (quantized by llama.cpp itself; see :mod:`qenv.quant.gguf`)
KQUANT_RULES: dict[str, Rule] = {t: Rule(gguf=t) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")}
#: llama.cpp's own bits per weight of each type (on rows the type holds)
KQUANT_BPW: dict[str, float] = {t: _gguf.nominal_bpw(t) for t in KQUANT_RULES}

#: llama.cpp's mixes (``llama-quantize`` file types) and the default tensor type of each
#: (``llama_ftype_get_default_type``)
MIX_DEFAULT_TYPE: dict[str, str] = {
    "Q2_K": "Q2_K", "Q2_K_S": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K",
    "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "IQ2_XS": "IQ2_XS",
    "IQ3_XXS": "IQ3_XXS", "IQ3_S": "IQ3_S", "IQ4_XS": "IQ4_XS",
}
#: mixes llama-quantize refuses to write without an importance matrix (``tensor_requires_imatrix``)
MIX_NEEDS_IMATRIX: frozenset[str] = frozenset({"Q2_K_S", "IQ2_XS", "IQ3_XXS"})
#: GGUF tensor category of each layer kind (llama.cpp's ``tensor_get_category``)
_CATEGORY: dict[str, str] = {
    "q": "attn_q", "k": "attn_k", "v": "attn_v", "qkv": "attn_qkv", "o": "attn_output", "gate": "ffn_gate",
    "up": "ffn_up", "gate_up": "ffn_up", "fc_in": "ffn_up", "down": "ffn_down", "fc_out": "ffn_down",
    "lm_head": "output", "embed": "token_embd",
}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of blocks that get more bits: first and last eighth, every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def n_gqa_of(layers: list[LayerInfo]) -> int:
    """Query heads per key/value head, read off the q and k shapes (1 when they are fused or absent)."""
    q = next((i.out_features for i in layers if i.kind == "q"), None)
    k = next((i.out_features for i in layers if i.kind == "k"), None)
    return max(1, q // k) if q and k else 1


def mix_types(layers: list[LayerInfo], mix: str, imatrix: bool = False, *, n_gqa: int | None = None,
              arch: str = "llama") -> dict[str, str]:
    """The llama.cpp type ``llama-quantize`` gives each layer in file type ``mix`` (before its row fallback).

    A line-by-line port of ``llama_tensor_get_type_impl`` (llama.cpp in llama-cpp-python 0.3.36,
    ``src/llama-quant.cpp``) for dense models: the counters ``i_attention_wv`` / ``i_ffn_*`` run
    over the layers in file order, ``n_layer`` is the block count, ``n_gqa`` comes from the q/k
    shapes. ``imatrix`` says whether an importance matrix is given (it changes IQ3_XXS and IQ4_XS).
    The row-length fallback is applied where the type is used (:func:`qenv.quant.gguf.effective_type`).
    """
    mix = mix.upper()
    if mix not in MIX_DEFAULT_TYPE:
        raise QenvError(f"Unknown llama.cpp mix {mix!r}.", f"use one of {', '.join(MIX_DEFAULT_TYPE)}.")
    ftype = mix
    gqa = n_gqa_of(layers) if n_gqa is None else n_gqa
    falcon = arch == "falcon"
    n_layer = max((i.n_blocks for i in layers), default=1)
    cats = [_CATEGORY.get(i.kind, "other") for i in layers]
    n_attention_wv = sum(c in ("attn_v", "attn_qkv") for c in cats)
    tied = not any(c == "output" and i.tied_to is None for c, i in zip(cats, layers))
    i_attention_wv = i_ffn_down = 0
    iq2 = ftype == "IQ2_XS"
    out: dict[str, str] = {}
    for info, cat in zip(layers, cats):
        new = MIX_DEFAULT_TYPE[mix]
        if cat == "output" or (tied and cat == "token_embd"):
            if info.in_features % _gguf.GGML_TYPES[new][1] != 0 or falcon:
                new = "Q8_0"
            elif ftype in ("IQ2_XS", "IQ3_XXS"):
                new = "Q5_K"
            elif new != "Q8_0":
                new = "Q6_K"
        elif cat == "token_embd":
            if ftype == "IQ2_XS":
                new = "Q2_K"
            elif ftype == "IQ3_XXS":
                new = "IQ3_S"
        elif iq2:
            if cat in ("attn_v", "attn_qkv"):
                new = "Q4_K" if gqa >= 4 else "Q2_K"
                i_attention_wv += 1
            elif cat == "ffn_down":
                if i_ffn_down < n_layer // 8:
                    new = "Q2_K"
                i_ffn_down += 1
        elif cat in ("attn_v", "attn_qkv"):
            if ftype == "Q2_K":
                new = "Q4_K" if gqa >= 4 else "Q3_K"
            elif ftype == "Q2_K_S" and gqa >= 4:
                new = "Q4_K"
            elif ftype == "IQ3_XXS":
                new = "Q4_K" if gqa >= 4 else ("IQ3_S" if not imatrix else "IQ3_XXS")
            elif ftype == "IQ3_S" and gqa >= 4:
                new = "Q4_K"
            elif ftype == "Q3_K_M":
                new = "Q5_K" if i_attention_wv < 2 else "Q4_K"
            elif ftype == "Q3_K_L":
                new = "Q5_K"
            elif ftype == "IQ4_XS" and gqa >= 4:
                new = "Q5_K"
            elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_attention_wv, n_attention_wv):
                new = "Q6_K"
            elif ftype == "Q4_K_S" and i_attention_wv < 4:
                new = "Q5_K"
            if arch == "llama" and n_layer == 80 and gqa > 1 and new in ("Q3_K", "Q4_K"):  # LLM_TYPE_70B
                new = "Q5_K"
            i_attention_wv += 1
        elif cat in ("attn_k", "attn_q"):
            if ftype == "IQ3_XXS":
                new = "IQ2_S"
        elif cat == "ffn_down":
            i_layer = i_ffn_down
            if ftype == "Q2_K":
                new = "Q3_K"
            elif ftype == "Q2_K_S":
                if i_layer < n_layer // 8:
                    new = "Q4_K"
            elif ftype == "IQ3_XXS" and not imatrix:
                new = "Q4_K" if i_layer < n_layer // 8 else "Q3_K"
            elif ftype == "Q3_K_M":
                new = ("Q5_K" if i_layer < n_layer // 16
                       else "Q4_K" if not falcon or use_more_bits(i_layer, n_layer) else "Q3_K")
            elif ftype == "Q3_K_L":
                new = "Q4_K" if falcon else "Q5_K"
            elif ftype == "Q4_K_M":
                if falcon:
                    new = ("Q6_K" if i_layer < n_layer // 16 else "Q5_K" if use_more_bits(i_layer, n_layer)
                           else "Q4_K")
                elif use_more_bits(i_layer, n_layer):
                    new = "Q6_K"
            elif i_layer < n_layer // 8 and ftype == "IQ4_XS" and not imatrix:
                new = "Q5_K"
            elif ftype == "Q5_K_M" and use_more_bits(i_layer, n_layer):
                new = "Q6_K"
            elif ftype == "Q4_K_S" and not falcon and i_layer < n_layer // 8:
                new = "Q5_K"
            i_ffn_down += 1
        elif cat == "attn_output":
            if not falcon:
                new = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype, new)
            elif ftype == "Q3_K_L":
                new = "Q4_K"
        elif cat == "attn_qkv":  # pragma: no cover - handled with attn_v above (category_is_attn_v)
            pass
        out[info.name] = new
    return out


def llamacpp_mix(layers: list[LayerInfo], mix: str = "Q4_K_M", imatrix: bool = False, *,
                 n_gqa: int | None = None, arch: str = "llama") -> Recipe:
    """llama.cpp's mix ``mix`` as GGUF rules: each layer quantized by llama.cpp as llama-quantize would.

    ``imatrix=True`` is ``llama-quantize --imatrix``: every rule uses the calibration importance
    matrix (except the token embedding, which llama-imatrix never sees). Layers whose rows a
    type cannot hold get llama-quantize's fallback type, scored and charged as such.
    """
    key = mix.upper()
    if key in MIX_NEEDS_IMATRIX and not imatrix:
        raise QenvError(f"llama.cpp mix {key} needs an importance matrix (llama-quantize refuses it without one).",
                        f"use the mix with imatrix=True (preset '{key.lower()}-im').")
    types = mix_types(layers, key, imatrix, n_gqa=n_gqa, arch=arch)
    rules = {}
    for info in layers:
        qtype = types[info.name]
        use_imatrix = imatrix and info.kind != "embed"
        rules[info.name] = Rule(gguf=qtype, imatrix=use_imatrix or qtype in _gguf.REQUIRES_IMATRIX)
    return Recipe(rules)


def uniform(layers: list[LayerInfo], rule: Rule) -> Recipe:
    return Recipe({info.name: rule for info in layers})


def rtn(bits: int, group_size: int = 128) -> Rule:
    return Rule(bits=bits, group_size=group_size)


def gptq(bits: int, group_size: int = 128) -> Rule:
    return Rule(bits=bits, group_size=group_size, rounding="gptq")


def awq(bits: int, group_size: int = 128) -> Rule:
    """AWQ-like: scale input channels by rms(x)^0.5 (foldable) and search clipping per group."""
    return Rule(bits=bits, group_size=group_size, act_scale=0.5, mse_clip=True)


_FAMILIES: dict[str, Callable[[int], Rule]] = {"rtn": rtn, "gptq": gptq, "awq": awq}


def human_preset_name(rule: Rule) -> str | None:
    """The uniform preset whose every layer gets ``rule`` (``gptq-w4``, ``awq-w2-g32``, ``rtn-w3-gc``),
    or ``None`` when no human preset uses it."""
    if rule.keeps or rule.gguf is not None:
        return None
    for family, make in _FAMILIES.items():
        if replace(make(rule.bits), group_size=rule.group_size) == rule:
            group = "" if rule.group_size == 128 else "-gc" if rule.group_size == -1 else f"-g{rule.group_size}"
            return f"{family}-w{rule.bits}{group}"
    return None


#: the row width :func:`menu_table` charges rules on (a 7B model's hidden size)
MENU_TABLE_WIDTH = 4096


def menu_table(rules: Sequence[Rule], width: int = MENU_TABLE_WIDTH) -> str:
    """A reST table of a rule menu: each rule's index, label, the human preset it is (if any) and its
    exact bits per weight on a ``width`` x ``width`` layer (scales and zero points included).

    The bpw column is the size a rule costs on a large model, where groups divide the rows evenly;
    small models with rows shorter than a group pay more per weight. For the default menu:
    ``print(menu_table(qenv.envs.spaces.DEFAULT_MENU))``.
    """

    def named(rule: Rule) -> str:
        if rule.rounding == "gptq" and rule.act_scale > 0:
            return "(AWQ then GPTQ)"
        if rule.rounding == "gptq" and rule.mse_clip:
            return "(GPTQ, MSE clip)"
        if rule.rounding == "learned":
            return "(GPTQ, learned)"  # no human preset: GPTQ's storage, codes and scales learned
        return ""

    rows = [(str(i), rule.label(), human_preset_name(rule) or named(rule), f"{layer_bits(rule, width, width) / width**2:.3f}")
            for i, rule in enumerate(rules)]
    head = ("#", "rule", "human preset", f"bpw ({width}x{width})")
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(head)]
    rule_line = "  ".join("=" * w for w in widths)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([rule_line, line(head), rule_line, *(line(r) for r in rows), rule_line]) + "\n"


PRESET_EXAMPLES: tuple[str, ...] = (
    "rtn-w2", "rtn-w3", "rtn-w4", "rtn-w8", "gptq-w3", "gptq-w4", "awq-w3", "awq-w4", "q3_k_m", "q4_k_m",
    "q4_k_m-im", "iq3_xxs-im", "fp16",
)
#: llama.cpp mixes as preset names (lower case; ``-im`` adds the importance matrix)
LLAMACPP_PRESETS: tuple[str, ...] = tuple(
    [m.lower() for m in MIX_DEFAULT_TYPE if m not in MIX_NEEDS_IMATRIX] + [m.lower() + "-im" for m in MIX_DEFAULT_TYPE])


def preset(name: str, layers: list[LayerInfo]) -> Recipe:
    """A named human-designed recipe: ``rtn-w<b>``, ``gptq-w<b>``, ``awq-w<b>``, ``fp16``, or one of
    llama.cpp's mixes (:data:`LLAMACPP_PRESETS`, e.g. ``q4_k_m``, ``q3_k_s``, ``iq4_xs``; ``-im``: with
    the importance matrix), quantized by llama.cpp's own code."""
    key = name.lower()
    if key == "fp16":
        return Recipe({})
    if key in LLAMACPP_PRESETS:
        imatrix = key.endswith("-im")
        return llamacpp_mix(layers, key.removesuffix("-im"), imatrix=imatrix)
    if key.upper() in MIX_NEEDS_IMATRIX:
        llamacpp_mix(layers, key)  # raises: this mix needs the importance matrix
    match = re.fullmatch(r"(rtn|gptq|awq)-w(\d+)(?:-g(\d+|c))?", key)
    if match:
        family, bits, group = match.groups()
        group_size = -1 if group == "c" else int(group or 128)
        return uniform(layers, replace(_FAMILIES[family](int(bits)), group_size=group_size))
    raise QenvError(f"Unknown preset {name!r}.",
                    f"use one of {', '.join(PRESET_EXAMPLES)} (rtn/gptq/awq take any bit width and -g32/-g64/-gc; "
                    f"llama.cpp mixes: {', '.join(LLAMACPP_PRESETS)}).")


def preset_names_text() -> str:
    """Every preset name a user can give (for error lines): the examples, the families' pattern and
    llama.cpp's mixes."""
    return (f"{', '.join(PRESET_EXAMPLES)} (rtn/gptq/awq-w<2..8>, optionally -g32/-g64/-gc; llama.cpp mixes: "
            f"{', '.join(LLAMACPP_PRESETS)})")


def parse_budget(value: str | float | int) -> float | str:
    """A ``--budget-bpw`` value as given: a number of bits per weight, or a preset name (lower case).

    The name is checked now, before any model loads, so that a typo fails in one line that lists
    the presets; what it means in bits per weight depends on the model (:func:`resolve_budget`).
    """
    if isinstance(value, bool):
        raise QenvError(f"Budget {value!r} is neither a number of bits per weight nor a preset name.",
                        "pass e.g. 3.0 or gptq-w4.")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    name = text.lower()
    try:
        preset(name, [])
    except QenvError:
        raise QenvError(f"Budget {text!r} is neither a number of bits per weight nor a known preset.",
                        f"pass a number (e.g. 3.0) or one of {preset_names_text()}.") from None
    return name


def resolve_budget(spec: str | float | int, layers: list[LayerInfo]) -> tuple[float, str | None]:
    """``(bits per weight, preset name or None)`` of a budget on one model.

    A number stays that number. A preset name (``gptq-w4``, ``q4_k_m-im``) becomes the preset's
    exact bits per weight on these layers, counted as every recipe is counted
    (:func:`qenv.quant.accounting.bits_per_weight`): equal-size comparisons against a human rule
    need its own size, which differs between models (group scales on short rows, llama.cpp's
    fallback types). A preset that costs more than keeping the model in 16-bit is refused.
    """
    from qenv.quant.accounting import bits_per_weight

    parsed = parse_budget(spec)
    if isinstance(parsed, float):
        return parsed, None
    bpw = bits_per_weight(layers, preset(parsed, layers))
    if bpw > 16.0 + 1e-9:
        raise QenvError(f"Budget {parsed} is {bpw:.3f} bits per weight on this model, more than keeping it in 16-bit.",
                        "pass a smaller preset or a number of bits per weight in (0, 16].")
    return bpw, parsed


def budget_label(bpw: float, name: str | None = None) -> str:
    """How tables name a budget: ``gptq-w4 (4.156 bpw)`` for a preset's size, ``3 bpw`` for a number."""
    return f"{name} ({bpw:.3f} bpw)" if name else f"{bpw:g} bpw"
