"""The output-error table (:func:`qenv.eval.sensitivity.rule_errors`) that greedy, the features and the
plan-based kinds rank layers by: each entry is ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``, and each layer's
denominator is computed once for all the rules (issue 26: it was half a cold menu table's matrix work)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import STORIES_BIN, TINYSTORIES, require
from qenv.eval import sensitivity
from qenv.eval.evaluator import Evaluator
from qenv.eval.tokens import tokens_from_text
from qenv.models.loading import load_model
from qenv.quant.rules import Rule


@pytest.fixture(scope="module")
def evaluator() -> Evaluator:
    require(STORIES_BIN, "stories260K llama2.c checkpoint")
    require(TINYSTORIES, "TinyStories text")
    loaded = load_model(STORIES_BIN)
    tokens = tokens_from_text(loaded.tokenizer, TINYSTORIES, n_tokens=256, seq_len=128)
    return Evaluator(loaded, tokens, batch_size=8, cache_dir=False)  # no disk cache: the table is computed here


def test_error_table_is_the_formula_with_each_norm_computed_once(evaluator: Evaluator) -> None:
    layers = evaluator.layers[:5]
    rules = [Rule(bits=3), Rule(bits=4, rounding="gptq"), Rule(bits=2, group_size=32)]
    table = sensitivity.rule_errors(evaluator, layers, rules)
    # one norm per layer, kept for the evaluator's later tables
    assert set(sensitivity._OUTPUT_NORMS[evaluator]) == {info.name for info in layers}
    for i, info in enumerate(layers):
        calib = evaluator.calibration_of(info.name)
        w = evaluator.weights.original(info.name).float()
        h = calib.hessian
        for j, rule in enumerate(rules):
            delta = evaluator.weights.weight_for(info.name, rule).float() - w
            expected = float((delta @ h * delta).sum() / (w @ h * w).sum().clamp_min(1e-30))
            assert table[i, j] == expected  # bit for bit: the norm is the same number, computed once
    with torch.inference_mode():
        again = sensitivity.rule_errors(evaluator, layers, rules[::-1])
    np.testing.assert_array_equal(again, table[:, ::-1])
