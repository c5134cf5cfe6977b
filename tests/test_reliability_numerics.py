"""Reliability (issue 6): NaN/inf and out of memory.

NaN/inf logits name the first module that produced them. Out of memory (raised by a real forward
hook, since a real OOM cannot be produced on purpose on this machine) becomes advice to use a smaller
batch. The evaluator refuses sequences longer than the model's context (issue 13).
"""

from __future__ import annotations

import pytest
import torch

from qenv.errors import QenvError
from reliability_helpers import stories_evaluator  # noqa: F401 - a fixture


def test_nan_or_inf_logits_name_the_first_module(stories_evaluator):
    from qenv.quant.presets import preset

    ev = stories_evaluator
    weight = ev.model.get_submodule("model.layers.2.self_attn.v_proj").weight
    with torch.no_grad():
        weight[0, 0] = float("inf")
    for evaluate in (lambda: ev.evaluate({}), lambda: ev.evaluate_blockwise({})):
        with pytest.raises(QenvError, match=r"NaN or inf values, first in module model\.layers\.2\.self_attn\.v_proj"):
            evaluate()
    with pytest.raises(QenvError, match=r"model\.layers\.2\.self_attn\.v_proj holds NaN or inf"):
        ev.evaluate(preset("rtn-w4", ev.layers))  # quantizing it is refused, naming it too
    norm = ev.model.get_submodule("model.layers.0.post_attention_layernorm").weight
    with torch.no_grad():
        weight[0, 0] = 0.0
        norm[3] = float("nan")  # earlier in the forward pass than v_proj of block 2
    with pytest.raises(QenvError, match=r"first in module model\.layers\.0\.post_attention_layernorm"):
        ev.evaluate_blockwise({})


def _oom(*args):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("module", ["model.embed_tokens", "model.layers.1.mlp", "lm_head"])
def test_out_of_memory_suggests_a_smaller_batch(stories_evaluator, module):
    """A real forward hook on a real module raises the OOM that a GPU would (the evaluator's and the
    streaming path's every stage: embeddings, a block, the head)."""
    from qenv.eval.evaluator import Evaluator

    ev = stories_evaluator
    handle = ev.model.get_submodule(module).register_forward_hook(_oom)
    try:
        for evaluate in (lambda: ev.evaluate({}), lambda: ev.evaluate_blockwise({}),
                         lambda: Evaluator(ev.loaded, ev.tokens, batch_size=2, cache_dir=False).reference):
            with pytest.raises(QenvError, match="Out of memory while running batches of 2 sequences") as err:
                evaluate()
            assert "smaller batch_size" in err.value.fix
    finally:
        handle.remove()


def test_out_of_memory_while_sampling_calibration_tokens(stories_evaluator):
    from qenv.envs.quant_llm import QuantLLMEnv

    loaded = stories_evaluator.loaded
    handle = loaded.model.get_submodule("model.layers.0.mlp").register_forward_hook(_oom)
    try:
        with pytest.raises(QenvError, match="Out of memory") as err:
            QuantLLMEnv(loaded, n_tokens=128, seq_len=64, batch_size=4, cache_dir=False, seed=12345)
        assert "smaller batch_size" in err.value.fix
    finally:
        handle.remove()


def test_evaluator_refuses_tokens_longer_than_the_context(stories_evaluator):
    from qenv.eval.evaluator import Evaluator
    from qenv.eval.tokens import TokenSet

    long = TokenSet(torch.ones(1, 600, dtype=torch.long), "test")
    with pytest.raises(QenvError, match="seq_len=600 is longer than the 512-token context"):
        Evaluator(stories_evaluator.loaded, long, cache_dir=False)
