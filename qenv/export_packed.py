"""Write a recipe's model as a packed checkpoint that transformers loads: what was scored is what deploys.

The format is ``compressed-tensors``' ``pack-quantized`` (llm-compressor's and vLLM's format): each
quantized ``nn.Linear`` stores its integer codes packed into int32 (``weight_packed``), one float32
scale per group (``weight_scale``), for an asymmetric rule its zero points (``weight_zero_point``,
packed too; see :func:`packed_state_dict` for its layout) and its shape; ``config.json`` carries a ``quantization_config`` whose config groups
give each layer its own bits, group size and symmetry. ``AutoModelForCausalLM.from_pretrained``
loads it (with the ``export`` extra installed) and dequantizes ``(codes - zero) * scale``.

The codes and scales are qenv's own (:func:`qenv.quant.quantizer.quantize_codes`), checked against
the quantized weights the evaluator scored (``evaluator.weights``) before anything is written: every
layer must dequantize to exactly the tensor qenv scored, so the file is the model measured (folded
AWQ scales move float factors between ops: equal within float rounding).

What the format can hold (:func:`packed_rule_problem`): symmetric or asymmetric integer codes of
2 to 8 bits, round-to-nearest, GPTQ or learned rounding, clipped or not, with groups that divide the layer's
input width (or one group per output row), on ``nn.Linear`` layers; AWQ's activation scale is folded
into the op before the layer, as AWQ folds it (:func:`awq_fold_problem`: the RMSNorm before q/k/v
or gate/up, up_proj's rows before down, v_proj's before o without GQA). It cannot hold fp16 outliers
(weights kept beside the codes), llama.cpp's types (write the ``.gguf`` instead: :mod:`qenv.export_gguf`), GPT-2's
``Conv1D`` layers, or a quantized head tied to the embeddings; a recipe with such a rule is refused
with every offending layer named.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from qenv.errors import QenvError
from qenv.io import apply_default_modes, make_dir_like_mkdir
from qenv.models.layers import LayerInfo, get_module
from qenv.quant.quantizer import QuantCodes, quantize_codes
from qenv.quant.rules import KEEP, Recipe, Rule

#: compressed-tensors' format name for integer codes packed into int32
PACKED_FORMAT = "pack-quantized"
#: bit widths pack-quantized stores (qenv's rules have 2..8)
PACKED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
#: what to install when compressed-tensors is missing
EXPORT_EXTRA_FIX = "install the export extra: pip install 'qenv[export]' (compressed-tensors>=0.20)."
#: the checkpoint's weights file (one file: qenv's models are small; sharding is left to transformers' tools)
WEIGHTS_FILE = "model.safetensors"


def _compressed_tensors() -> Any:
    try:
        import compressed_tensors
    except ImportError:
        raise QenvError("Writing a packed checkpoint needs the compressed-tensors package, which is not installed.",
                        EXPORT_EXTRA_FIX) from None
    return compressed_tensors


def _group_of(rule: Rule, in_features: int) -> int:
    """The quantizer's group width for this layer (``-1`` and groups wider than the row: the whole row)."""
    return in_features if rule.group_size == -1 else min(rule.group_size, in_features)


def packed_rule_problem(info: LayerInfo, rule: Rule, module: torch.nn.Module | None = None,
                        tied: bool = False) -> str | None:
    """Why ``rule`` on layer ``info`` cannot be written as pack-quantized codes (``None``: it can)."""
    if rule.keeps:
        return None
    if rule.gguf is not None:
        return "is a llama.cpp type (write the .gguf instead)"
    if rule.outlier_fraction > 0:
        return "keeps fp16 outliers beside its codes, which pack-quantized cannot store"
    if rule.bits not in PACKED_BITS:
        return f"has {rule.bits}-bit codes"
    if module is not None and type(module) is not torch.nn.Linear:
        return f"is a {type(module).__name__} layer, not the nn.Linear that compressed-tensors packs"
    if info.transposed:
        return "is stored transposed (Conv1D), not as the nn.Linear that compressed-tensors packs"
    if tied:
        return "is tied to the input embeddings, which would be quantized with it"
    group = _group_of(rule, info.in_features)
    if info.in_features % group:
        return f"has groups of {group}, which do not divide its {info.in_features} input channels"
    return None


def check_packed_recipe(model: torch.nn.Module, layers: Sequence[LayerInfo], recipe: Mapping[str, Rule]) -> None:
    """Refuse a recipe the packed format cannot hold, naming every layer and rule it cannot (one error)."""
    tied = tied_names(model)
    problems: dict[str, list[str]] = {}
    for info in layers:
        rule = recipe.get(info.name, KEEP)
        why = packed_rule_problem(info, rule, get_module(model, info.name), info.name in tied)
        if why is None and rule.act_scale > 0 and not rule.keeps and rule.gguf is None:
            why = awq_fold_problem(model, info, rule, recipe)
        if why is not None:
            problems.setdefault(f"{rule.label()} {why}", []).append(info.name)
    if problems:
        parts = [f"{', '.join(names)} ({what})" for what, names in problems.items()]
        count = sum(len(names) for names in problems.values())
        raise QenvError(f"A packed checkpoint (transformers) cannot run {count} layer(s) as qenv measured them: "
                        + "; ".join(parts) + ".",
                        "search on the packable menu (python -m qenv quantize leaves AWQ and outlier rules out for "
                        "--runtime transformers), or write a .gguf from a gguf-menu recipe (--runtime gguf).")


def tied_names(model: torch.nn.Module) -> set[str]:
    """Modules whose weight is the same tensor as another module's (a head tied to the embeddings)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        key = id(weight)
        if key in seen:
            tied.update((seen[key], name))
        else:
            seen[key] = name
    return tied


#: architectures whose blocks read q/k/v and gate/up from an RMSNorm computing ``weight * x / rms(x)``,
#: with Llama's module names: an AWQ scale folds into that weight, as AWQ itself folds it
FOLD_ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2")
#: the layers reading each norm of a block (under the block's module name)
NORM_READERS: dict[str, tuple[str, ...]] = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
#: the norm a layer kind reads, and the layer whose output rows are a kind's input channels
NORM_OF_KIND: dict[str, str] = {"q": "input_layernorm", "k": "input_layernorm", "v": "input_layernorm",
                                "gate": "post_attention_layernorm", "up": "post_attention_layernorm"}
ROW_PRODUCER_OF_KIND: dict[str, str] = {"down": "up_proj", "o": "v_proj"}


def _module_or_none(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def awq_fold_problem(model: torch.nn.Module, info: LayerInfo, rule: Rule, recipe: Mapping[str, Rule]) -> str | None:
    """Why the AWQ scale of ``rule`` on ``info`` cannot fold into the op before the layer (``None``: it can).

    q/k/v and gate/up: into the RMSNorm they read (every other quantized reader must use the same
    scale; fp16 readers take it into their weights); down: into up_proj's output rows; o: into
    v_proj's, when no query heads share a value head (GQA would need one scale per shared channel).
    """
    config = getattr(model, "config", None)
    why = "scales input channels by activations (AWQ)"
    if getattr(config, "model_type", None) not in FOLD_ARCHITECTURES:
        return f"{why}, which qenv folds only in {', '.join(FOLD_ARCHITECTURES)} models"
    block = info.name.rsplit(".", 2)[0]
    if info.kind in NORM_OF_KIND:
        norm_name = f"{block}.{NORM_OF_KIND[info.kind]}"
        norm = _module_or_none(model, norm_name)
        if norm is None or not type(norm).__name__.endswith("RMSNorm") or type(norm).__name__.startswith("Gemma"):
            return f"{why}, and {norm_name} is not the RMSNorm qenv folds the scale into"
        for reader in NORM_READERS[NORM_OF_KIND[info.kind]]:
            other = recipe.get(f"{block}.{reader}", KEEP)
            if not other.keeps and (other.gguf is not None or other.act_scale != rule.act_scale):
                return f"{why}, but {block}.{reader} reads the same input with another scale"
        return None
    if info.kind in ROW_PRODUCER_OF_KIND:
        producer = f"{info.name.rsplit('.', 1)[0]}.{ROW_PRODUCER_OF_KIND[info.kind]}"
        if _module_or_none(model, producer) is None:
            return f"{why}, and there is no {producer} to fold it into"
        if info.kind == "o":
            heads = int(getattr(config, "num_attention_heads", 0) or 0)
            if int(getattr(config, "num_key_value_heads", None) or heads) != heads:
                return f"{why}, and its value heads are shared by several query heads (GQA), so no one scale per " \
                       f"channel of {producer} gives it"
        return None
    return f"{why}, and qenv folds no op before a {info.kind!r} layer"


def layer_codes(evaluator: Any, info: LayerInfo, rule: Rule) -> QuantCodes:
    """The integer codes of one layer under ``rule``, checked to dequantize to exactly the tensor the
    evaluator scored (its cached quantized weight): the codes are read off that tensor with the
    quantizer's own scales and zero points, so a GPU batch's float noise cannot slip in unseen."""
    weights = evaluator.weights
    original = weights.original(info.name)
    original = original.t() if info.transposed else original
    calib = evaluator.calibration_of(info.name) if rule.needs_calibration else None
    grid = quantize_codes(original, rule, calib)
    scored = weights.weight_for(info.name, rule)
    scored = (scored.t() if info.transposed else scored).detach().float().cpu()
    scale, zero = grid.scale.cpu(), grid.zero.cpu()
    in_f = scored.shape[1]
    expand = lambda t: t.repeat_interleave(grid.group, dim=1)[:, :in_f]  # noqa: E731
    channel = None if grid.channel_scale is None else grid.channel_scale.float().cpu()
    unscaled = scored if channel is None else scored * channel[None, :]
    codes = torch.clamp(torch.round(unscaled / expand(scale)) + expand(zero), 0, 2**rule.bits - 1)
    codes = QuantCodes(codes.to(torch.int16), scale, zero, grid.group, rule.bits, channel)
    image = codes.dequantize().to(weights.weight_for(info.name, rule).dtype).float()
    if not torch.equal(image, scored):
        worst = float((image - scored).abs().max())
        raise QenvError(f"Layer {info.name}'s integer codes under {rule.label()} do not give back the weights qenv "
                        f"scored (largest difference {worst:.3g}); the packed checkpoint would not be the model "
                        "measured.", "report this as a qenv bug; write the .gguf or --save-model meanwhile.")
    return codes


def _scheme_args(rule: Rule, in_features: int) -> dict[str, Any]:
    group = _group_of(rule, in_features)
    args: dict[str, Any] = {"num_bits": int(rule.bits), "type": "int", "symmetric": bool(rule.symmetric),
                            "dynamic": False}
    if group == in_features:
        args.update(strategy="channel", group_size=None)
    else:
        args.update(strategy="group", group_size=int(group))
    return args


def quantization_config(layers: Sequence[LayerInfo], recipe: Mapping[str, Rule]) -> dict[str, Any]:
    """compressed-tensors' ``quantization_config``: one config group per distinct (bits, symmetry,
    groups) setting, each targeting its layers by their exact module names (so every other module,
    the fp16-kept layers included, stays dense)."""
    ct = _compressed_tensors()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for info in layers:
        rule = recipe.get(info.name, KEEP)
        if rule.keeps:
            continue
        args = _scheme_args(rule, info.in_features)
        key = json.dumps(args, sort_keys=True)
        groups.setdefault(key, (args, []))[1].append(info.name)
    config_groups = {f"group_{i}": QuantizationScheme(targets=names, weights=QuantizationArgs(**args))
                     for i, (args, names) in enumerate(groups.values())}
    config = QuantizationConfig(config_groups=config_groups, format=PACKED_FORMAT, quantization_status="compressed",
                                ignore=[])
    data = config.model_dump(exclude_none=False)
    data["quant_method"] = "compressed-tensors"
    data["version"] = getattr(ct, "__version__", data.get("version"))
    return json.loads(json.dumps(data, default=str))


def packed_state_dict(evaluator: Any, recipe: Mapping[str, Rule]) -> dict[str, torch.Tensor]:
    """The model's tensors with each quantized layer's ``weight`` replaced by its packed codes,
    float32 scales, shape and (asymmetric) zero points; tensors shared with an earlier name (tied
    weights) are left out, as ``save_pretrained`` leaves them out. A float32 tensor whose values are
    all fp16 values (qenv's scales; the weights of a model loaded from an fp16 checkpoint) is stored
    in fp16: the same numbers, loaded back into the model's dtype, at the size qenv charges."""
    _compressed_tensors()
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    model = evaluator.loaded.model
    evaluator.weights.restore()
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=False).items():
        if tensor.data_ptr() in seen and tensor.numel():
            continue
        seen.add(tensor.data_ptr())
        state[key] = tensor.detach().cpu().contiguous()
    all_codes = {info.name: layer_codes(evaluator, info, recipe.get(info.name, KEEP))
                 for info in evaluator.layers if not recipe.get(info.name, KEEP).keeps}
    _fold_awq_scales(model, evaluator.layers, all_codes, state)
    for info in evaluator.layers:
        rule = recipe.get(info.name, KEEP)
        if rule.keeps:
            continue
        codes = all_codes[info.name]
        offset = 1 << (rule.bits - 1)  # qenv's codes are unsigned, compressed-tensors' signed
        state.pop(f"{info.name}.weight")
        state[f"{info.name}.weight_packed"] = pack_to_int32((codes.codes - offset).to(torch.int8), rule.bits)
        state[f"{info.name}.weight_scale"] = codes.scale.float().contiguous()
        state[f"{info.name}.weight_shape"] = torch.tensor([info.out_features, info.in_features])
        if not rule.symmetric:
            zero = (codes.zero - offset).to(torch.int8)
            # packed along the output rows as compressed-tensors packs them, then zero-padded to the
            # [out, groups] shape that its loader (the meta-device compress path transformers runs)
            # allocates; the unpacker reads only the packed rows, so the values are the same
            packed = pack_to_int32(zero, rule.bits, packed_dim=0)
            state[f"{info.name}.weight_zero_point"] = torch.nn.functional.pad(
                packed, (0, 0, 0, info.out_features - packed.shape[0])).contiguous()
    for key, tensor in state.items():  # fp16 where that is lossless (qenv charges dense tensors and scales fp16)
        if tensor.dtype == torch.float32 and torch.equal(tensor.half().float(), tensor):
            state[key] = tensor.half()
    return state


def _fold_awq_scales(model: torch.nn.Module, layers: Sequence[LayerInfo], all_codes: dict[str, QuantCodes],
                     state: dict[str, torch.Tensor]) -> None:
    """Fold every AWQ layer's ``1 / channel_scale`` into the op before it (see :func:`awq_fold_problem`,
    checked before): the norm's weight (and fp16 readers of the norm take the scale into their
    columns), or the producer's output rows (its packed scales, or its dense rows, and its bias).
    The codes stay qenv's; only float factors move, so logits agree within float rounding."""
    def scale_by(key: str, factor: torch.Tensor, dim: int) -> None:
        tensor = state[key]
        shape = [1, 1]
        shape[dim] = -1
        state[key] = (tensor.float() * (factor.view(shape) if tensor.dim() == 2 else factor)).to(tensor.dtype)

    folded: dict[str, torch.Tensor] = {}
    for info in layers:
        codes = all_codes.get(info.name)
        if codes is None or codes.channel_scale is None:
            continue
        s = codes.channel_scale
        if info.kind in NORM_OF_KIND:
            block = info.name.rsplit(".", 2)[0]
            norm = f"{block}.{NORM_OF_KIND[info.kind]}"
            if norm in folded:
                if not torch.equal(folded[norm], s):
                    raise QenvError(f"Layer {info.name} reads {norm} with another AWQ scale than the layers before it.",
                                    "give the layers reading one input the same act_scale (the environment does).")
                continue
            folded[norm] = s
            state[f"{norm}.weight"] = (state[f"{norm}.weight"].float() / s).to(state[f"{norm}.weight"].dtype)
            for reader in NORM_READERS[NORM_OF_KIND[info.kind]]:
                name = f"{block}.{reader}"
                if name not in all_codes and f"{name}.weight" in state:  # fp16 reader: W diag(s)
                    scale_by(f"{name}.weight", s, 1)
            continue
        producer = f"{info.name.rsplit('.', 1)[0]}.{ROW_PRODUCER_OF_KIND[info.kind]}"
        inverse = 1.0 / s
        if producer in all_codes:
            from dataclasses import replace

            all_codes[producer] = replace(all_codes[producer], scale=all_codes[producer].scale * inverse[:, None])
        else:
            scale_by(f"{producer}.weight", inverse, 0)
        if f"{producer}.bias" in state:
            scale_by(f"{producer}.bias", inverse, 0)


def write_packed_checkpoint(evaluator: Any, recipe: Mapping[str, Rule], folder: str | Path,
                            metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``recipe``'s model as a compressed-tensors pack-quantized transformers folder.

    The recipe is checked first (:func:`check_packed_recipe`) and every layer's codes are checked
    to give back the scored weights (:func:`layer_codes`); ``config.json`` also holds the recipe as
    ``qenv_recipe`` (with ``metadata``), and the tokenizer is saved when the model has one. The
    folder appears whole or not at all.
    """
    from safetensors.torch import save_file

    from qenv.export import _replace_folder

    loaded = evaluator.loaded
    model = loaded.model
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        raise QenvError(f"{type(model).__name__} is not a transformers model, so it has no packed checkpoint.",
                        "load the model from a transformers folder (a llama2.c or GGUF model: save it with "
                        "--save-model first, then quantize that folder).")
    recipe = Recipe(dict(recipe))
    check_packed_recipe(model, evaluator.layers, recipe)
    state = packed_state_dict(evaluator, recipe)
    quant = quantization_config(evaluator.layers, recipe)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": "qenv-recipe", "version": 1, "model": loaded.name, "rules": recipe.to_dict(),
               "labels": {info.name: recipe.rule_for(info.name).label() for info in evaluator.layers},
               **dict(metadata or {})}
    tmp = make_dir_like_mkdir(f".{folder.name}.", folder.parent)
    try:
        config.quantization_config = quant
        config.qenv_recipe = json.loads(json.dumps(payload, default=str))
        config.save_pretrained(str(tmp))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(tmp))
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if loaded.tokenizer is not None and hasattr(loaded.tokenizer, "save_pretrained"):
            loaded.tokenizer.save_pretrained(str(tmp))
        apply_default_modes(tmp)
        _replace_folder(tmp, folder, overwrite)
    finally:
        for attr in ("quantization_config", "qenv_recipe"):
            if hasattr(config, attr):
                delattr(config, attr)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_packed_checkpoint(folder: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained(folder)`` on the CPU, in eval mode, decompressed: transformers
    keeps the layers packed and compressed-tensors dequantizes each with its own scheme (``(codes -
    zero) * scale``) at the first forward pass, which runs here on one token. (transformers' ``dequantize=True`` load decompresses every
    layer with the first config group's scheme, which is wrong for a mixed-precision recipe.)"""
    import contextlib
    import io

    _compressed_tensors()
    from transformers import AutoModelForCausalLM

    bars = io.StringIO()  # compressed-tensors' per-stage progress bars: four bars per load, on every load
    try:
        with contextlib.redirect_stderr(bars), torch.inference_mode():
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or "auto").eval()
            model(input_ids=torch.zeros((1, 1), dtype=torch.long), use_cache=False)  # decompresses every layer
    except BaseException:
        sys.stderr.write(bars.getvalue())
        raise
    return model.eval()


@torch.inference_mode()
def packed_kl(folder: str | Path, evaluator: Any, recipe: Mapping[str, Rule], max_batches: int | None = 1) -> float:
    """Mean per-token KL(qenv's quantized model || the checkpoint loaded by transformers) on the
    evaluator's tokens (the first ``max_batches`` batches): how far the file is from what qenv scored."""
    model = load_packed_checkpoint(folder, dtype=evaluator.loaded.dtype)
    qenv_model = evaluator.loaded.model
    total, count = 0.0, 0
    batches = evaluator.batches if max_batches is None else evaluator.batches[:max_batches]
    with evaluator.weights.applied(Recipe(dict(recipe))):
        for ids in batches:
            ours = torch.log_softmax(qenv_model(input_ids=ids, use_cache=False).logits.float().cpu(), dim=-1)
            theirs = torch.log_softmax(model(input_ids=ids.cpu(), use_cache=False).logits.float(), dim=-1)
            total += float((ours.exp() * (ours - theirs)).sum(-1).sum(dtype=torch.float64))
            count += ours.shape[0] * ours.shape[1]
    return total / max(count, 1)


__all__ = ["PACKED_BITS", "PACKED_FORMAT", "check_packed_recipe", "tied_names", "layer_codes", "load_packed_checkpoint",
           "packed_kl", "packed_rule_problem", "packed_state_dict", "quantization_config", "write_packed_checkpoint"]
