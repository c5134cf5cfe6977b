"""Fast menus (issue 26 item 5): the ``gguf`` menu's (layer, rule) pairs are quantized by llama.cpp in
parallel threads, and the cache holds exactly the bytes of the serial build."""

from __future__ import annotations

import threading

import pytest
import torch

from qenv.envs.spaces import GGUF_MENU
from qenv.eval.evaluator import Evaluator
from qenv.eval.tokens import tokens_from_text
from qenv.models.loading import load_model
from qenv.quant.apply import QuantizedWeights
from qenv.quant import quantizer as Q
from qenv.quant.quantizer import quantize_threads
from conftest import STORIES_BIN, WIKITEXT_TEST, require


@pytest.fixture(scope="module")
def stories_eval() -> Evaluator:
    require(STORIES_BIN, "stories260K llama2.c checkpoint")
    require(WIKITEXT_TEST, "WikiText-2 test split")
    lm = load_model(STORIES_BIN)
    return Evaluator(lm, tokens_from_text(lm.tokenizer, WIKITEXT_TEST, n_tokens=256, seq_len=64), batch_size=4,
                     cache_dir=False)


def test_threaded_gguf_menu_build_is_bit_identical_to_the_serial_build(stories_eval: Evaluator,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ev = stories_eval
    ev.reference  # noqa: B018  (the importance matrices come from it)
    serial = QuantizedWeights(ev.model, ev.layers, ev.calibration_of, 1 << 30)
    threaded = QuantizedWeights(ev.model, ev.layers, ev.calibration_of, 1 << 30)
    rules = list(GGUF_MENU)
    assert serial.prebuild(rules, threads=1) == len(rules) * len(ev.layers)
    real, where = Q.quantize_matrix, set()

    def noting_the_thread(*args, **kwargs):  # the real quantizer, and which thread ran it
        where.add(threading.current_thread().name.split("_")[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(Q, "quantize_matrix", noting_the_thread)
    assert threaded.prebuild(rules, threads=4) == len(rules) * len(ev.layers)
    assert where == {"qenv-ggml"}  # every pair was quantized in the pool's threads
    assert list(serial._cache) == list(threaded._cache)  # same pairs, inserted in the same order
    for key, tensor in serial._cache.items():
        assert torch.equal(tensor, threaded._cache[key]), key
    # ... and what one layer quantized on demand gives (the evaluation's own path)
    on_demand = QuantizedWeights(ev.model, ev.layers, ev.calibration_of, 1 << 30)
    for rule in rules[::5]:
        name = ev.layers[-1].name
        assert torch.equal(on_demand.weight_for(name, rule), threaded._cache[(name, rule)])


def test_quantize_threads_reads_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from qenv.errors import QenvError

    monkeypatch.setenv("QENV_QUANT_THREADS", "3")
    assert quantize_threads() == 3
    monkeypatch.setenv("QENV_QUANT_THREADS", "0")
    with pytest.raises(QenvError, match="QENV_QUANT_THREADS"):
        quantize_threads()
    monkeypatch.delenv("QENV_QUANT_THREADS")
    assert quantize_threads() >= 1
