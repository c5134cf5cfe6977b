"""Observation features that survive layout changes (issue 25 item 6).

One model in two layouts: a tiny Llama (separate q/k/v, gate/up) and the same weights as a Phi-3
(fused ``qkv_proj`` and ``gate_up_proj``), which computes the same logits. The ``relative``
observation (what the transfer configs use) must read the layers both layouts share (o, down)
alike, and a fused layer like the layers it fuses in every entry that does not depend on how it
is stored: its input statistics, depth and per-part shape.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qenv.envs.features import STATIC_NAMES, layer_parts, relative_static, static_features
from qenv.eval.evaluator import Evaluator
from qenv.eval.tokens import TokenSet
from qenv.models.layers import discover_layers
from qenv.models.loading import LoadedModel, load_model, weights_fingerprint
from qenv.models.tiny import build_tiny_model


def _as_phi3(llama: torch.nn.Module) -> torch.nn.Module:
    """The tiny Llama's weights in Phi-3's fused layout (q, k, v stacked; gate then up)."""
    cfg = llama.config
    phi3 = build_tiny_model("phi3", rms_norm_eps=cfg.rms_norm_eps, rope_theta=getattr(cfg, "rope_theta", 10000.0))
    with torch.no_grad():
        phi3.model.embed_tokens.weight.copy_(llama.model.embed_tokens.weight)
        phi3.model.norm.weight.copy_(llama.model.norm.weight)
        phi3.lm_head.weight.copy_(llama.lm_head.weight)
        for ours, theirs in zip(phi3.model.layers, llama.model.layers):
            att, mlp = theirs.self_attn, theirs.mlp
            ours.self_attn.qkv_proj.weight.copy_(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
            ours.self_attn.o_proj.weight.copy_(att.o_proj.weight)
            ours.mlp.gate_up_proj.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            ours.mlp.down_proj.weight.copy_(mlp.down_proj.weight)
            ours.input_layernorm.weight.copy_(theirs.input_layernorm.weight)
            ours.post_attention_layernorm.weight.copy_(theirs.post_attention_layernorm.weight)
    return phi3.eval()


@pytest.fixture(scope="module")
def two_layouts():
    llama = load_model("tiny-llama")
    phi3 = _as_phi3(llama.model)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(llama.model(input_ids=ids).logits, phi3(input_ids=ids).logits, atol=1e-5)
    fused = LoadedModel(model=phi3, tokenizer=None, name="phi3-of-llama", spec="phi3-of-llama",
                        layers=discover_layers(phi3), fingerprint=weights_fingerprint(phi3))
    tables = {}
    for loaded in (llama, fused):
        evaluator = Evaluator(loaded, TokenSet(ids, "random"), batch_size=4, cache_dir=False)
        tables[loaded.name] = (loaded.layers, static_features(evaluator, loaded.layers))
    return tables["tiny-llama"], tables["phi3-of-llama"]


def _relative(two_layouts):
    return tuple((layers, relative_static(static, layers)) for layers, static in two_layouts)


def _column(name: str) -> int:
    return STATIC_NAMES.index(name)


def test_layers_both_layouts_share_read_alike(two_layouts):
    (split_layers, split), (fused_layers, fused) = _relative(two_layouts)
    assert [layer_parts(i) for i in fused_layers[:4]] == [3, 1, 2, 1]
    for kind in ("o", "down"):
        a = split[[i for i, info in enumerate(split_layers) if info.kind == kind]]
        b = fused[[i for i, info in enumerate(fused_layers) if info.kind == kind]]
        # every entry but the z-scored errors (the fused layer's error is its parts' together); the
        # medians they are centred on move a little with the fused layers' own statistics (the peak
        # of q, k and v stacked is the largest of theirs): by < 0.02, where a plain median moved
        # x_log_rms by 0.28 and param_share by 0.2
        keep = [j for j, name in enumerate(STATIC_NAMES) if not name.startswith("z_log_err")]
        assert np.allclose(a[:, keep], b[:, keep], atol=0.02), (kind, STATIC_NAMES)


def test_a_fused_layer_reads_like_the_layers_it_fuses(two_layouts):
    (split_layers, split), (fused_layers, fused) = _relative(two_layouts)
    for fused_kind, parts in (("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up"))):
        f = fused[[i for i, info in enumerate(fused_layers) if info.kind == fused_kind]]
        for part in parts:
            p = split[[i for i, info in enumerate(split_layers) if info.kind == part]]
            for name in ("depth", "log_fan_in", "x_log_rms", "x_log_peak_ratio", f"kind_{part}"):
                assert np.allclose(f[:, _column(name)], p[:, _column(name)], atol=2e-3), (fused_kind, part, name)
        # shapes per part: between the smallest and the largest part (GQA: q is wider than k and v)
        for name in ("log_fan_out", "log_numel"):
            spread = [split[[i for i, info in enumerate(split_layers) if info.kind == part], _column(name)]
                      for part in parts]
            assert np.all(f[:, _column(name)] >= np.min(spread, axis=0) - 1e-6)
            assert np.all(f[:, _column(name)] <= np.max(spread, axis=0) + 1e-6)
