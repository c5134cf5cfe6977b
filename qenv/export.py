"""Exports of a recipe to the tools that run quantized models.

- :func:`llamacpp_overrides`: ``llama-quantize --tensor-type NAME=TYPE`` overrides. Each layer is
  named as in GGUF (``model.layers.3.self_attn.v_proj`` -> ``blk.3.attn_v.weight``,
  ``mlp.down_proj`` -> ``blk.3.ffn_down.weight``, ``lm_head`` -> ``output.weight``) and each rule
  is mapped to its own llama.cpp type (GGUF rules, exact) or the k-quant type nearest in bits per
  weight (:data:`qenv.quant.presets.KQUANT_BPW`). Where llama.cpp cannot express the rule (GPTQ rounding, surviving outliers, AWQ scaling, MSE or
  ratio clipping, group sizes other than the type's own super-block layout), the line is
  annotated as approximate (learned rounding too).
- :func:`gptqmodel_dynamic`: a GPTQModel ``QuantizeConfig`` with a ``dynamic`` map
  (``"+:regex": {bits, group_size, sym}`` per layer whose rule differs from the base;
  ``"-:regex": {}`` for layers kept in fp16), for recipes GPTQModel runs exactly (others: a clear error).
- :func:`qenv.export_gguf.write_gguf`: the quantized model itself as a ``.gguf`` (GGUF rules: exact).
- :func:`save_quantized_model`: the model with the recipe's dequantized weights, written with
  ``save_pretrained`` (safetensors) beside its tokenizer; ``config.json`` carries the recipe as
  ``qenv_recipe``, so ``AutoModelForCausalLM.from_pretrained`` gives back exactly the model the
  evaluator scored.
- :func:`export_all`: all of the above plus the recipe JSON, into one folder.

Quantized weights always come from the evaluator's :class:`~qenv.quant.apply.QuantizedWeights`
(the one quantizer); layer names and kinds come from the layer walker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qenv.errors import QenvError
from qenv.export_gguf import nearest_kquant, write_gguf
from qenv.io import apply_default_modes, make_dir_like_mkdir, write_json_atomic, write_text_atomic
from qenv.models.layers import LayerInfo
from qenv.quant.accounting import rule_bpw
from qenv.quant.rules import KEEP, Recipe, Rule

#: GGUF tensor name stem of each layer kind inside a block (llama.cpp's LLM_TENSOR names)
GGUF_BLOCK_NAMES: dict[str, str] = {
    "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "qkv": "attn_qkv",
    "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down", "gate_up": "ffn_up",
    "fc_in": "ffn_up", "fc_out": "ffn_down",
}
#: llama.cpp ``ggml_type_name`` of each exported type (``llama-quantize`` matches them case-insensitively)
GGML_TYPE_NAMES: dict[str, str] = {
    "Q2_K": "q2_K", "Q3_K": "q3_K", "Q4_K": "q4_K", "Q5_K": "q5_K", "Q6_K": "q6_K", "Q8_0": "q8_0", "F16": "f16",
    "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "IQ2_XXS": "iq2_xxs", "IQ2_XS": "iq2_xs",
    "IQ2_S": "iq2_s", "IQ3_XXS": "iq3_xxs", "IQ3_S": "iq3_s", "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs",
}
#: the oldest llama.cpp whose ``llama-quantize`` gives exactly the named types with this script: ``--pure``
#: ignored ``--tensor-type`` until PR #25716 (2026-07), and an override equal to the base type's default was
#: not always applied until PR #22572. The llama.cpp vendored in llama-cpp-python 0.3.36 has both.
LLAMACPP_MIN_VERSION = "llama.cpp with PR #25716 (2026-07; e.g. the one vendored in llama-cpp-python 0.3.36)"
#: bit widths GPTQModel's kernels quantize to
GPTQMODEL_BITS: tuple[int, ...] = (2, 3, 4, 8)


def gguf_tensor_name(info: LayerInfo) -> str | None:
    """The GGUF tensor a layer becomes in llama.cpp's converter, or ``None`` when it has none."""
    if info.kind == "lm_head":
        return "output.weight"
    if info.kind == "embed":
        return "token_embd.weight"
    stem = GGUF_BLOCK_NAMES.get(info.kind)
    if stem is None or info.block < 0:
        return None
    return f"blk.{info.block}.{stem}.weight"


@dataclass
class LlamaCppExport:
    """``llama-quantize`` overrides for one recipe."""

    overrides: list[tuple[str, str]]  # (GGUF tensor name, ggml type name)
    notes: dict[str, list[str]]  # GGUF tensor name -> why the mapping is approximate
    skipped: list[str]  # layer names without a GGUF tensor
    base_type: str  # the most common type: llama-quantize's positional type argument
    layer_of: dict[str, str] = field(default_factory=dict)  # GGUF name -> layer name

    def lines(self) -> list[str]:
        return [f"{name}={qtype}" for name, qtype in self.overrides]

    def text(self) -> str:
        """One ``NAME=TYPE`` per line (``--tensor-type-file`` format), with ``#`` comments."""
        out = ["# llama-quantize tensor types from a qenv recipe (one NAME=TYPE per line).",
               "# NAME is the GGUF tensor name (used by llama-quantize as a regular expression);",
               "# TYPE is the rule's llama.cpp type (GGUF rules: exact), else the type nearest in bits per weight.",
               f"# base type: {self.base_type}; pass --pure so that tensors are typed only by these lines.",
               f"# needs {LLAMACPP_MIN_VERSION}."]
        approx = [n for n in self.notes if self.notes[n]]
        if approx:
            out.append(f"# {len(approx)} of {len(self.overrides)} tensors are approximate; see the notes below.")
        for name, qtype in self.overrides:
            out.append(f"{name}={qtype}")
        if self.skipped:
            out.append("# layers without a GGUF tensor name (not exported): " + ", ".join(self.skipped))
        for name in approx:
            out.append(f"# approximate {name} ({self.layer_of.get(name, '')}): " + "; ".join(self.notes[name]))
        return "\n".join(out) + "\n"

    def command(self, source: str = "model-f16.gguf", target: str = "model-qenv.gguf") -> str:
        """``llama-quantize --pure`` with every quantized tensor named, and the embedding / output
        tensors qenv left unquantized kept in f16: llama.cpp's own mix heuristics type nothing."""
        args = " ".join(f"--tensor-type {line}" for line in self.lines())
        named = {name for name, _ in self.overrides}
        keep = []
        if "token_embd.weight" not in named:
            keep.append("--token-embedding-type f16")
        if "output.weight" not in named:
            keep.append("--output-tensor-type f16")
        imatrix = " --imatrix imatrix.gguf" if self.needs_imatrix else ""
        return f"llama-quantize --pure{imatrix} {' '.join(keep)} {args} {source} {target} {self.base_type}"

    @property
    def needs_imatrix(self) -> bool:
        return any("importance matrix" in note for notes in self.notes.values() for note in notes)


def llamacpp_overrides(layers: Sequence[LayerInfo], recipe: Mapping[str, Rule]) -> LlamaCppExport:
    """Map every layer to its GGUF tensor and every rule to the nearest llama.cpp type."""
    overrides, notes, skipped, layer_of = [], {}, [], {}
    counts: Counter[str] = Counter()
    for info in layers:
        name = gguf_tensor_name(info)
        if name is None:
            skipped.append(info.name)
            continue
        rule = recipe.get(info.name, KEEP)
        kquant, _, why = nearest_kquant(rule, info)
        qtype = GGML_TYPE_NAMES[kquant]
        overrides.append((name, qtype))
        notes[name] = why
        layer_of[name] = info.name
        counts[kquant] += info.numel
    quantized = {t: n for t, n in counts.items() if t != "F16"}
    base = max(quantized, key=lambda t: (quantized[t], t)) if quantized else "Q8_0"
    base_type = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K",
                 "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
                 "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_S", "IQ3_XXS": "IQ3_XXS", "IQ3_S": "IQ3_S",
                 "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS"}[base]
    return LlamaCppExport(overrides, notes, skipped, base_type, layer_of)


def parse_tensor_types(text: str) -> list[tuple[str, str]]:
    """Read back ``NAME=TYPE`` lines (comments and blank lines skipped), as llama-quantize does."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, qtype = line.partition("=")
        if not sep or not name or not qtype:
            raise QenvError(f"Malformed tensor type line {line!r}.", "write NAME=TYPE.")
        out.append((name.lower(), qtype))
    return out


# -- GPTQModel ---------------------------------------------------------------------------------------
def module_regex(name: str) -> str:
    """A regex that matches exactly this module name with ``re.match``."""
    return "^" + re.escape(name) + "$"


#: group sizes GPTQModel quantizes with (-1: one group per output channel)
GPTQMODEL_GROUPS: tuple[int, ...] = (-1, 32, 64, 128)


def nearest_gptqmodel_rule(rule: Rule) -> Rule:
    """The GPTQModel-runnable rule nearest to ``rule``: GPTQ rounding, bits 2/3/4/8, no outliers/AWQ/clipping."""
    bits = min(GPTQMODEL_BITS, key=lambda b: (abs(b - rule.bits), -b))
    group = rule.group_size if rule.gguf is None and rule.group_size in GPTQMODEL_GROUPS else 128
    return Rule(bits=bits, group_size=group, symmetric=rule.symmetric if rule.gguf is None else True,
                rounding="gptq")


def _gptq_settings(rule: Rule, layer: str) -> dict[str, Any]:
    """GPTQModel's ``bits/group_size/sym`` for a rule it runs exactly as qenv measured it, else a clear error."""
    why = None
    if rule.gguf is not None:
        why = "is a llama.cpp type"
    elif rule.bits not in GPTQMODEL_BITS:
        why = f"has {rule.bits}-bit codes (GPTQModel runs {', '.join(map(str, GPTQMODEL_BITS))})"
    elif rule.group_size not in GPTQMODEL_GROUPS:
        why = f"has groups of {rule.group_size}"
    elif rule.rounding != "gptq":
        why = f"uses {rule.rounding} rounding (GPTQModel always uses GPTQ rounding)"
    elif rule.outlier_fraction > 0:
        why = "keeps fp16 outliers"
    elif rule.act_scale > 0:
        why = "scales by activations (AWQ)"
    elif rule.mse_clip or rule.clip < 1.0:
        why = "clips its groups"
    if why is not None:
        nearest = nearest_gptqmodel_rule(rule)
        raise QenvError(f"Layer {layer} has rule {rule.label()}, which {why}: GPTQModel cannot run what qenv measured.",
                        f"use GPTQModel-runnable rules (the nearest is {nearest.label()}: "
                        f"{nearest.to_dict()}), or export to llama.cpp/safetensors instead.")
    return {"bits": int(rule.bits), "group_size": int(rule.group_size), "sym": bool(rule.symmetric)}


def gptqmodel_dynamic(layers: Sequence[LayerInfo], recipe: Mapping[str, Rule]) -> dict[str, Any]:
    """A GPTQModel ``QuantizeConfig`` dict: base ``bits/group_size/sym`` and per-layer ``dynamic`` rules.

    Only rules GPTQModel runs as qenv measured them are accepted (GPTQ rounding, 2/3/4/8 bits, its
    group sizes, symmetric or not, nothing else); any other rule is a :class:`QenvError` naming the
    layer and the nearest runnable rule.

    GPTQModel walks ``dynamic`` in order and applies the first pattern that ``re.match``-es the
    module name: ``"-:regex"`` skips the module (kept in fp16), ``"+:regex"`` overrides settings.
    """
    settings: dict[str, dict[str, Any]] = {}
    counts: Counter[tuple[int, int, bool]] = Counter()
    for info in layers:
        rule = recipe.get(info.name, KEEP)
        if rule.keeps:
            continue
        setting = _gptq_settings(rule, info.name)
        settings[info.name] = setting
        counts[(setting["bits"], setting["group_size"], setting["sym"])] += info.numel
    if counts:
        bits, group, sym = max(counts, key=lambda k: (counts[k], k))
    else:
        bits, group, sym = 4, 128, False
    base = {"bits": bits, "group_size": group, "sym": sym}
    dynamic: dict[str, dict[str, Any]] = {}
    lm_head = False
    for info in layers:
        rule = recipe.get(info.name, KEEP)
        if rule.keeps:
            dynamic[f"-:{module_regex(info.name)}"] = {}
            continue
        if info.kind == "lm_head":
            lm_head = True
        setting = settings[info.name]
        if setting != base:
            dynamic[f"+:{module_regex(info.name)}"] = dict(setting)
    return {**base, "desc_act": False, "lm_head": lm_head, "dynamic": dynamic}


def gptqmodel_rule_for(config: Mapping[str, Any], module_name: str) -> dict[str, Any] | None:
    """What GPTQModel would apply to ``module_name`` (``None``: skipped, i.e. fp16): a reader for tests
    and users, following GPTQModel's ``dynamic_get`` (first ``re.match`` wins)."""
    base = {"bits": config["bits"], "group_size": config["group_size"], "sym": config["sym"]}
    for pattern, overrides in config.get("dynamic", {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], module_name):
                return None
        elif re.match(pattern[2:] if pattern.startswith("+:") else pattern, module_name):
            return {**base, **overrides}
    return base


# -- quantized model ------------------------------------------------------------------------------------
#: what :func:`save_quantized_model` adds to its folder's name for temporary folders (``.<name>.old.<8>``)
SAVE_MODEL_TEMP_RESERVE = 14


def is_saved_model(folder: str | Path) -> bool:
    """Whether ``folder`` is a model that :func:`save_quantized_model` wrote: a real folder whose
    config.json holds ``qenv_recipe``. Only such a folder is replaced by ``overwrite``."""
    folder = Path(folder)
    config = folder / "config.json"
    try:
        if folder.is_symlink() or config.is_symlink() or not config.is_file() or config.stat().st_size > 64 << 20:
            return False
        data = json.loads(config.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and isinstance(data.get("qenv_recipe"), dict)


def _replace_folder(tmp: Path, target: Path, overwrite: bool) -> None:
    if target.exists():
        if not target.is_dir():
            raise QenvError(f"{target} exists and is not a folder.", "pick another --save-model folder.")
        if any(target.iterdir()):
            if not overwrite:
                raise QenvError(f"Folder {target} already exists and is not empty.",
                                "pick another folder or remove it first.")
            if not is_saved_model(target):
                raise QenvError(f"Folder {target} is not empty and is not a model saved by qenv (no config.json with "
                                "qenv_recipe): overwrite only replaces such a folder.",
                                "pick another folder (or an empty one).")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
            return
        target.rmdir()
    os.replace(tmp, target)


def save_quantized_model(evaluator: Any, recipe: Mapping[str, Rule], folder: str | Path,
                         metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the model with ``recipe``'s dequantized weights as a transformers folder (safetensors).

    The weights come from ``evaluator.weights`` (the quantizer the evaluator scored), applied only
    for the duration of the save and restored after. ``config.json`` holds ``qenv_recipe``: the
    rules, their labels and ``metadata`` (e.g. the evaluator's metrics). The tokenizer is saved too
    when the model has one. The folder appears whole or not at all.
    """
    loaded = evaluator.loaded
    model = loaded.model
    if not hasattr(model, "save_pretrained"):
        raise QenvError(f"{type(model).__name__} cannot be saved with save_pretrained.",
                        "export the recipe instead (JSON, llama.cpp or GPTQModel).")
    recipe = Recipe(dict(recipe))
    for name, rule in recipe.items():
        if rule.gguf is not None:
            raise QenvError(f"Layer {name} has llama.cpp type {rule.label()}, which qenv scores as llama.cpp runs it "
                            "(with 8-bit activations): a transformers folder of dequantized weights would not be the "
                            "model measured.", "write the .gguf instead (eval_agent.py --export writes model.gguf).")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": "qenv-recipe", "version": 1, "model": loaded.name, "rules": recipe.to_dict(),
               "labels": {info.name: recipe.rule_for(info.name).label() for info in evaluator.layers},
               **dict(metadata or {})}
    tmp = make_dir_like_mkdir(f".{folder.name}.", folder.parent)  # 0755 under umask 022, not mkdtemp's 0700
    config = getattr(model, "config", None)
    try:
        if config is not None:
            config.qenv_recipe = json.loads(json.dumps(payload, default=str))
        with evaluator.weights.applied(recipe):
            model.save_pretrained(str(tmp))
        if loaded.tokenizer is not None and hasattr(loaded.tokenizer, "save_pretrained"):
            loaded.tokenizer.save_pretrained(str(tmp))
        apply_default_modes(tmp)
        _replace_folder(tmp, folder, overwrite)
    finally:
        if config is not None and hasattr(config, "qenv_recipe"):
            del config.qenv_recipe
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# -- everything at once -------------------------------------------------------------------------------
def export_all(folder: str | Path, layers: Sequence[LayerInfo], recipe: Mapping[str, Rule],
               metadata: Mapping[str, Any] | None = None, evaluator: Any = None) -> dict[str, Path]:
    """Write ``recipe.json``, ``llamacpp-tensor-types.txt``, ``llamacpp-quantize.sh``, and where the
    recipe allows, ``gptqmodel-quantize-config.json`` (GPTQModel-runnable rules only) and ``model.gguf``
    (GGUF rules, with ``evaluator``: the quantized model itself, see :mod:`qenv.export_gguf`) into
    ``folder``; returns the paths by kind. Why an export was not written is in ``skipped.txt``.
    A model.gguf is kept only once llama.cpp has loaded and scored it as qenv scored it (in a child
    process, :func:`qenv.llama_cpp_isolated.check_gguf_export`); ``model-gguf-check.txt`` says how
    close, and whether llama.cpp's default weight repacking runs it on this CPU."""
    folder = Path(folder)
    recipe = Recipe(dict(recipe))
    paths = {"recipe": recipe.save(folder / "recipe.json", **dict(metadata or {}))}
    llama = llamacpp_overrides(layers, recipe)
    paths["llamacpp"] = write_text_atomic(folder / "llamacpp-tensor-types.txt", llama.text())
    approx = sum(1 for n in llama.notes.values() if n and not all("importance matrix" in x for x in n))
    script = ("#!/bin/sh\n# Quantize an f16 GGUF of this model with the qenv recipe's per-tensor types.\n"
              "# usage: sh llamacpp-quantize.sh model-f16.gguf model-qenv.gguf\n"
              f"# needs {LLAMACPP_MIN_VERSION}:\n"
              "# --pure and a --tensor-type for every quantized tensor, so that llama.cpp's own mix heuristics\n"
              "# re-type nothing; llama-quantize still applies its fallback to rows a type cannot hold, as qenv did.\n"
              + (f"# {approx} tensor(s) are approximations of qenv rules (see llamacpp-tensor-types.txt).\n"
                 if approx else "# every tensor is the llama.cpp type qenv measured.\n")
              + 'set -e\nSRC="${1:-model-f16.gguf}"\nDST="${2:-model-qenv.gguf}"\n'
              'llama-quantize --help 2>&1 | grep -q -- "--tensor-type" || '
              '{ echo "llama-quantize is too old: it has no --tensor-type" >&2; exit 2; }\n'
              + llama.command('"$SRC"', '"$DST"') + "\n")
    paths["llamacpp_command"] = write_text_atomic(folder / "llamacpp-quantize.sh", script, executable=True)
    skipped = []
    try:
        config = gptqmodel_dynamic(layers, recipe)
    except QenvError as exc:
        skipped.append(f"gptqmodel-quantize-config.json: {exc}")
    else:
        paths["gptqmodel"] = write_json_atomic(folder / "gptqmodel-quantize-config.json", config)
    if evaluator is not None:
        from qenv.llama_cpp_isolated import check_gguf_export

        try:
            paths["gguf"] = write_gguf(evaluator, recipe, folder / "model.gguf",
                                       {k: v for k, v in dict(metadata or {}).items() if not isinstance(v, dict)})
            # what was written is what was measured: llama.cpp loads and scores it (in a child process)
            report = check_gguf_export(evaluator, recipe, paths["gguf"])
        except QenvError as exc:
            if "gguf" in paths:  # written but failed the check: not kept
                paths.pop("gguf").unlink(missing_ok=True)
                skipped.append(f"model.gguf: written, then removed: {exc}")
            else:
                skipped.append(f"model.gguf: {exc}")
        else:
            paths["gguf_check"] = write_text_atomic(folder / "model-gguf-check.txt", report + "\n")
    if skipped:
        paths["skipped"] = write_text_atomic(folder / "skipped.txt", "\n".join(skipped) + "\n")
    return paths


__all__ = [
    "GGML_TYPE_NAMES", "GGUF_BLOCK_NAMES", "LlamaCppExport", "export_all", "gguf_tensor_name",
    "gptqmodel_dynamic", "gptqmodel_rule_for", "llamacpp_overrides", "module_regex",
    "parse_tensor_types", "rule_bpw", "save_quantized_model",
]
