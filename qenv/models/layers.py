"""The layer walker: finds the quantizable layers of any causal LM, in forward order.

Every part of qenv (quantizer, evaluator, environment, presets, searchers, exports) asks this
module which layers exist and how to read/write their weight as an ``[out, in]`` matrix, so that
GPT-2's transposed ``Conv1D`` and tied embeddings are handled in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from qenv.errors import QenvError

try:  # transformers is a dependency, but keep the walker importable for plain torch models.
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except Exception:  # pragma: no cover - only without transformers
    _HFConv1D = None

#: Layer kinds the walker reports. ``qkv`` and ``gate_up`` are fused projections.
LAYER_KINDS: tuple[str, ...] = (
    "q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up", "fc_in", "fc_out", "lm_head", "embed", "other",
)


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable weight matrix."""

    name: str  # module path, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # one of LAYER_KINDS
    block: int  # decoder block index; lm_head -> n_blocks; embeddings -> -1
    n_blocks: int
    out_features: int
    in_features: int
    transposed: bool = False  # True for GPT-2 Conv1D (weight stored [in, out])
    tied_to: str | None = None  # module whose weight this one shares (tied lm_head -> embeddings)

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


# Where popular architectures keep their decoder blocks. Checked first, because the generic
# fallback (longest ModuleList holding linears) can be fooled by, e.g., MoE expert lists.
_KNOWN_BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi-3, Mixtral, ...
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, Falcon, GPT-J, Bloom, CodeGen
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.language_model.layers",  # multimodal wrappers (Gemma-3, Llava-style) in transformers 5
    "language_model.model.layers",  # older multimodal wrappers
    "transformer.blocks",  # MPT
    "transformer.layers",
    "transformer.encoder.layers",  # ChatGLM
    "backbone.layers",  # Mamba-style
    "layers",  # bare base models (LlamaModel, ...)
    "decoder.layers",  # bare OPTModel
    "h",  # bare GPT2Model / FalconModel
)

# Leaf module name -> kind. Names that mean different things by context (dense, c_proj) are
# resolved in _kind_of from the parent module's name.
_KIND_BY_NAME: dict[str, str] = {
    "q_proj": "q", "q": "q", "query": "q", "wq": "q",
    "k_proj": "k", "k": "k", "key": "k", "wk": "k",
    "v_proj": "v", "v": "v", "value": "v", "wv": "v",
    "o_proj": "o", "out_proj": "o", "o": "o", "wo": "o",
    "c_attn": "qkv", "query_key_value": "qkv", "qkv_proj": "qkv", "wqkv": "qkv", "qkv": "qkv",
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "w3": "up",
    "down_proj": "down", "w2": "down",
    "gate_up_proj": "gate_up",
    "fc1": "fc_in", "c_fc": "fc_in", "dense_h_to_4h": "fc_in", "fc_in": "fc_in",
    "fc2": "fc_out", "dense_4h_to_h": "fc_out", "fc_out": "fc_out",
}

# Position of each kind in a block's forward pass: attention (q, k, v, then o) before the MLP
# (gate/up/fc_in, then down/fc_out). Modules are not always registered in forward order (OPT
# registers k, v, q; Phi-3 registers o_proj before qkv_proj), so the walker sorts by this.
_FORWARD_RANK: dict[str, int] = {
    "q": 0, "qkv": 0, "k": 1, "v": 2, "o": 3,
    "gate": 4, "gate_up": 4, "fc_in": 4, "up": 5, "down": 6, "fc_out": 6,
}


def _is_attention(parent: str) -> bool:
    p = parent.lower()
    return "attn" in p or "attention" in p


def _is_mlp(parent: str) -> bool:
    p = parent.lower()
    return "mlp" in p or "ffn" in p or "feed_forward" in p


def _kind_of(sub_name: str) -> str:
    """Kind of a linear from its path inside the block (e.g. ``attn.c_proj`` -> ``o``)."""
    parts = sub_name.split(".")
    leaf = parts[-1]
    parent = parts[-2] if len(parts) > 1 else ""
    if leaf == "dense":  # GPT-NeoX / Falcon / Phi-2 attention output
        return "o" if _is_attention(parent) else "other"
    if leaf == "c_proj":  # GPT-2: attn.c_proj is the attention output, mlp.c_proj the MLP output
        if _is_attention(parent):
            return "o"
        return "fc_out" if _is_mlp(parent) else "other"
    return _KIND_BY_NAME.get(leaf.lower(), "other")


def _is_conv1d(module: nn.Module) -> bool:
    return _HFConv1D is not None and isinstance(module, _HFConv1D)


def _is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _holds_linear(module: nn.Module) -> bool:
    return any(_is_quantizable(m) for m in module.modules())


def _resolve(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block list and its dotted path, so layers can be grouped and ordered by block.

    Known paths are tried first; otherwise the longest ``nn.ModuleList`` whose children hold linear
    layers wins (outermost lists only, so per-block expert lists never beat the block list).
    """
    for path in _KNOWN_BLOCK_PATHS:
        blocks = _resolve(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and _holds_linear(blocks):
            return path, blocks

    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and name and any(_holds_linear(c) for c in mod)
    ]
    outer = [
        (name, mod)
        for name, mod in candidates
        if not any(name.startswith(other + ".") for other, _ in candidates if other != name)
    ]
    if outer:
        # max() keeps the first of equal lengths, i.e. the one registered first.
        return max(outer, key=lambda item: len(item[1]))
    raise QenvError(
        f"Could not find the decoder blocks of {type(model).__name__}: no nn.ModuleList of blocks "
        "containing nn.Linear/Conv1D layers.",
        fix="Pass a causal LM whose decoder layers are an nn.ModuleList (e.g. model.model.layers).",
    )


def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    return None


def _input_embedding(model: nn.Module) -> tuple[str, nn.Embedding] | None:
    emb = None
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            emb = getter()
        except (NotImplementedError, AttributeError):
            emb = None
    if not isinstance(emb, nn.Embedding):
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        return None
    name = _module_name(model, emb)
    return None if name is None else (name, emb)


def _output_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    head = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
    if head is None:
        for attr in ("lm_head", "embed_out", "output"):
            cand = getattr(model, attr, None)
            if isinstance(cand, nn.Module):
                head = cand
                break
    if head is None or not _is_quantizable(head):
        return None
    name = _module_name(model, head)
    return None if name is None else (name, head)


def _same_weight(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.device.type == "meta" or a.shape != b.shape or a.device != b.device:
        return False  # meta tensors have no storage: data_ptr() is 0 for all of them
    return a.data_ptr() == b.data_ptr()


def _linear_info(name: str, module: nn.Module, kind: str, block: int, n_blocks: int) -> LayerInfo:
    transposed = _is_conv1d(module)
    rows, cols = module.weight.shape
    out_f, in_f = (cols, rows) if transposed else (rows, cols)
    return LayerInfo(name=name, kind=kind, block=block, n_blocks=n_blocks,
                     out_features=int(out_f), in_features=int(in_f), transposed=transposed)


def discover_layers(
    model: nn.Module, include_lm_head: bool = False, include_embeddings: bool = False
) -> list[LayerInfo]:
    """All quantizable weight matrices in forward order: [embed], block 0..n-1 layers, [lm_head].

    Inside a block the order is q, k, v (or qkv), o, then gate/up (or fc_in), down (or fc_out),
    whatever order the model registered them in. A tied lm_head/embedding pair is reported once,
    so callers never quantize (or count the bits of) the same matrix twice.
    """
    try:
        path, blocks = find_blocks(model)
    except QenvError:
        if not _holds_linear(model):
            raise QenvError(
                f"No quantizable linear layers found in {type(model).__name__}: it has no nn.Linear "
                "or transformers Conv1D modules.",
                fix="Pass a transformer causal LM (e.g. AutoModelForCausalLM); conv/embedding-only "
                "models cannot be quantized by qenv.",
            ) from None
        raise
    n_blocks = len(blocks)

    layers: list[LayerInfo] = []
    for index, block in enumerate(blocks):
        found: list[tuple[int, int, LayerInfo]] = []
        rank = -1
        for position, (sub_name, module) in enumerate(block.named_modules()):
            if not sub_name or not _is_quantizable(module):
                continue
            kind = _kind_of(sub_name)
            # "other" layers keep their place relative to the layer registered just before them.
            rank = _FORWARD_RANK.get(kind, rank)
            info = _linear_info(f"{path}.{index}.{sub_name}", module, kind, index, n_blocks)
            found.append((rank, position, info))
        found.sort(key=lambda item: (item[0], item[1]))
        layers.extend(info for _, _, info in found)

    if not layers:
        raise QenvError(
            f"No quantizable linear layers found in {type(model).__name__}: its decoder blocks at "
            f"{path!r} contain no nn.Linear or Conv1D modules.",
            fix="Pass a transformer causal LM whose blocks use nn.Linear/Conv1D projections.",
        )

    embed = _input_embedding(model) if (include_embeddings or include_lm_head) else None
    head = _output_head(model) if (include_lm_head or include_embeddings) else None
    tied = embed is not None and head is not None and _same_weight(embed[1].weight, head[1].weight)

    if include_embeddings and embed is not None:
        emb_name, emb = embed
        vocab, hidden = emb.weight.shape
        layers.insert(0, LayerInfo(
            name=emb_name, kind="embed", block=-1, n_blocks=n_blocks,
            out_features=int(vocab), in_features=int(hidden),
            tied_to=head[0] if tied and head is not None else None,
        ))
    if include_lm_head and head is not None and not (tied and include_embeddings):
        head_name, head_mod = head
        info = _linear_info(head_name, head_mod, "lm_head", n_blocks, n_blocks)
        if tied and embed is not None:
            info = replace(info, tied_to=embed[0])
        layers.append(info)
    return layers


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The module at dotted path ``name`` (as in ``LayerInfo.name``), with a clear error if absent."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise QenvError(
            f"{type(model).__name__} has no module named {name!r}.",
            fix="Use a name from discover_layers(model) for this same model.",
        ) from None


def weight_parameter(model: nn.Module, info: LayerInfo) -> nn.Parameter:
    """The Parameter behind ``info`` in its storage layout, so callers can swap ``param.data``."""
    weight = getattr(get_module(model, info.name), "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise QenvError(
            f"Module {info.name!r} of {type(model).__name__} has no weight Parameter.",
            fix="Use a LayerInfo from discover_layers(model) for this same, unmodified model.",
        )
    return weight


def get_weight(model: nn.Module, info: LayerInfo) -> torch.Tensor:
    """The weight as an ``[out, in]`` view sharing storage with the model (Conv1D is transposed).

    The view is detached from autograd, so in-place edits (``w.copy_(q)``) reach the model directly.
    """
    w = weight_parameter(model, info).detach()
    return w.t() if info.transposed else w


def to_storage_layout(info: LayerInfo, w_out_in: torch.Tensor) -> torch.Tensor:
    """Convert an ``[out, in]`` matrix to the layout of the layer's Parameter (``param.data = ...``)."""
    expected = (info.out_features, info.in_features)
    if tuple(w_out_in.shape) != expected:
        raise QenvError(
            f"Weight for {info.name!r} has shape {tuple(w_out_in.shape)}, expected [out, in] = {list(expected)}.",
            fix="Pass the matrix in [out, in] layout, as returned by get_weight(model, info).",
        )
    return w_out_in.t().contiguous() if info.transposed else w_out_in
