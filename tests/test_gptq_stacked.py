"""GPTQ's column loop, sped up for menus (issue 26): the transposed loop and several rules in one loop
(``quantize_rules``) give exactly the images of the textbook loop, rule by rule, bit for bit.

The reference below is the loop as qenv ran it before (``[out, in]`` layout, one rule per loop,
lazy blocks of ``GPTQ_BLOCK`` columns), written out here so that the quantizer's faster loop is
checked against an independent copy, not against itself.
"""

from __future__ import annotations

import pytest
import torch

from qenv.envs.spaces import MENUS
from qenv.quant import quantizer as q
from qenv.quant.quantizer import LayerCalibration, quantize_codes, quantize_matrix, quantize_rules, stacks_with
from qenv.quant.rules import Rule


def reference_gptq(w: torch.Tensor, keep: torch.Tensor, rule: Rule, group: int, hessian: torch.Tensor) -> torch.Tensor:
    """GPTQ of one ``[out, in]`` matrix, column by column in the ``[out, in]`` layout."""
    out_f, in_f = w.shape
    original, w = w, w.clone()
    hinv = q._gptq_hinv(hessian[None])[0]
    result = torch.zeros_like(w)
    scale = zero = None
    for start in range(0, in_f, q.GPTQ_BLOCK):
        end = min(start + q.GPTQ_BLOCK, in_f)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % group == 0:
                g_end = min(col + group, in_f)
                current = torch.cat([w_block[:, i:], w[:, end:]], dim=1)[:, : g_end - col]
                sub = q._choose_grid(current, ~keep[:, col:g_end], rule, group, None)
                scale, zero = sub.scale[:, :1], sub.zero[:, :1]
            wc = w_block[:, i : i + 1]
            qc = torch.where(keep[:, col : col + 1], wc, q._fake_quant(wc, q._Grid(scale, zero, 2**rule.bits - 1)))
            result[:, col : col + 1] = qc
            err = (wc - qc) / hinv_block[i : i + 1, i : i + 1]
            w_block[:, i:] -= err @ hinv_block[i : i + 1, i:]
            err_block[:, i : i + 1] = err
        w[:, end:] -= err_block @ hinv[start:end, end:]
    return torch.where(keep, original.half().float(), result)


def problem(out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, LayerCalibration]:
    """A weight matrix and correlated calibration inputs, with a dead input channel and a zero run."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    w[0, :7] = 0.0
    x = torch.randn(96, in_f, generator=gen) @ (torch.eye(in_f) + 0.3 * torch.randn(in_f, in_f, generator=gen))
    x[:, 5] = 0.0
    return w, LayerCalibration(act_rms=x.square().mean(0).sqrt(), hessian=x.T @ x / 96)


GPTQ_RULES = [Rule(bits=3, group_size=32, rounding="gptq"), Rule(bits=4, group_size=64, rounding="gptq", mse_clip=True),
              Rule(bits=2, group_size=-1, rounding="gptq", symmetric=True),
              Rule(bits=4, group_size=64, rounding="gptq", outlier_fraction=0.01)]


@pytest.mark.parametrize("shape", [(24, 300), (40, 100), (8, 64)])  # several blocks, ragged groups, one block
@pytest.mark.parametrize("rule", GPTQ_RULES, ids=lambda r: r.label())
def test_gptq_is_the_textbook_loop_bit_for_bit(shape: tuple[int, int], rule: Rule) -> None:
    w, calib = problem(*shape)
    group = shape[1] if rule.group_size == -1 else min(rule.group_size, shape[1])
    keep = q._outlier_mask(w, rule, calib)
    assert torch.equal(quantize_matrix(w, rule, calib), reference_gptq(w, keep, rule, group, calib.hessian))


def test_quantize_rules_is_each_rule_alone_bit_for_bit() -> None:
    """A whole menu in one call (GPTQ rules stacked in one loop, AWQ, learned, nearest, fp16 and
    outlier rules beside them) gives what each rule gives alone, and the same integer codes."""
    learned = [r for r in MENUS["learned"] if r.rounding == "learned"][:2]
    rules = list(dict.fromkeys([*MENUS["default"], *learned, *GPTQ_RULES]))
    assert sum(stacks_with(r) for r in rules) >= 5
    w, calib = problem(16, 200, seed=1)
    together = quantize_rules(w, rules, calib)
    assert len(together) == len(rules)
    for rule, image in zip(rules, together):
        assert torch.equal(image, quantize_matrix(w, rule, calib)), rule.label()
    for rule in (r for r in rules if stacks_with(r) and r.outlier_fraction == 0):
        codes = quantize_codes(w, rule, calib)
        assert torch.equal(codes.dequantize(), quantize_matrix(w, rule, calib)), rule.label()


def test_weights_for_is_weight_for_and_fills_the_cache() -> None:
    """The evaluator's many-rules path gives each rule's ``weight_for`` tensor and caches them."""
    from qenv.eval.evaluator import Evaluator
    from qenv.eval.tokens import tokens_from_model
    from qenv.models.loading import load_model

    loaded = load_model("tiny-llama")
    evaluator = Evaluator(loaded, tokens_from_model(loaded.model, 64, 16, seed=0), cache_dir=False)
    rules = [r for r in MENUS["default"] if r.rounding == "gptq"][:3]
    rules += [r for r in MENUS["default"] if r.rounding == "nearest" and not r.keeps][:2]
    name = loaded.layers[0].name
    together = evaluator.weights.weights_for(name, rules)
    again = Evaluator(loaded, evaluator.tokens, cache_dir=False)
    for rule, tensor in zip(rules, together):
        assert (name, rule) in evaluator.weights._cache
        assert torch.equal(tensor, again.weights.weight_for(name, rule)), rule.label()


def test_a_recipes_gptq_layers_quantized_in_batches_are_the_one_by_one_tensors() -> None:
    """Applying a GPTQ recipe on a CPU quantizes its missing layers of one shape as one batch
    (``QuantizedWeights._quantize_missing``): the cached tensors and the score are those of
    quantizing each layer alone, and the hit/miss counts are as one by one."""
    from qenv.eval.evaluator import Evaluator
    from qenv.eval.tokens import tokens_from_model
    from qenv.models.loading import load_model
    from qenv.quant.presets import preset

    loaded = load_model("tiny-llama")
    tokens = tokens_from_model(loaded.model, 64, 16, seed=0)
    recipe = preset("gptq-w4", loaded.layers)
    batched = Evaluator(loaded, tokens, cache_dir=False)
    one_by_one = Evaluator(loaded, tokens, cache_dir=False)
    singles = {name: one_by_one.weights.weight_for(name, rule) for name, rule in recipe.items()}
    assert batched.evaluate(recipe).kl == one_by_one.evaluate(recipe).kl
    assert (batched.weights.hits, batched.weights.misses) == (0, len(recipe))
    for name, rule in recipe.items():
        assert torch.equal(batched.weights._cache[(name, rule)], singles[name]), name
