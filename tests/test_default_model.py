"""Tests for the embedded default model (qenv/models/builtin/wikitext-llama) and its training script.

The model folder ships inside the package, so these tests fail (not skip) when it is missing.
Tests that need WikiText-2 skip when ../shared/data is not checked out beside the repo.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "qenv" / "models" / "builtin" / "wikitext-llama"
WIKITEXT_DIR = REPO.parent / "shared" / "data" / "wikitext-2"
SCRIPT = REPO / "scripts" / "train_default_model.py"

needs_wikitext = pytest.mark.skipif(
    not ((WIKITEXT_DIR / "train.txt").is_file() and (WIKITEXT_DIR / "test.txt").is_file()),
    reason=f"WikiText-2 data not found at {WIKITEXT_DIR} (../shared/data is not checked out beside the repo)",
)


def _load_script():
    spec = importlib.util.spec_from_file_location("train_default_model", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_default_model", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model_and_tokenizer(monkeypatch_module):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (MODEL_DIR / "config.json").is_file(), f"embedded default model missing at {MODEL_DIR}"
    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32)
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    # Everything must come from the folder: no hub access.
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    yield mp
    mp.undo()


def test_folder_contents_and_size():
    names = {p.name for p in MODEL_DIR.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert required in names, f"{required} missing from {MODEL_DIR}"
    size = (MODEL_DIR / "model.safetensors").stat().st_size
    assert size <= 4 * 1024 * 1024, f"model.safetensors is {size:,} bytes (> 4 MiB)"
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] >= 6
    tcfg = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    assert tcfg["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_safetensors_is_float16():
    from safetensors import safe_open

    with safe_open(str(MODEL_DIR / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}


def test_loads_offline_with_expected_shape(model_and_tokenizer):
    model, tok = model_and_tokenizer
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers >= 6
    assert len(model.model.layers) == model.config.num_hidden_layers
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n_params <= 2_000_000, n_params  # 1,443,456 as shipped
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(tok) == model.config.vocab_size
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)


def test_tokenizer_round_trip(model_and_tokenizer):
    _, tok = model_and_tokenizer
    texts = [
        " = Valkyria Chronicles III = \n",
        " The game 's sales were 1 @,@ 000 @-@ odd in 2011 ; <unk> was named . \n",
        " Ünïcödé and 戦場のヴァルキュリア3 and tabs\tand  double  spaces",
    ]
    for text in texts:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids[1:], skip_special_tokens=False) == text
        assert tok.decode(ids, skip_special_tokens=True) == text.replace("<unk>", "")
    # WikiText's literal <unk> word is the single <unk> token
    assert tok(" a <unk> b", add_special_tokens=False).input_ids.count(tok.unk_token_id) == 1
    # tokenizers' raw tokenizer.json gives the same ids as AutoTokenizer
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    assert raw.encode(texts[1]).ids == tok(texts[1]).input_ids


def test_model_card_records_provenance():
    card = (MODEL_DIR / "README.md").read_text(encoding="utf-8")
    for needle in ("scripts/train_default_model.py", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
                   "token-level perplexity", "word-level perplexity", "1,443,456", "Device:"):
        assert needle in card, needle


@needs_wikitext
def test_perplexity_on_wikitext_test_prefix(model_and_tokenizer):
    model, tok = model_and_tokenizer
    mod = _load_script()
    lines = (WIKITEXT_DIR / "test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    ids: list[int] = []
    for line in lines:
        ids.extend(tok(line, add_special_tokens=False).input_ids)
        if len(ids) >= 20_000:
            break
    ids = ids[:20_000]
    nll, n = mod.evaluate_nll(model, ids, 512, tok.bos_token_id, "cpu", batch=8)
    ppl = math.exp(nll / n)
    assert n == 20_000
    # Measured 21.306 (CPU, fp32 compute on the fp16 weights); uniform would be vocab_size = 2048.
    # The full test file gives 23.164 (see the model card).
    assert ppl < 23.0, ppl
    assert ppl < model.config.vocab_size / 4


def test_generates_text(model_and_tokenizer):
    model, tok = model_and_tokenizer
    x = tok(" = Robert Boulter = \n \n", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=30, do_sample=False)
    text = tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)
    words = text.split()
    assert len(words) >= 10
    # mostly real lowercase English function words, not byte soup
    assert sum(w in {"the", "of", "and", "in", "a", "was", "to", ",", "."} for w in words) >= 3, text


def test_script_missing_data_is_a_clean_error(tmp_path, capsys):
    mod = _load_script()
    rc = mod.main(["--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "data folder not found" in err and "Traceback" not in err
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.txt").write_text(" a b \n")
    rc = mod.main(["--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 2
    assert "test.txt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@needs_wikitext
@pytest.mark.slow  # ~6-20 s on a busy 2-core CPU
def test_training_script_end_to_end_tiny(tmp_path):
    """~20 CPU steps of a tiny model on a slice of train.txt; proves the script runs end to end."""
    mod = _load_script()
    out = tmp_path / "model"
    rc = mod.main([
        "--device", "cpu", "--data-dir", str(WIKITEXT_DIR), "--out", str(out),
        "--max-train-chars", "100000", "--max-eval-tokens", "1000", "--vocab-size", "300",
        "--hidden", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--intermediate", "64",
        "--max-positions", "64", "--steps", "20", "--batch", "4", "--seq-len", "32",
        "--eval-every", "0", "--log-every", "10", "--seed", "0",
    ])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left behind"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert len(tok) == model.config.vocab_size == 300
    assert model.config.num_hidden_layers == 2
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "--steps 20" in card and "token-level perplexity" in card
    # refuses to overwrite without --overwrite
    assert mod.main(["--device", "cpu", "--data-dir", str(WIKITEXT_DIR), "--out", str(out)]) == 2
