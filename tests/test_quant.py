"""Acceptance tests of the quantization core: survival rules, the quantizer, exact bit accounting,
and what the rules do to real models (stories260K and the embedded default model).

Everything here runs the real quantizer on real tensors; the real-model tests score recipes with the
one evaluator (plain and streaming paths) against the full-precision model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qenv.errors import QenvError
from qenv.eval.evaluator import Evaluator, Metrics
from qenv.eval.tokens import tokens_from_text
from qenv.models.layers import discover_layers, get_weight
from qenv.models.loading import LoadedModel, load_model
from qenv.quant.accounting import bits_per_weight, model_bytes, recipe_bits
from qenv.quant.presets import KQUANT_RULES, llamacpp_mix, preset, uniform
from qenv.quant.quantizer import LayerCalibration, quantize_matrix
from qenv.quant.rules import FP16_BITS, KEEP, Recipe, Rule, layer_bits, n_outliers
from conftest import STORIES_BIN, TINYSTORIES, WIKITEXT_TEST, BUILTIN_DEFAULT as DEFAULT_DIR, require


UNIFORM_BITS = (8, 6, 5, 4, 3, 2)


def _stories() -> LoadedModel:
    require(STORIES_BIN, "stories260K llama2.c checkpoint")
    return load_model(STORIES_BIN)


# ---------------------------------------------------------------------------------------------
# Rules: validation, normalisation, JSON round trip
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, named", [
    (dict(bits=7), "bits"),
    (dict(bits=1), "bits"),
    (dict(group_size=100), "group_size"),
    (dict(group_size=0), "group_size"),
    (dict(clip=0.0), "clip"),
    (dict(clip=1.5), "clip"),
    (dict(outlier_fraction=0.2), "outlier_fraction"),
    (dict(outlier_fraction=-0.01), "outlier_fraction"),
    (dict(rounding="stochastic"), "rounding"),
    (dict(salience=(1.0, 2.0)), "salience"),
    (dict(salience=(1.0, float("nan"), 0.0)), "salience"),
    (dict(act_scale=2.0), "act_scale"),
    (dict(act_scale=-0.5), "act_scale"),
])
def test_invalid_rule_fields_raise_qenv_error(fields: dict, named: str) -> None:
    with pytest.raises(QenvError) as err:
        Rule(**fields)
    assert named in str(err.value)


@pytest.mark.parametrize("data, named", [
    ({"bits": 4, "colour": "red"}, "colour"),
    ({"bits": 4, "salience": 1}, "salience"),
    ({"bits": 4, "clip": "high"}, "clip"),
    ({"bits": "4"}, "bits"),
])
def test_malformed_rule_dicts_raise_qenv_error(data: dict, named: str) -> None:
    with pytest.raises(QenvError) as err:
        Rule.from_dict(data)
    assert named in str(err.value)


def test_keep_rules_are_normalised_and_equal() -> None:
    assert Rule(bits=16, group_size=32, symmetric=True, outlier_fraction=0.01, rounding="gptq") == KEEP
    assert hash(Rule(bits=16, clip=0.5)) == hash(KEEP)
    assert KEEP.keeps and not Rule(bits=8).keeps
    assert KEEP.label() == "fp16"
    assert Rule(bits=3, group_size=64, symmetric=True, rounding="gptq", outlier_fraction=0.01).label() == \
        "w3g64s-gptq-o1%"


def test_rule_and_recipe_json_round_trip(tmp_path: Path) -> None:
    rules = {
        "a": Rule(bits=3, group_size=32, symmetric=True, rounding="gptq"),
        "b": Rule(bits=4, group_size=-1, mse_clip=True, outlier_fraction=0.01, salience=(1.0, 2.0, 0.5)),
        "c": Rule(bits=2, clip=0.9, act_scale=0.5),
        "d": KEEP,
    }
    for rule in rules.values():
        back = Rule.from_dict(json.loads(json.dumps(rule.to_dict())))
        assert back == rule and hash(back) == hash(rule) and back.label() == rule.label()
    recipe = Recipe(rules)
    path = tmp_path / "out" / "recipe.json"
    assert recipe.save(path, model="stories260K", kl=0.25) == path
    # Atomic write: only the final file is left, no temporary sibling.
    assert sorted(p.name for p in path.parent.iterdir()) == ["recipe.json"]
    payload = json.loads(path.read_text())
    assert payload["model"] == "stories260K" and payload["kl"] == 0.25
    loaded = Recipe.load(path)
    assert loaded == recipe and hash(loaded) == hash(recipe)
    assert dict(loaded.items()) == rules
    assert loaded.rule_for("not-in-recipe") == KEEP
    # Overwriting replaces the file atomically, still without leftovers.
    Recipe({"a": Rule(bits=8)}).save(path)
    assert Recipe.load(path) == Recipe({"a": Rule(bits=8)})
    assert sorted(p.name for p in path.parent.iterdir()) == ["recipe.json"]
    # A bare mapping of rules (no "rules" key) loads too.
    path.write_text(json.dumps({"x": {"bits": 5}}))
    assert Recipe.load(path) == Recipe({"x": Rule(bits=5)})


def test_recipe_load_bad_files(tmp_path: Path) -> None:
    with pytest.raises(QenvError, match="does not exist"):
        Recipe.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(QenvError, match="not valid JSON"):
        Recipe.load(bad)
    bad.write_text(json.dumps({"rules": {"x": {"bits": 4, "salience": 3}}}))
    with pytest.raises(QenvError, match="Malformed rule"):
        Recipe.load(bad)
    with pytest.raises(QenvError, match="not a Rule"):
        Recipe({"x": {"bits": 4}})  # type: ignore[dict-item]


# ---------------------------------------------------------------------------------------------
# Quantizer on tensors
# ---------------------------------------------------------------------------------------------

def _groups(in_features: int, group_size: int) -> list[slice]:
    """Column ranges of the groups a rule uses (the last one may be ragged)."""
    g = in_features if group_size == -1 else min(group_size, in_features)
    return [slice(s, min(s + g, in_features)) for s in range(0, in_features, g)]


def _assert_on_grid(q: torch.Tensor, bits: int, group_size: int) -> None:
    """Each group of each row takes at most 2**bits values, all integer multiples of one fp16 scale."""
    for row in q:
        for cols in _groups(q.shape[1], group_size):
            values = torch.unique(row[cols])
            assert values.numel() <= 2**bits
            if values.numel() < 2:
                continue
            step = (values[1:] - values[:-1]).min()
            assert step > 0 and step.half().float() == step, "grid step is not an fp16 value"
            k = values / step
            assert torch.equal(k, torch.round(k)), "values are not integer multiples of the scale"
            assert float(k.max() - k.min()) <= 2**bits - 1


def _rtn_by_hand(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
    """Round-to-nearest written out per group: the fp16 scale and zero point of each group.

    Weights in ``keep`` (outliers) are stored as fp16 and left out of their group's range.
    """
    maxq = 2**bits - 1
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for cols in _groups(w.shape[1], group_size):
            x = w[r, cols]
            bulk = x if keep is None else x[~keep[r, cols]]
            lo = min(float(bulk.min()), 0.0) if bulk.numel() else 0.0
            hi = max(float(bulk.max()), 0.0) if bulk.numel() else 0.0
            if symmetric:
                amax = torch.tensor(max(-lo, hi))
                scale = (2.0 * amax / maxq).half().float()
                zero = torch.tensor(float((maxq + 1) // 2))
            else:
                scale = ((torch.tensor(hi) - torch.tensor(lo)) / maxq).half().float()
                zero = torch.round(-torch.tensor(lo) / scale).clamp(0, maxq)
            codes = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
            out[r, cols] = (codes - zero) * scale
    if keep is not None:
        out = torch.where(keep, w.half().float(), out)
    return out


@pytest.mark.parametrize("bits, group_size, symmetric", [
    (4, 128, False), (3, 32, True), (2, 32, False), (8, -1, False), (6, 64, True), (5, 128, True),
])
def test_rtn_matches_hand_formula_and_stays_on_grid(bits: int, group_size: int, symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + group_size)
    w = torch.randn(24, 172, generator=gen) * 0.05  # 172 inputs: ragged last group for g32/g64/g128
    rule = Rule(bits=bits, group_size=group_size, symmetric=symmetric)
    q = quantize_matrix(w, rule)
    assert q.shape == w.shape and q.dtype == w.dtype
    assert torch.equal(q, _rtn_by_hand(w, bits, group_size, symmetric))
    _assert_on_grid(q, bits, group_size)
    # Round-to-nearest without clipping or outliers is off by at most half a step, plus what rounding the
    # scale to fp16 (relative error <= 2^-11) shifts the far end of the grid by: up to 2^bits codes away.
    for r in range(w.shape[0]):
        for cols in _groups(172, group_size):
            x = w[r, cols]
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            step = (2 * max(-lo, hi) if symmetric else hi - lo) / (2**bits - 1)
            assert float((q[r, cols] - x).abs().max()) <= step * (0.5 + 2**bits * 2**-11)


def test_symmetric_grid_is_centred_and_asymmetric_fits_one_sided_weights() -> None:
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(16, 64, generator=gen)
    q = quantize_matrix(w, Rule(bits=3, group_size=32, symmetric=True))
    for r in range(16):
        for cols in _groups(64, 32):
            scale = (2.0 * w[r, cols].abs().max() / 7).half().float()  # fp16 scale of the group
            k = q[r, cols] / scale
            assert torch.equal(k, torch.round(k))
            assert float(k.min()) >= -4 and float(k.max()) <= 3  # symmetric codes around zero
    # Weights all of one sign: the symmetric grid wastes half its codes, the asymmetric one does not.
    positive = torch.rand(16, 64, generator=gen) + 0.1
    err_sym = (quantize_matrix(positive, Rule(bits=3, group_size=32, symmetric=True)) - positive).square().sum()
    err_asym = (quantize_matrix(positive, Rule(bits=3, group_size=32, symmetric=False)) - positive).square().sum()
    assert err_asym < 0.5 * err_sym


def test_ragged_last_group_has_its_own_scale() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(8, 172, generator=gen)
    rule = Rule(bits=3, group_size=32, symmetric=True)
    q = quantize_matrix(w, rule)
    w2 = w.clone()
    w2[:, 160:] *= 100.0  # only the ragged 12-wide last group changes
    q2 = quantize_matrix(w2, rule)
    assert torch.equal(q[:, :160], q2[:, :160])
    assert float((q2[:, 160:] - w2[:, 160:]).abs().max()) > float((q[:, 160:] - w[:, 160:]).abs().max())


def test_group_larger_than_row_is_one_group_per_row() -> None:
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(172, 64, generator=gen)
    per_row = quantize_matrix(w, Rule(bits=4, group_size=-1))
    assert torch.equal(quantize_matrix(w, Rule(bits=4, group_size=128)), per_row)
    assert layer_bits(Rule(bits=4, group_size=128), 172, 64) == layer_bits(Rule(bits=4, group_size=-1), 172, 64)


def test_keep_rule_returns_the_weights_unchanged() -> None:
    w = torch.randn(8, 16)
    q = quantize_matrix(w, KEEP)
    assert torch.equal(q, w) and q.data_ptr() != w.data_ptr()


@pytest.mark.parametrize("numel, fraction", [(11008, 0.01), (4096, 0.01), (2048, 0.005), (64 * 64, 0.05)])
def test_outliers_survive_exactly_and_count_is_deterministic(numel: int, fraction: float) -> None:
    gen = torch.Generator().manual_seed(numel)
    out_f = 64
    w = torch.randn(out_f, numel // out_f, generator=gen) * 0.02
    w[3, 5], w[10, 1], w[-1, -1] = 1.7, -2.3, 0.9  # real outliers, far outside the bulk
    rule = Rule(bits=2, group_size=32, symmetric=True, outlier_fraction=fraction)
    k = n_outliers(rule, numel)
    assert k == round(fraction * numel)
    q = quantize_matrix(w, rule)
    top = torch.topk(w.abs().flatten(), k).indices
    assert (q.flatten()[top] == w.half().float().flatten()[top]).all(), "the largest weights are stored as fp16"
    # Exactly those k survive: every other weight is on the grid of its group's remaining weights.
    keep = torch.zeros(numel, dtype=torch.bool)
    keep[top] = True
    keep = keep.view_as(w)
    assert torch.equal(q, _rtn_by_hand(w, 2, 32, True, keep=keep))
    # Without outliers the huge weights stretch their group's grid and the bulk loses precision.
    plain = quantize_matrix(w, Rule(bits=2, group_size=32, symmetric=True))
    bulk = ~keep
    assert (q - w)[bulk].square().sum() < (plain - w)[bulk].square().sum()


def _survivors(w: torch.Tensor, rule: Rule, calib: LayerCalibration | None) -> set[int]:
    q = quantize_matrix(w, rule, calib)
    return set(torch.nonzero((q == w.half().float()).flatten()).flatten().tolist())


def test_salience_exponents_choose_which_weights_survive() -> None:
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(32, 64, generator=gen)
    rms = torch.exp(torch.linspace(-3.0, 3.0, 64))  # later input channels carry much larger activations
    hdiag = torch.exp(torch.linspace(3.0, -3.0, 64))  # ... while the Hessian favours earlier ones
    calib = LayerCalibration(act_rms=rms, hessian=torch.diag(hdiag))
    k = n_outliers(Rule(bits=2, outlier_fraction=0.05), w.numel())
    assert k == 102

    def top(score: torch.Tensor) -> set[int]:
        return set(torch.topk(score.flatten(), k).indices.tolist())

    by_weight = _survivors(w, Rule(bits=2, outlier_fraction=0.05), calib)
    by_awq = _survivors(w, Rule(bits=2, outlier_fraction=0.05, salience=(1.0, 1.0, 0.0)), calib)
    by_hessian = _survivors(w, Rule(bits=2, outlier_fraction=0.05, salience=(2.0, 0.0, 1.0)), calib)
    assert by_weight == top(w.abs())
    assert by_awq == top(w.abs() * rms[None, :])
    assert by_hessian == top(w.abs() ** 2 * hdiag[None, :])
    assert len({frozenset(by_weight), frozenset(by_awq), frozenset(by_hessian)}) == 3
    # Activation salience alone keeps whole high-activation channels (the last 4 of 64 here).
    by_act = _survivors(w, Rule(bits=2, outlier_fraction=0.05, salience=(0.0, 1.0, 0.0)), calib)
    assert len(by_act) == k and {i % 64 for i in by_act} <= {60, 61, 62, 63}
    with pytest.raises(QenvError, match="calibration"):
        quantize_matrix(w, Rule(bits=2, outlier_fraction=0.05, salience=(1.0, 1.0, 0.0)), None)


def _correlated_calibration(in_f: int, seed: int) -> LayerCalibration:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(4096, in_f, generator=gen)
    mix = torch.eye(in_f) + 0.5 * torch.randn(in_f, in_f, generator=gen) / math.sqrt(in_f)
    x = z @ mix + 0.8 * z[:, :1]  # a shared component correlates every channel
    x = x * torch.exp(torch.randn(in_f, generator=gen))  # unequal channel scales
    hessian = x.T @ x / x.shape[0]
    return LayerCalibration(act_rms=torch.diagonal(hessian).sqrt(), hessian=hessian)


def _proxy_error(q: torch.Tensor, w: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ): the layer's expected squared output error on the calibration inputs."""
    d = (q - w).double()
    return float(torch.trace(d @ hessian.double() @ d.T))


@pytest.mark.parametrize("bits, group_size, symmetric", [(3, 32, False), (4, -1, True), (2, 64, False)])
def test_gptq_reduces_output_error_on_correlated_inputs(bits: int, group_size: int, symmetric: bool) -> None:
    calib = _correlated_calibration(128, seed=bits)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(5))
    rtn = quantize_matrix(w, Rule(bits=bits, group_size=group_size, symmetric=symmetric), calib)
    gptq_rule = Rule(bits=bits, group_size=group_size, symmetric=symmetric, rounding="gptq")
    gptq = quantize_matrix(w, gptq_rule, calib)
    assert _proxy_error(gptq, w, calib.hessian) < 0.9 * _proxy_error(rtn, w, calib.hessian)
    _assert_on_grid(gptq, bits, group_size)
    with pytest.raises(QenvError, match="Hessian"):
        quantize_matrix(w, gptq_rule, None)
    with pytest.raises(QenvError, match="Hessian"):
        quantize_matrix(w, gptq_rule, LayerCalibration(act_rms=calib.act_rms))


@pytest.mark.parametrize("bits, group_size, symmetric", [(3, 32, False), (4, 64, True), (2, -1, False)])
def test_mse_clip_never_increases_weighted_error(bits: int, group_size: int, symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(21)
    w = torch.randn(40, 128, generator=gen) * torch.exp(torch.randn(40, 128, generator=gen))  # heavy tails
    rms = torch.exp(0.7 * torch.randn(128, generator=gen))
    calib = LayerCalibration(act_rms=rms)  # no Hessian: importance is rms(x)^2
    importance = rms.square().double()
    plain = quantize_matrix(w, Rule(bits=bits, group_size=group_size, symmetric=symmetric), calib)
    clipped = quantize_matrix(w, Rule(bits=bits, group_size=group_size, symmetric=symmetric, mse_clip=True), calib)

    def per_group(q: torch.Tensor) -> torch.Tensor:
        err = (q - w).double().square() * importance
        return torch.stack([err[:, cols].sum(1) for cols in _groups(128, group_size)], dim=1)

    e_plain, e_clip = per_group(plain), per_group(clipped)
    assert (e_clip <= e_plain * (1 + 1e-9) + 1e-15).all()
    assert e_clip.sum() < 0.95 * e_plain.sum()


def test_nan_weights_are_refused() -> None:
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(QenvError, match="NaN"):
        quantize_matrix(w, Rule(bits=4))


# ---------------------------------------------------------------------------------------------
# Exact bit accounting, written out by hand
# ---------------------------------------------------------------------------------------------

def test_layer_bits_by_hand() -> None:
    # gate_proj of stories260K: [out=172, in=64], asymmetric 4-bit, group 128 > in -> one group per row.
    #   codes 172*64*4 = 44032; groups 172*ceil(64/128) = 172, each fp16 scale + 4-bit zero = 20 bits -> 3440
    assert layer_bits(Rule(bits=4, group_size=128), 172, 64) == 44032 + 3440 == 47472
    # down_proj of stories260K: [out=64, in=172], symmetric 3-bit, group 32 -> 5 full groups + one of 12.
    #   codes 64*172*3 = 33024; groups 64*ceil(172/32) = 64*6 = 384, each fp16 scale only -> 6144
    assert layer_bits(Rule(bits=3, group_size=32, symmetric=True), 64, 172) == 33024 + 6144 == 39168
    # Per output channel, asymmetric 8-bit on [172, 64]: 172*64*8 = 88064 codes; 172 groups * (16+8) = 4128
    assert layer_bits(Rule(bits=8, group_size=-1), 172, 64) == 88064 + 4128 == 92192
    # 1% outliers, asymmetric 4-bit g64 on [64, 172]: numel 11008; outliers round(110.08) = 110, each an fp16
    # value + a flat index of ceil(log2(11008)) = 14 bits (2^13 = 8192 < 11008 <= 16384 = 2^14).
    #   codes 11008*4 = 44032; groups 64*ceil(172/64) = 192 * (16+4) = 3840; outliers 110*(16+14) = 3300
    rule = Rule(bits=4, group_size=64, outlier_fraction=0.01)
    assert n_outliers(rule, 11008) == 110
    assert layer_bits(rule, 64, 172) == 44032 + 3840 + 3300 == 51172
    # A kept layer costs 16 bits per weight; scales and zero points do not apply.
    assert layer_bits(KEEP, 64, 172) == 16 * 11008 == 176128
    assert FP16_BITS == 16


def _stories_w4_bits_by_hand() -> int:
    # One stories260K block under rtn-w4 (asymmetric 4-bit, g128: 20 bits of scale+zero per group):
    q = 64 * 64 * 4 + 64 * 1 * 20  # 16384 + 1280 = 17664 (o_proj the same)
    k = 32 * 64 * 4 + 32 * 1 * 20  # 8192 + 640 = 8832 (v_proj the same)
    gate = 172 * 64 * 4 + 172 * 1 * 20  # 44032 + 3440 = 47472 (up_proj the same)
    down = 64 * 172 * 4 + 64 * 2 * 20  # 44032 + 2560 = 46592 (172 inputs -> 2 groups of <=128)
    block = 2 * q + 2 * k + 2 * gate + down
    assert block == 194528
    return 5 * block  # 972640


def test_stories_recipe_bits_bpw_and_model_bytes_by_hand() -> None:
    lm = _stories()
    assert [(i.out_features, i.in_features) for i in lm.layers[:7]] == [
        (64, 64), (32, 64), (32, 64), (64, 64), (172, 64), (172, 64), (64, 172)]
    recipe = preset("rtn-w4", lm.layers)
    weights = 5 * (4096 + 2048 + 2048 + 4096 + 3 * 11008)  # 226560 quantized weights
    assert recipe_bits(lm.layers, recipe) == _stories_w4_bits_by_hand() == 972640
    assert bits_per_weight(lm.layers, recipe) == pytest.approx(972640 / weights)
    # Everything else in fp16: the embedding (512*64 = 32768, also the tied lm_head, counted once),
    # 2 RMSNorm weights of 64 per block and the final norm: 32768 + 5*128 + 64 = 33472 parameters.
    assert lm.n_params == 260032 == weights + 33472
    assert model_bytes(lm.model, lm.layers, recipe) == math.ceil((972640 + 33472 * 16) / 8) == 188524
    # An fp16 model is 2 bytes per parameter: the tied matrix is not counted twice.
    assert model_bytes(lm.model, lm.layers, Recipe({})) == 2 * 260032


def test_stories_tied_lm_head_counted_once_by_hand() -> None:
    lm = _stories()
    layers = discover_layers(lm.model, include_lm_head=True)  # the lm_head is the embedding matrix
    head = layers[-1]
    assert head.kind == "lm_head" and head.tied_to is not None and (head.out_features, head.in_features) == (512, 64)
    recipe = dict(preset("rtn-w4", layers[:-1]))
    recipe[head.name] = KQUANT_RULES["Q6_K"]  # llama.cpp's Q6_K: rows of 64 fall back to Q8_0 (34 bytes / 32)
    head_bits = 512 * (64 // 32) * 34 * 8  # 512 rows of two Q8_0 blocks = 278528 bits (8.5 bpw)
    other = 5 * 128 + 64  # only the norms are left outside the targeted layers: 704 params
    assert recipe_bits(layers, recipe) == _stories_w4_bits_by_hand() + head_bits
    assert model_bytes(lm.model, layers, recipe) == math.ceil((972640 + 278528 + other * 16) / 8) == 157804
    assert model_bytes(lm.model, layers, Recipe({})) == 2 * 260032


def test_tiny_llama_model_bytes_by_hand() -> None:
    lm = load_model("tiny-llama")  # hidden 64, MLP 128, 2 blocks, vocab 256, untied embeddings
    assert not lm.model.config.tie_word_embeddings
    recipe = preset("rtn-w8-gc", lm.layers)  # asymmetric 8-bit per output channel: 24 bits per row
    rows = 64 + 32 + 32 + 64 + 128 + 128 + 64  # q k v o gate up down = 512 rows per block
    weights = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 128 * 64 + 128 * 64 + 64 * 128  # 36864 per block
    quant_bits = 2 * (weights * 8 + rows * 24)  # 2 * (294912 + 12288) = 614400
    other = 256 * 64 + 256 * 64 + 2 * 2 * 64 + 64  # embed + untied lm_head + norms = 33088
    assert lm.n_params == 2 * weights + other == 106816
    assert recipe_bits(lm.layers, recipe) == quant_bits == 614400
    assert model_bytes(lm.model, lm.layers, recipe) == (614400 + 33088 * 16) // 8 == 142976


# ---------------------------------------------------------------------------------------------
# Quantizer on real weights (stories260K)
# ---------------------------------------------------------------------------------------------

def test_real_weights_on_grid_and_gptq_beats_rtn_per_layer(stories: "RealModel") -> None:
    lm, ev = stories.loaded, stories.ev
    by_kind = {info.kind: info for info in lm.layers[:7]}
    gate, down = get_weight(lm.model, by_kind["gate"]), get_weight(lm.model, by_kind["down"])
    _assert_on_grid(quantize_matrix(gate, Rule(bits=4, group_size=128)), 4, 128)  # in=64: one group per row
    _assert_on_grid(quantize_matrix(down, Rule(bits=3, group_size=32, symmetric=True)), 3, 32)  # ragged last
    _assert_on_grid(quantize_matrix(down, Rule(bits=2, group_size=-1)), 2, -1)
    for info in lm.layers:
        calib = ev.calibration_of(info.name)
        assert calib is not None and calib.hessian is not None
        w = get_weight(lm.model, info).float()
        rtn = _proxy_error(quantize_matrix(w, Rule(bits=3)), w, calib.hessian)
        gptq = _proxy_error(quantize_matrix(w, Rule(bits=3, rounding="gptq"), calib), w, calib.hessian)
        assert gptq < rtn, info.name


# ---------------------------------------------------------------------------------------------
# What rules do to real models: stories260K and the embedded default model
# ---------------------------------------------------------------------------------------------

class RealModel:
    """A real model with one evaluator; metrics are memoised per recipe name."""

    def __init__(self, loaded: LoadedModel, ev: Evaluator) -> None:
        self.loaded = loaded
        self.ev = ev
        self._metrics: dict[str, Metrics] = {}

    def metrics(self, name: str) -> Metrics:
        if name not in self._metrics:
            if name in KQUANT_RULES:
                recipe = uniform(self.loaded.layers, KQUANT_RULES[name])
            else:
                recipe = preset(name, self.loaded.layers)
            self._metrics[name] = self.ev.evaluate(recipe)
        return self._metrics[name]


def _real(spec: str) -> RealModel:
    torch.manual_seed(0)
    if spec == "stories260K":
        require(STORIES_BIN, "stories260K llama2.c checkpoint")
        require(TINYSTORIES, "TinyStories text")
        loaded, text = load_model(STORIES_BIN), TINYSTORIES  # evaluated on its own domain
    else:
        if not (DEFAULT_DIR / "config.json").is_file():
            pytest.skip(f"embedded default model not there yet: {DEFAULT_DIR} has no config.json")
        require(WIKITEXT_TEST, "WikiText-2 test split")
        loaded, text = load_model("default"), WIKITEXT_TEST
    tokens = tokens_from_text(loaded.tokenizer, text, n_tokens=2048, seq_len=128)
    return RealModel(loaded, Evaluator(loaded, tokens, batch_size=8, cache_dir=False))


@pytest.fixture(scope="module")
def stories() -> RealModel:
    return _real("stories260K")


@pytest.fixture(scope="module", params=["stories260K", "default"])
def real(request: pytest.FixtureRequest) -> RealModel:
    return request.getfixturevalue("stories") if request.param == "stories260K" else _real("default")


def test_fp16_rule_changes_nothing(real: RealModel) -> None:
    lm, ev = real.loaded, real.ev
    ids = ev.batches[0]
    with torch.inference_mode():
        before = lm.model(input_ids=ids, use_cache=False).logits
    ptrs = {n: p.data_ptr() for n, p in lm.model.named_parameters()}
    for recipe in (preset("fp16", lm.layers), uniform(lm.layers, KEEP),
                   uniform(lm.layers, Rule(bits=16, group_size=32, outlier_fraction=0.01))):
        for m in (ev.evaluate(recipe), ev.evaluate_blockwise(recipe)):
            assert m.kl == 0.0 and m.top1 == 1.0 and m.bpw == 16.0
        with torch.inference_mode(), ev.weights.applied(recipe):
            assert {n: p.data_ptr() for n, p in lm.model.named_parameters()} == ptrs
            during = lm.model(input_ids=ids, use_cache=False).logits
        assert torch.equal(before, during)
    assert real.metrics("fp16").model_bytes == 2 * lm.n_params


def test_uniform_8bit_kl_below_1e3(real: RealModel) -> None:
    m = real.metrics("rtn-w8")
    assert m.kl < 1e-3, f"rtn-w8 KL {m.kl:.3g} on {real.loaded.name}"
    assert m.top1 > 0.95


def test_kl_rises_monotonically_as_uniform_bits_fall(real: RealModel) -> None:
    ms = [real.metrics(f"rtn-w{b}") for b in UNIFORM_BITS]
    kls = [m.kl for m in ms]
    report = ", ".join(f"w{b}: {kl:.4g}" for b, kl in zip(UNIFORM_BITS, kls))
    assert all(a < b for a, b in zip(kls, kls[1:])), report
    bpws = [m.bpw for m in ms]
    assert all(a > b for a, b in zip(bpws, bpws[1:]))
    assert kls[0] > 0.0  # 8 bits is close, but not identical


@pytest.mark.parametrize("mix, low, high", [("q4_k_m", "Q4_K", "Q6_K"), ("q3_k_m", "Q3_K", "Q5_K")])
def test_llamacpp_mix_lands_between_the_uniform_rules_it_mixes(real: RealModel, mix: str, low: str, high: str) -> None:
    order = list(KQUANT_RULES)
    allowed = {KQUANT_RULES[t] for t in order[order.index(low): order.index(high) + 1]}
    used = set(llamacpp_mix(real.loaded.layers, mix).values())
    assert used <= allowed and KQUANT_RULES[low] in used and len(used) > 1
    m, lo, hi = real.metrics(mix), real.metrics(low), real.metrics(high)
    assert lo.bpw < m.bpw < hi.bpw
    assert hi.kl < m.kl < lo.kl, f"{mix} KL {m.kl:.4g} vs {low} {lo.kl:.4g} / {high} {hi.kl:.4g}"


def test_awq_and_gptq_beat_rtn_at_3_bits_on_stories(stories: RealModel) -> None:
    rtn, gptq, awq = (stories.metrics(f"{f}-w3").kl for f in ("rtn", "gptq", "awq"))
    assert gptq < rtn, f"GPTQ-w3 KL {gptq:.4g} vs RTN-w3 {rtn:.4g}"
    assert awq < rtn, f"AWQ-w3 KL {awq:.4g} vs RTN-w3 {rtn:.4g}"
    # All three store exactly the same bits.
    assert len({stories.metrics(f"{f}-w3").bpw for f in ("rtn", "gptq", "awq")}) == 1


def test_restore_is_bit_exact_after_many_recipes(real: RealModel) -> None:
    lm, ev = real.loaded, real.ev
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in lm.model.named_parameters()}
    names = [info.name for info in lm.layers]
    mixed = {name: rule for name, rule in zip(names, [
        Rule(bits=3, group_size=32, symmetric=True, rounding="gptq"),
        Rule(bits=2, outlier_fraction=0.01, salience=(1.0, 1.0, 0.0)),
        Rule(bits=4, act_scale=0.5, mse_clip=True),
        KEEP,
        Rule(bits=5, group_size=-1, clip=0.9),
    ] * len(names))}
    for recipe in [preset(p, lm.layers) for p in ("gptq-w3", "awq-w3", "q3_k_m")] + [mixed]:
        assert ev.evaluate(recipe).kl > 0
    assert ev.evaluate_blockwise(mixed).kl > 0  # the streaming path swaps weights block by block
    after = dict(lm.model.named_parameters())
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name].detach(), value), name
        assert after[name].data_ptr() == ptrs[name], name
