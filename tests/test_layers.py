"""Tests for the layer walker (qenv.models.layers) and the tiny model builders (qenv.models.tiny)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qenv.errors import QenvError
from qenv.models.layers import (
    LAYER_KINDS,
    LayerInfo,
    discover_layers,
    find_blocks,
    get_module,
    get_weight,
    to_storage_layout,
    weight_parameter,
)
from qenv.models.tiny import TINY_ARCHITECTURES, build_tiny_model, tiny_config

LLAMA_LIKE = ["q", "k", "v", "o", "gate", "up", "down"]
EXPECTED_KINDS: dict[str, list[str]] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,
    "phi3": ["qkv", "o", "gate_up", "down"],
    "gpt2": ["qkv", "o", "fc_in", "fc_out"],
    "gpt_neox": ["qkv", "o", "fc_in", "fc_out"],
    "opt": ["q", "k", "v", "o", "fc_in", "fc_out"],
    "falcon": ["qkv", "o", "fc_in", "fc_out"],
}
EXPECTED_BLOCK_PATH: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gemma": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
    "falcon": "transformer.h",
}
# Tiny sizes: hidden 64, 4 heads of 16, 2 KV heads (GQA) where supported, intermediate 128, vocab 256.
# (out, in) per kind, derived from the configs by hand, not from the modules.
EXPECTED_SHAPES: dict[str, dict[str, tuple[int, int]]] = {
    "llama": {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64),
              "gate": (128, 64), "up": (128, 64), "down": (64, 128)},
    "phi3": {"qkv": (64 + 2 * 32, 64), "o": (64, 64), "gate_up": (256, 64), "down": (64, 128)},
    "gpt2": {"qkv": (192, 64), "o": (64, 64), "fc_in": (128, 64), "fc_out": (64, 128)},
    "falcon": {"qkv": (64 + 2 * 32, 64), "o": (64, 64), "fc_in": (128, 64), "fc_out": (64, 128)},
    "opt": {"q": (64, 64), "k": (64, 64), "v": (64, 64), "o": (64, 64), "fc_in": (128, 64), "fc_out": (64, 128)},
}


def _ids(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, length), generator=g)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """One tiny model per architecture; tests that modify weights build their own."""
    return {arch: build_tiny_model(arch) for arch in TINY_ARCHITECTURES}


# --- tiny builders ---------------------------------------------------------------------------------


def test_tiny_architectures_list() -> None:
    assert TINY_ARCHITECTURES == (
        "llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox", "opt", "falcon",
    )


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tiny_model_runs_forward(arch: str, models: dict[str, nn.Module]) -> None:
    model = models[arch]
    assert model.config.model_type == arch
    assert not model.training
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 500_000, "tiny models must stay tiny"
    with torch.no_grad():
        logits = model(_ids()).logits
    assert logits.shape == (2, 12, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_seed_is_deterministic_and_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_model("llama", seed=7)
    assert torch.equal(torch.rand(1), expected_next)  # global RNG stream unaffected
    b = build_tiny_model("llama", seed=7)
    c = build_tiny_model("llama", seed=8)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa[name], pc[name])


def test_tiny_overrides_and_dtype() -> None:
    cfg = tiny_config("llama", num_hidden_layers=3, tie_word_embeddings=True)
    assert cfg.num_hidden_layers == 3 and cfg.tie_word_embeddings
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    model = build_tiny_model("gpt2", dtype=torch.bfloat16, n_layer=3)
    assert len(find_blocks(model)[1]) == 3
    assert next(model.parameters()).dtype == torch.bfloat16


def test_tiny_unknown_arch_names_known_ones() -> None:
    with pytest.raises(QenvError) as err:
        tiny_config("not_an_arch")
    assert "not_an_arch" in str(err.value)
    assert all(arch in err.value.fix for arch in TINY_ARCHITECTURES)


# --- find_blocks / discover_layers -----------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_find_blocks_path(arch: str, models: dict[str, nn.Module]) -> None:
    model = models[arch]
    path, blocks = find_blocks(model)
    assert path == EXPECTED_BLOCK_PATH[arch]
    assert blocks is model.get_submodule(path)
    assert len(blocks) == model.config.num_hidden_layers


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_discovered_kinds_per_block(arch: str, models: dict[str, nn.Module]) -> None:
    model = models[arch]
    n_blocks = model.config.num_hidden_layers
    layers = discover_layers(model)
    per_block = EXPECTED_KINDS[arch]
    assert [info.kind for info in layers] == per_block * n_blocks
    assert [info.block for info in layers] == [b for b in range(n_blocks) for _ in per_block]
    assert all(info.n_blocks == n_blocks for info in layers)
    assert all(info.kind in LAYER_KINDS for info in layers)
    assert len({info.name for info in layers}) == len(layers)
    block_path = EXPECTED_BLOCK_PATH[arch]
    for info in layers:
        assert info.name.startswith(f"{block_path}.{info.block}.")
        assert info.tied_to is None


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_shapes_match_module_weights(arch: str, models: dict[str, nn.Module]) -> None:
    model = models[arch]
    for info in discover_layers(model, include_lm_head=True, include_embeddings=True):
        module = get_module(model, info.name)
        is_conv1d = isinstance(module, Conv1D)
        assert info.transposed == is_conv1d
        stored = tuple(module.weight.shape)
        expected_stored = (info.in_features, info.out_features) if is_conv1d else (info.out_features, info.in_features)
        assert stored == expected_stored, info
        assert info.numel == module.weight.numel()
        assert tuple(get_weight(model, info).shape) == (info.out_features, info.in_features)
    for kind, shape in EXPECTED_SHAPES.get(arch, {}).items():
        for info in discover_layers(model):
            if info.kind == kind:
                assert (info.out_features, info.in_features) == shape, info


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_order_is_forward_order(arch: str, models: dict[str, nn.Module]) -> None:
    """The reported order must equal the order in which forward() first calls each module."""
    model = models[arch]
    layers = discover_layers(model, include_lm_head=True, include_embeddings=True)
    calls: list[str] = []
    handles = []
    for info in layers:
        def hook(_mod, _inp, _out, name=info.name):
            if name not in calls:
                calls.append(name)
        handles.append(get_module(model, info.name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(_ids())
    finally:
        for h in handles:
            h.remove()
    assert calls == [info.name for info in layers]
    assert layers[0].kind == "embed" and layers[0].block == -1
    if layers[-1].kind == "lm_head":
        assert layers[-1].block == layers[-1].n_blocks


def test_registration_order_is_not_trusted() -> None:
    """OPT registers k, v, q and Phi-3 registers o_proj before qkv_proj; the walker must reorder."""
    opt = build_tiny_model("opt")
    registered = [n.rsplit(".", 1)[-1] for n, m in opt.model.decoder.layers[0].named_modules()
                  if isinstance(m, nn.Linear)]
    assert registered[:3] == ["k_proj", "v_proj", "q_proj"]  # the premise of this test
    names = [i.name.rsplit(".", 1)[-1] for i in discover_layers(opt) if i.block == 0]
    assert names == ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def test_lm_head_and_embedding_entries_untied() -> None:
    model = build_tiny_model("llama", tie_word_embeddings=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    base = discover_layers(model)
    both = discover_layers(model, include_lm_head=True, include_embeddings=True)
    assert len(both) == len(base) + 2
    emb, head = both[0], both[-1]
    assert emb == LayerInfo("model.embed_tokens", "embed", -1, 2, 256, 64)
    assert head == LayerInfo("lm_head", "lm_head", 2, 2, 256, 64)
    only_head = discover_layers(model, include_lm_head=True)
    assert only_head[-1] == head and len(only_head) == len(base) + 1
    only_emb = discover_layers(model, include_embeddings=True)
    assert only_emb[0] == emb and len(only_emb) == len(base) + 1
    assert torch.equal(get_weight(model, emb), model.model.embed_tokens.weight)


def test_tied_lm_head_reported_once() -> None:
    model = build_tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # premise
    base = discover_layers(model)

    both = discover_layers(model, include_lm_head=True, include_embeddings=True)
    assert len(both) == len(base) + 1
    assert [i.kind for i in both].count("lm_head") == 0
    assert both[0].kind == "embed" and both[0].name == "model.embed_tokens"
    assert both[0].tied_to == "lm_head"

    only_head = discover_layers(model, include_lm_head=True)
    assert len(only_head) == len(base) + 1
    assert only_head[-1].kind == "lm_head" and only_head[-1].name == "lm_head"
    assert only_head[-1].tied_to == "model.embed_tokens"
    assert only_head[-1].block == 2

    total_with_head = sum(i.numel for i in both)
    assert total_with_head == sum(i.numel for i in base) + 256 * 64  # counted once


def test_tied_by_shared_storage_not_same_parameter() -> None:
    """A tie made by sharing storage (not the same Parameter object) is still detected."""
    model = build_tiny_model("llama", tie_word_embeddings=False)
    model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.data)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    layers = discover_layers(model, include_lm_head=True)
    assert layers[-1].tied_to == "model.embed_tokens"


# --- weight access -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_get_weight_is_out_in(arch: str, models: dict[str, nn.Module]) -> None:
    """module(x) == x @ W.T + b for the [out, in] matrix W, for Linear and transposed Conv1D alike."""
    model = models[arch]
    x = torch.randn(3, 5, 64)
    for info in discover_layers(model):
        if info.in_features != 64:
            continue
        module = get_module(model, info.name)
        w = get_weight(model, info)
        bias = module.bias if module.bias is not None else 0.0
        with torch.no_grad():
            torch.testing.assert_close(module(x), x @ w.T + bias)
        assert w.data_ptr() == weight_parameter(model, info).data_ptr()  # a view, not a copy


def test_gpt2_conv1d_view_and_write_back() -> None:
    model = build_tiny_model("gpt2")
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits.clone()
    info = next(i for i in discover_layers(model) if i.kind == "o" and i.block == 0)
    assert info.transposed and info.name == "transformer.h.0.attn.c_proj"
    module = get_module(model, info.name)
    assert isinstance(module, Conv1D)

    w = get_weight(model, info)
    assert torch.equal(w, module.weight.t())
    # In-place edits of the view land in the model.
    w[0, 1] += 1.0
    assert module.weight[1, 0].item() == pytest.approx(w[0, 1].item())

    # Writing an [out, in] matrix through to_storage_layout: zero row 0 (output feature 0).
    param = weight_parameter(model, info)
    assert param is module.weight
    new = get_weight(model, info).clone()
    new[0, :] = 0.0
    new[:, 3] *= 5.0
    stored = to_storage_layout(info, new)
    assert stored.shape == (info.in_features, info.out_features) and stored.is_contiguous()
    param.data = stored
    assert torch.equal(get_weight(model, info), new)
    x = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(module(x)[:, 0], module.bias[0].expand(2))
        after = model(ids).logits
    assert not torch.allclose(before, after)


def test_linear_write_back_changes_output() -> None:
    model = build_tiny_model("llama")
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits.clone()
    info = next(i for i in discover_layers(model) if i.kind == "down" and i.block == 1)
    assert not info.transposed
    new = torch.zeros(info.out_features, info.in_features)
    out = to_storage_layout(info, new)
    assert out is new  # identity for nn.Linear
    weight_parameter(model, info).data = out
    assert torch.count_nonzero(get_module(model, info.name).weight) == 0
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(before, after)


def test_to_storage_layout_rejects_wrong_shape() -> None:
    info = LayerInfo("x", "o", 0, 1, out_features=8, in_features=4, transposed=True)
    with pytest.raises(QenvError):
        to_storage_layout(info, torch.zeros(4, 8))
    assert to_storage_layout(info, torch.arange(32.0).reshape(8, 4)).shape == (4, 8)


def test_get_module_unknown_name() -> None:
    with pytest.raises(QenvError, match="no_such"):
        get_module(nn.Linear(2, 2), "no_such.layer")


# --- generic fallback and errors ---------------------------------------------------------------


class _Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))  # longer than the block list
        self.mix = nn.Linear(8, 8)


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.norms = nn.ModuleList(nn.LayerNorm(8) for _ in range(10))  # no linears: ignored
        self.trunk = nn.ModuleList(_Expert() for _ in range(3))


def test_find_blocks_generic_fallback() -> None:
    model = _Custom()
    path, blocks = find_blocks(model)
    assert path == "trunk" and blocks is model.trunk
    layers = discover_layers(model)
    assert len(layers) == 3 * 7
    assert layers[0].name == "trunk.0.experts.0" and layers[-1].name == "trunk.2.mix"
    assert {i.kind for i in layers} == {"other"}
    assert [i.block for i in layers] == sorted(i.block for i in layers)


def test_no_linear_layers_raises() -> None:
    model = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(QenvError) as err:
        discover_layers(model)
    assert "No quantizable linear layers found in Sequential" in str(err.value)
    assert err.value.fix

    convs = nn.Sequential(nn.ModuleList([nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 3)]))
    with pytest.raises(QenvError, match="No quantizable linear layers found"):
        discover_layers(convs)
    with pytest.raises(QenvError):
        find_blocks(convs)


def _lin() -> nn.Linear:
    return nn.Linear(4, 4)


def test_kind_names_of_other_families() -> None:
    """Context-dependent names (dense, c_proj) and aliases (w1/w2/w3, Wqkv, q) of other model families."""
    def block() -> nn.Module:
        return nn.ModuleDict({
            "attention": nn.ModuleDict({"Wqkv": _lin(), "dense": _lin()}),
            "feed_forward": nn.ModuleDict({"w1": _lin(), "w3": _lin(), "w2": _lin()}),
            "output": nn.ModuleDict({"dense": _lin()}),  # not an attention output
            "cross": nn.ModuleDict({"q": _lin(), "c_proj": _lin()}),  # c_proj outside attn/mlp
            "mlp": nn.ModuleDict({"c_proj": _lin()}),
        })

    model = nn.Module()
    model.layers = nn.ModuleList([block(), block()])
    layers = discover_layers(model)
    per_block = [(i.name.split(".", 2)[2], i.kind) for i in layers if i.block == 0]
    # Sorted by forward rank (q/qkv, o, gate, up, down); an "other" layer takes the rank of the
    # layer registered just before it, and ties keep registration order.
    assert per_block == [
        ("attention.Wqkv", "qkv"),
        ("cross.q", "q"),
        ("cross.c_proj", "other"),  # registered after cross.q
        ("attention.dense", "o"),
        ("feed_forward.w1", "gate"),
        ("feed_forward.w3", "up"),
        ("feed_forward.w2", "down"),
        ("output.dense", "other"),  # registered after feed_forward.w2
        ("mlp.c_proj", "fc_out"),
    ]
    assert [i.block for i in layers] == [0] * 9 + [1] * 9
