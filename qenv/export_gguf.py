"""Write the quantized model as a real ``.gguf`` file that llama.cpp runs: what was scored is what deploys.

:func:`write_gguf` writes a Llama-architecture model with one llama.cpp type per tensor, through
the ``gguf`` package's ``GGUFWriter``, laid out as llama.cpp's ``convert_hf_to_gguf.py`` lays it
out (tensor names from ``gguf.get_tensor_name_map``, the rotary permutation of ``attn_q`` /
``attn_k``, the ``llama.*`` hyperparameters and the tokenizer: sentencepiece vocabularies as
``tokenizer.ggml.model = "llama"`` with scores and token types, byte-level BPE ones as ``"gpt2"``
with merges). Each targeted layer's bytes are the GGUF rule's bytes from
:func:`qenv.quant.quantizer.gguf_encode` (llama.cpp's ``ggml_quantize_chunk``), so llama.cpp
reads back exactly the weights the evaluator scored; a layer kept in fp16 is written F16.
Untargeted matrices (embeddings, an untied head) are written F16, as qenv's size accounting
charges them; norms stay F32 (llama.cpp needs them in F32).

Only GGUF rules can be written: a qenv rule llama.cpp cannot run (RTN groups of 128, GPTQ,
outliers, AWQ scales) is refused with the layer's name, since writing the nearest type would
deploy a model other than the one measured.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qenv.errors import QenvError
from qenv.io import atomic_path
from qenv.models.layers import LayerInfo
from qenv.quant.accounting import rule_bpw
from qenv.quant import gguf as _gguf
from qenv.quant.presets import KQUANT_BPW
from qenv.quant.quantizer import gguf_encode
from qenv.quant.rules import KEEP, Rule

#: bits per weight of f16 in llama.cpp
F16_BPW = 16.0
#: transformers ``model_type`` values written as GGUF architecture ``llama`` (same tensors and rope)
GGUF_ARCHITECTURES: dict[str, str] = {"llama": "llama", "mistral": "llama"}
#: file type recorded in ``general.file_type`` for the type covering most weights
_FILE_TYPE: dict[str, str] = {
    "F16": "MOSTLY_F16", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
    "Q8_0": "MOSTLY_Q8_0", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M",
    "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K", "IQ2_XXS": "MOSTLY_IQ2_XXS", "IQ2_XS": "MOSTLY_IQ2_XS",
    "IQ2_S": "MOSTLY_IQ2_S", "IQ3_XXS": "MOSTLY_IQ3_XXS", "IQ3_S": "MOSTLY_IQ3_S", "IQ4_NL": "MOSTLY_IQ4_NL",
    "IQ4_XS": "MOSTLY_IQ4_XS",
}


def _gguf_module():
    try:
        import gguf
    except ImportError:
        raise QenvError("Writing a .gguf needs the gguf package, which is not installed.", _gguf.EXTRA_FIX) from None
    return gguf


def rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's ``LlamaModel.permute``: HF's half-split rotary rows -> llama.cpp's interleaved rows.

    Acts on whole rows, so it applies to quantized bytes (``[out, row_bytes]``) as to floats:
    llama.cpp quantizes each row on its own.
    """
    out = rows.shape[0]
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _approximations(rule: Rule, kquant: str, bpw: float, type_bpw: float) -> list[str]:
    """Why a qenv rule is only approximated by llama.cpp's ``kquant`` type (empty for GGUF rules)."""
    if rule.gguf is not None:
        if rule.imatrix:
            return ["importance matrix: pass --imatrix from llama-imatrix (qenv used its calibration tokens' matrix)"]
        return []
    notes = [f"{rule.label()} is not a llama.cpp type: {kquant} is the nearest by bits per weight"]
    if rule.rounding == "gptq":
        notes.append("GPTQ rounding (llama.cpp rounds per block, optionally with an imatrix)")
    elif rule.rounding == "learned":
        notes.append("learned rounding and scales (llama.cpp rounds per block, optionally with an imatrix)")
    if rule.outlier_fraction > 0:
        notes.append(f"{rule.outlier_fraction * 100:g}% fp16 outliers (not expressible)")
    if rule.act_scale > 0:
        notes.append("AWQ activation scaling (not expressible)")
    if rule.mse_clip:
        notes.append("per-group MSE clipping search")
    elif rule.clip < 1.0:
        notes.append(f"clip {rule.clip:g}")
    if abs(bpw - type_bpw) > 0.25:
        notes.append(f"{bpw:.3f} bpw -> {type_bpw:g} bpw")
    return notes


def nearest_kquant(rule: Rule, info: LayerInfo | None = None) -> tuple[str, float, list[str]]:
    """``(type, type_bpw, approximation notes)``: the rule's own llama.cpp type for a GGUF rule (exact),
    else the k-quant type nearest to the rule in bits per weight."""
    if rule.keeps:
        return "F16", F16_BPW, []
    if rule.gguf is not None:
        bpw = rule_bpw(rule, info) if info is not None else _gguf.nominal_bpw(rule.gguf)
        return rule.gguf, bpw, _approximations(rule, rule.gguf, bpw, bpw)
    bpw = rule_bpw(rule, info) if info is not None else float(rule.bits)
    kquant = min(KQUANT_BPW, key=lambda t: (abs(KQUANT_BPW[t] - bpw), KQUANT_BPW[t]))
    return kquant, KQUANT_BPW[kquant], _approximations(rule, kquant, bpw, KQUANT_BPW[kquant])


def check_gguf_recipe(layers: list[LayerInfo], recipe: Mapping[str, Rule]) -> None:
    """Refuse a recipe with a rule llama.cpp cannot run, naming the layer and what to use instead."""
    for info in layers:
        rule = recipe.get(info.name, KEEP)
        if rule.keeps or rule.gguf is not None:
            continue
        nearest = nearest_kquant(rule, info)[0]
        raise QenvError(f"Layer {info.name} has rule {rule.label()}, which llama.cpp cannot run, so a .gguf of it "
                        "would not be the model qenv measured.",
                        f"search on the GGUF menu (menu='gguf'; the nearest llama.cpp type is {nearest}), or use "
                        "the approximate llamacpp-quantize.sh export.")


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, Mapping) and params.get("rope_type", "default") not in ("default", None):
        raise QenvError(f"Rope scaling {params.get('rope_type')!r} is not written to .gguf by qenv.",
                        "export a model with plain rotary embeddings, or use the llamacpp-quantize.sh export.")
    theta = params.get("rope_theta") if isinstance(params, Mapping) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def _sentencepiece_file(loaded: Any) -> Path | None:
    """The sentencepiece model of a llama2.c checkpoint (found as its loader finds it)."""
    spec = Path(str(loaded.spec))
    if spec.suffix != ".bin" or not spec.is_file():
        return None
    from qenv.models.llama2c import _find_tokenizer

    return _find_tokenizer(spec, loaded.extra.get("tokenizer_path"), loaded.vocab_size)


def _add_vocab(writer: Any, gguf: Any, loaded: Any, vocab_size: int) -> None:
    """Tokenizer metadata as convert_hf_to_gguf writes it (sentencepiece -> "llama", byte-level BPE -> "gpt2")."""
    tok = loaded.tokenizer
    sp_file = _sentencepiece_file(loaded)
    tokens: list[str]
    types: list[int]
    if sp_file is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(sp_file))
        tokens, scores, types = [], [], []
        for i in range(sp.vocab_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            kind = gguf.TokenType.NORMAL
            if sp.is_unknown(i):
                kind = gguf.TokenType.UNKNOWN
            elif sp.is_control(i):
                kind = gguf.TokenType.CONTROL
            elif sp.is_unused(i):
                kind = gguf.TokenType.UNUSED
            elif sp.is_byte(i):
                kind = gguf.TokenType.BYTE
            types.append(int(kind))
        for i in range(len(tokens), vocab_size):
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(int(gguf.TokenType.UNUSED))
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(sp.bos_id())
        writer.add_eos_token_id(sp.eos_id())
        if sp.unk_id() >= 0:
            writer.add_unk_token_id(sp.unk_id())
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        return
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise QenvError(f"{loaded.name} has no tokenizer qenv can write into a .gguf.",
                        "load the model with its tokenizer (a sentencepiece or byte-level BPE tokenizer.json).")
    import json

    data = json.loads(backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE" or (data.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise QenvError(f"The tokenizer of {loaded.name} ({model.get('type')}, pre-tokenizer "
                        f"{(data.get('pre_tokenizer') or {}).get('type')}) is not one qenv writes into a .gguf.",
                        "use a model with a sentencepiece or byte-level BPE tokenizer.")
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    special = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    added = {a["id"] for a in data.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if i in special else
                             gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    # GPT-2's own split regex (what a ByteLevel pre-tokenizer with use_regex applies); llama.cpp's
    # "default" splits digits apart and would tokenize text differently
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tok, attr, None)
        if value is not None:
            add(int(value))
    bos = getattr(tok, "bos_token_id", None)
    adds_bos = bos is not None and tok("a")["input_ids"][:1] == [bos]
    writer.add_add_bos_token(bool(adds_bos))


def write_gguf(evaluator: Any, recipe: Mapping[str, Rule], path: str | Path,
               metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``recipe``'s model as a ``.gguf`` (atomically) and return its path.

    Every layer's rule must be a GGUF rule or fp16 (:func:`check_gguf_recipe`). Layer bytes are
    llama.cpp's, computed with the evaluator's calibration (importance matrix) and written with
    each tensor's own type; ``metadata`` is stored as ``qenv.*`` strings.
    """
    gguf = _gguf_module()
    loaded = evaluator.loaded
    model = loaded.model
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        raise QenvError(f"GGUF export supports Llama-architecture models; {loaded.name} is {model_type!r}.",
                        "export its recipe with llamacpp-quantize.sh instead (eval_agent.py --export writes it).")
    layers = list(evaluator.layers)
    check_gguf_recipe(layers, recipe)
    path = Path(path)
    if path.is_dir():
        raise QenvError(f"{path} is a folder, not a .gguf file path.", "pass a file path such as model.gguf.")
    path.parent.mkdir(parents=True, exist_ok=True)
    n_head = int(config.num_attention_heads)
    n_head_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    n_blocks = int(config.num_hidden_layers)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // n_head)
    by_name = {info.name: info for info in layers}
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    tied = bool(getattr(config, "tie_word_embeddings", False))

    tensors: list[tuple[str, np.ndarray, Any, str]] = []  # (gguf name, data, raw dtype, type name)
    counts: Counter[str] = Counter()
    seen: set[int] = set()
    for hf_name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        module_name = hf_name.removesuffix(".weight").removesuffix(".bias")
        new_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise QenvError(f"Tensor {hf_name} of {loaded.name} has no GGUF name for architecture llama.",
                            "export a standard Llama-layout model.")
        info = by_name.get(module_name)
        if info is None and tied and hf_name.endswith("embed_tokens.weight"):
            info = next((i for i in layers if i.tied_to is not None or i.kind == "embed"), None)
        if param.dim() < 2:
            tensors.append((new_name, param.detach().float().cpu().numpy(), None, "F32"))
            continue
        if info is None:
            data = param.detach().float().cpu().numpy().astype(np.float16)
            tensors.append((new_name, data, None, "F16"))
            counts["F16"] += data.size
            continue
        rule = recipe.get(info.name, KEEP)
        weight = evaluator.weights.original(info.name)
        weight = (weight.t() if info.transposed else weight).detach().float().cpu()
        if rule.keeps:
            qtype, data = "F16", weight.numpy().astype(np.float16)
        else:
            calib = evaluator.calibration_of(info.name) if rule.needs_calibration else None
            qtype, data = gguf_encode(weight, rule, calib)
            if qtype == "F16":
                data = data.view(np.float16)
        if new_name.endswith("attn_q.weight"):
            data = rope_permute(data, n_head)
        elif new_name.endswith("attn_k.weight"):
            data = rope_permute(data, n_head_kv)
        raw = None if qtype == "F16" else gguf.GGMLQuantizationType[qtype]
        tensors.append((new_name, np.ascontiguousarray(data), raw, qtype))
        counts[qtype] += info.numel

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(str(loaded.name))
        writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_block_count(n_blocks)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(float(getattr(config, "rms_norm_eps", 1e-5)))
        writer.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        vocab = int(model.get_input_embeddings().weight.shape[0])
        writer.add_vocab_size(vocab)
        quantized = {t: n for t, n in counts.items() if t != "F16"} or dict(counts)
        main = max(quantized, key=lambda t: (quantized[t], t)) if quantized else "F16"
        writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPE.get(main, "GUESSED")]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_vocab(writer, gguf, loaded, vocab)
        for key, value in dict(metadata or {}).items():
            writer.add_string(f"qenv.{key}", str(value))
        for name, data, raw, _ in tensors:
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """``{tensor name: type name}`` of a .gguf (read with the gguf package's reader), for checks and tables."""
    gguf = _gguf_module()
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as exc:
        raise QenvError(f"{path} is not a readable .gguf file ({exc}).", "pass a .gguf written by qenv or llama.cpp.") \
            from None
    return {t.name: t.tensor_type.name for t in reader.tensors}


__all__ = ["F16_BPW", "GGUF_ARCHITECTURES", "check_gguf_recipe", "gguf_tensor_types", "nearest_kquant", "rope_permute",
           "write_gguf"]
