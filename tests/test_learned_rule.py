"""The learned rule (``rounding="learned"``, issue 24 item 7): GPTQ's storage with codes and group
scales learned on the layer's calibration Hessian, a rule no human preset uses.

On stories260K's real layers and calibration activations: its output error is at most GPTQ's and
below RTN's, it costs GPTQ's bits exactly, it is deterministic, its integer codes are what it
scored, it is cached like GPTQ, and the ``rule``/``continuous`` kinds and ``menu="learned"`` reach it.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import STORIES_BIN, TINYSTORIES, require
from qenv.envs.quant_llm import QuantLLMEnv
from qenv.envs.spaces import DEFAULT_MENU, LEARNED_RULES, MENUS, ActionMapper, parse_menu
from qenv.errors import QenvError
from qenv.eval import sensitivity
from qenv.eval.evaluator import Evaluator
from qenv.eval.tokens import tokens_from_text
from qenv.models.layers import get_weight
from qenv.models.loading import LoadedModel, load_model
from qenv.quant.accounting import bits_per_weight
from qenv.quant.presets import menu_table, preset, uniform
from qenv.quant.quantizer import LayerCalibration, quantize_codes, quantize_matrices, quantize_matrix
from qenv.quant.rules import Rule, layer_bits


@pytest.fixture(scope="module")
def stories(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, Evaluator]:
    require(STORIES_BIN, "stories260K llama2.c checkpoint")
    require(TINYSTORIES, "TinyStories text")
    torch.manual_seed(0)
    loaded = load_model(STORIES_BIN)
    tokens = tokens_from_text(loaded.tokenizer, TINYSTORIES, n_tokens=1024, seq_len=128)
    return loaded, Evaluator(loaded, tokens, batch_size=8, cache_dir=tmp_path_factory.mktemp("qenv-cache"))


def _output_error(q: torch.Tensor, w: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` on the undamped calibration Hessian (what sensitivity measures)."""
    d = q.float() - w
    return float(((d @ hessian) * d).sum() / ((w @ hessian) * w).sum())


def _layer(stories: tuple[LoadedModel, Evaluator], index: int) -> tuple[torch.Tensor, LayerCalibration]:
    loaded, ev = stories
    info = loaded.layers[index]
    calib = ev.calibration_of(info.name)
    assert calib is not None and calib.hessian is not None
    return get_weight(loaded.model, info).float(), calib


def test_learned_output_error_at_most_gptq_and_below_rtn_on_real_layers(stories) -> None:
    """stories260K's first two blocks at 3 bits (the first block's at 2 and 4; every kind of layer): the
    learned rule's output error on the real calibration activations is <= GPTQ's and < RTN's, and
    over those layers clearly lower than GPTQ's (the learning does something, not GPTQ again)."""
    loaded, _ = stories
    first_block = [i for i, info in enumerate(loaded.layers) if info.block == 0]
    two_blocks = [i for i, info in enumerate(loaded.layers) if info.block in (0, 1)]
    for bits, indices in ((3, two_blocks), (2, first_block), (4, first_block)):
        totals = {"nearest": 0.0, "gptq": 0.0, "learned": 0.0}
        for i in indices:
            w, calib = _layer(stories, i)
            errors = {rounding: _output_error(quantize_matrix(w, Rule(bits=bits, rounding=rounding), calib), w,
                                              calib.hessian) for rounding in totals}
            name = loaded.layers[i].name
            assert errors["learned"] <= errors["gptq"] * (1 + 1e-6), (bits, name, errors)
            assert errors["learned"] < errors["nearest"], (bits, name, errors)
            for rounding, e in errors.items():
                totals[rounding] += e
        assert totals["learned"] < 0.95 * totals["gptq"], (bits, totals)


def test_learned_rules_of_the_menu_start_from_gptq_with_mse_clipping(stories) -> None:
    """The menu's learned rules start from GPTQ with MSE clipping (the best human rule at their size on
    stories260K): on the first block at 3 bits their error is <= that rule's, layer by layer."""
    loaded, _ = stories
    assert all(r.mse_clip and r.rounding == "learned" for r in LEARNED_RULES)
    for i, info in enumerate(loaded.layers):
        if info.block != 0:
            continue
        w, calib = _layer(stories, i)
        start = _output_error(quantize_matrix(w, Rule(bits=3, rounding="gptq", mse_clip=True), calib), w, calib.hessian)
        learned = _output_error(quantize_matrix(w, LEARNED_RULES[1], calib), w, calib.hessian)
        assert learned <= start * (1 + 1e-6), (info.name, learned, start)


def test_learned_rule_costs_gptqs_bits_exactly(stories) -> None:
    """Same storage as GPTQ (codes, one fp16 scale and one zero point per group): identical bits on
    any shape, ragged groups included, and an identical bpw for a whole model."""
    for rule in LEARNED_RULES:
        gptq = Rule(bits=rule.bits, group_size=rule.group_size, rounding="gptq")
        for shape in ((64, 64), (172, 64), (64, 172), (100, 200), (4096, 4096)):
            assert layer_bits(rule, *shape) == layer_bits(gptq, *shape)
    loaded, _ = stories
    for bits in (2, 3, 4):
        learned = uniform(loaded.layers, Rule(bits=bits, rounding="learned"))
        assert bits_per_weight(loaded.layers, learned) == bits_per_weight(loaded.layers, preset(f"gptq-w{bits}", loaded.layers))


def test_learned_codes_are_the_image_on_gptqs_grid(stories) -> None:
    """``quantize_codes`` of a learned rule dequantizes to exactly the image scored; the codes are
    in range, the scales are fp16 values (one per group) and the zero points are GPTQ's."""
    w, calib = _layer(stories, 6)  # the first block's down projection: in=172, a ragged last group at g64
    for rule in (Rule(bits=3, rounding="learned", mse_clip=True), Rule(bits=2, group_size=64, rounding="learned"),
                 Rule(bits=4, group_size=32, symmetric=True, rounding="learned")):
        codes = quantize_codes(w, rule, calib)
        assert torch.equal(codes.dequantize(), quantize_matrix(w, rule, calib))
        assert int(codes.codes.min()) >= 0 and int(codes.codes.max()) <= 2**rule.bits - 1
        n_groups = -(-w.shape[1] // min(rule.group_size, w.shape[1]))
        assert codes.scale.shape == (w.shape[0], n_groups)
        assert torch.equal(codes.scale.half().float(), codes.scale)
        gptq = quantize_codes(w, Rule(bits=rule.bits, group_size=rule.group_size, symmetric=rule.symmetric,
                                      mse_clip=rule.mse_clip, rounding="gptq"), calib)
        assert torch.equal(codes.zero, gptq.zero)
        assert not torch.equal(codes.codes, gptq.codes)  # learned, not GPTQ's codes again


def test_learned_rule_is_deterministic_and_batches_agree(stories) -> None:
    rule = Rule(bits=3, rounding="learned")
    w, calib = _layer(stories, 0)
    w2, calib2 = _layer(stories, 1)  # q and k: the same shape and input, other weights
    first = quantize_matrix(w, rule, calib)
    assert torch.equal(first, quantize_matrix(w, rule, calib))
    batched = quantize_matrices([w, w2], rule, [calib, calib2])
    torch.testing.assert_close(batched[0], first, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[1], quantize_matrix(w2, rule, calib2), rtol=0, atol=1e-5)


def test_learned_rule_is_cached_per_layer_and_in_the_error_table(stories, monkeypatch) -> None:
    """Like GPTQ: quantized once per (layer, rule) in the weight cache, and its output errors are
    written to and read back from the on-disk error table (no recomputation on the second read)."""
    loaded, ev = stories
    name = loaded.layers[3].name
    rule = Rule(bits=4, rounding="learned")
    misses = ev.weights.misses
    first = ev.weights.weight_for(name, rule)
    assert ev.weights.misses == misses + 1
    assert ev.weights.weight_for(name, rule) is first and ev.weights.misses == misses + 1
    layers = loaded.layers[:4]
    rules = [Rule(bits=3, rounding="gptq"), Rule(bits=3, rounding="learned")]
    table = sensitivity.rule_errors(ev, layers, rules)
    assert (table[:, 1] <= table[:, 0] * (1 + 1e-6)).all()

    def no_recompute(*args, **kwargs):
        raise AssertionError("the error table was recomputed instead of read from the cache")

    monkeypatch.setattr(sensitivity, "output_error", no_recompute)
    np.testing.assert_array_equal(sensitivity.rule_errors(ev, layers, rules), table)


def test_learned_rule_lowers_the_models_kl_at_gptqs_size(stories) -> None:
    """End to end on stories260K (its own calibration tokens): uniform learned 3-bit has a lower KL
    than uniform GPTQ 3-bit, at the identical bpw."""
    loaded, ev = stories
    gptq = ev.evaluate(preset("gptq-w3", loaded.layers))
    learned = ev.evaluate(uniform(loaded.layers, Rule(bits=3, rounding="learned")))
    assert learned.bpw == gptq.bpw
    assert learned.kl < gptq.kl


def test_rule_and_continuous_kinds_reach_the_learned_rounding() -> None:
    rule_kind = ActionMapper("rule")
    target = Rule(bits=3, group_size=128, rounding="learned")
    indices = rule_kind.rule_indices(target)
    assert indices is not None and rule_kind.to_rule(np.array(indices)) == target
    assert target in rule_kind.rules
    continuous = ActionMapper("continuous")
    action = np.zeros(10, dtype=np.float32)
    action[3] = 0.9  # the rounding knob's last third
    assert continuous.to_rule(action).rounding == "learned"
    action[3] = -0.9
    assert continuous.to_rule(action).rounding == "nearest"
    multi = ActionMapper("multidiscrete")  # unchanged: policies trained on it keep their space
    assert multi.space.nvec.tolist() == [6, 4, 3, 2] and all(r.rounding != "learned" for r in multi.rules)


def test_learned_menu_lists_the_learned_rules_after_the_default_menu() -> None:
    menu = parse_menu("learned")
    assert menu is MENUS["learned"] and menu[:len(DEFAULT_MENU)] == DEFAULT_MENU
    assert menu[len(DEFAULT_MENU):] == LEARNED_RULES and len(set(menu)) == len(menu)
    assert [r.bits for r in LEARNED_RULES] == [2, 3, 4]
    table = menu_table(menu)
    doc = inspect.getdoc(QuantLLMEnv)
    for i, rule in enumerate(LEARNED_RULES, start=len(DEFAULT_MENU)):
        bpw = f"{layer_bits(rule, 4096, 4096) / 4096**2:.3f}"
        row = next(line for line in table.splitlines() if line.startswith(f"{i} "))
        assert rule.label() in row and row.endswith(bpw) and "(GPTQ, learned)" in row
        assert f"{i} ``{rule.label()}``" in " ".join(doc.split()) and bpw in doc


def test_learned_rule_json_label_and_bad_input(stories) -> None:
    rule = Rule(bits=3, rounding="learned")
    assert rule.label() == "w3g128a-learned" and Rule.from_dict(rule.to_dict()) == rule
    assert rule.needs_calibration and rule.uses_hessian and not Rule(bits=3).uses_hessian
    with pytest.raises(QenvError, match="learned"):
        Rule(rounding="learnt")  # the error lists the roundings, the new one included
    w, _ = _layer(stories, 0)
    with pytest.raises(QenvError, match="calibration Hessian"):
        quantize_matrix(w, rule)
    with pytest.raises(QenvError, match="calibration Hessian"):
        quantize_matrix(w, rule, LayerCalibration(act_rms=torch.ones(w.shape[1])))


def test_an_env_of_the_rule_kind_plays_learned_rules(tmp_path: Path) -> None:
    """The ``rule`` kind picks the learned rounding for every layer (of the tiny built-in model, for
    speed); the episode's recipe holds it, its bpw is uniform GPTQ's, and it deploys as a packed
    checkpoint (GPTQ's storage) that transformers loads as exactly the model scored."""
    from qenv.export_packed import packed_kl, write_packed_checkpoint

    env = QuantLLMEnv("tiny-llama", action_kind="rule", budget_bpw=16.0, n_tokens=256, seq_len=32, cache_dir=False)
    try:
        env.reset(seed=0)
        action = np.array(env.mapper.rule_indices(Rule(bits=4, rounding="learned")))
        done, info = False, {}
        while not done:
            _, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
        rules = {Rule.from_dict(r) for r in info["recipe_rules"].values()}
        assert rules == {Rule(bits=4, rounding="learned")}
        assert info["bpw"] == pytest.approx(bits_per_weight(env.task.layers, preset("gptq-w4", env.task.layers)))
        recipe = uniform(env.task.layers, Rule(bits=4, rounding="learned"))
        folder = write_packed_checkpoint(env.task.evaluator, recipe, tmp_path / "packed")
        assert packed_kl(folder, env.task.evaluator, recipe, max_batches=None) <= 1e-7
    finally:
        env.close()
