"""Acceptance tests of ``load_model`` for every kind of spec, and of the clear errors bad input gets.

Every user mistake must surface as one :class:`QenvError` whose message names the problem and says how
to fix it, with no chained traceback behind it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from qenv.errors import QenvError
from qenv.eval.tokens import tokens_from_text
from qenv.models.layers import discover_layers, get_module, get_weight
from qenv.models.loading import WEIGHTS_FINGERPRINT_PREFIX, LoadedModel, load_model, weights_fingerprint
from conftest import BUILTIN_DEFAULT as DEFAULT_DIR, STORIES_BIN, clear_error
from qenv.models.tiny import TINY_ARCHITECTURES
from qenv.quant.presets import llamacpp_mix, preset


LLAMA_BLOCK = ["q", "k", "v", "o", "gate", "up", "down"]


@pytest.fixture(scope="module")
def stories() -> LoadedModel:
    if not STORIES_BIN.is_file():
        pytest.skip(f"stories260K llama2.c checkpoint missing at {STORIES_BIN} (../shared/data beside the repo)")
    return load_model(STORIES_BIN)




# ---------------------------------------------------------------------------------------------
# Specs that load
# ---------------------------------------------------------------------------------------------

def test_llama2c_bin_spec(stories: LoadedModel) -> None:
    lm = stories
    assert lm.name == "stories260K" and lm.spec == str(STORIES_BIN)
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    assert lm.n_blocks == 5 and lm.blocks_path == "model.layers" and lm.vocab_size == 512
    assert lm.n_params == 260032  # README: 260,032 parameters (the tied classifier once)
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    assert [i.kind for i in lm.layers] == LLAMA_BLOCK * 5
    assert [i.block for i in lm.layers] == [b for b in range(5) for _ in LLAMA_BLOCK]
    assert [(i.out_features, i.in_features) for i in lm.layers[:7]] == [
        (64, 64), (32, 64), (32, 64), (64, 64), (172, 64), (172, 64), (64, 172)]
    assert lm.layers[0].name == "model.layers.0.self_attn.q_proj" and not any(i.tied_to for i in lm.layers)
    # The tokenizer reproduces llama2.c's ids: BOS + sentencepiece (README, "Verified behaviour").
    ids = lm.tokenizer("Once upon a time, there was a little girl named Lily.")["input_ids"]
    assert ids == [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]
    # A LoadedModel passes through; loading again (str or Path) gives the same fingerprint.
    assert load_model(lm) is lm
    again = load_model(str(STORIES_BIN))
    assert again.fingerprint == lm.fingerprint and again.model is not lm.model
    bf16 = load_model(STORIES_BIN, dtype="bfloat16")
    # the same weights held in bfloat16 are the same model; the numbers cached for it are not the same
    assert bf16.dtype == torch.bfloat16 and bf16.fingerprint == lm.fingerprint and bf16.cache_key != lm.cache_key


def test_fingerprint_follows_the_weights_not_the_file(stories: LoadedModel) -> None:
    """issue 25: stories260K.gguf holds stories260K.bin's weights (its head untied, another config):
    one model, so a policy trained on one has seen the other; a changed weight is another model."""
    gguf = STORIES_BIN.with_suffix(".gguf")
    if not gguf.is_file():
        pytest.skip(f"real data missing: {gguf}")
    from_gguf = load_model(gguf)
    assert from_gguf.model.lm_head.weight is not from_gguf.model.model.embed_tokens.weight  # untied copy
    assert from_gguf.fingerprint == stories.fingerprint and from_gguf.fingerprint.startswith(WEIGHTS_FINGERPRINT_PREFIX)
    assert from_gguf.cache_key != stories.cache_key  # other config (context 2048, untied head): cached apart
    assert from_gguf.is_model(stories.fingerprint) and not from_gguf.is_model("w1-0123456789abcdef")
    assert stories.is_model(stories.cache_key)  # a fingerprint recorded before weights fingerprints existed
    assert not stories.is_model(None) and not stories.is_model(from_gguf.cache_key)

    changed = load_model(STORIES_BIN)
    info = changed.layers[-1]  # the last down_proj, [64, 172]
    get_weight(changed.model, info)[5, 7] += 0.25
    assert weights_fingerprint(changed.model) != stories.fingerprint
    get_weight(changed.model, info)[5, 7] -= 0.25
    assert weights_fingerprint(changed.model) == stories.fingerprint
    norm = changed.model.model.norm.weight  # not a quantizable layer: not what tells models apart
    norm.data.mul_(2)
    assert weights_fingerprint(changed.model) == stories.fingerprint


def test_fingerprint_reads_conv1d_as_its_linear() -> None:
    """GPT-2's Conv1D keeps [in, out]: the same matrices as nn.Linear [out, in] are the same weights."""
    gpt2 = load_model("tiny-gpt2")
    as_linear = load_model("tiny-gpt2")
    for info in discover_layers(as_linear.model):
        conv = get_module(as_linear.model, info.name)
        linear = nn.Linear(info.in_features, info.out_features)
        linear.weight.data = conv.weight.data.t().contiguous()
        linear.bias.data = conv.bias.data.clone()
        parent, _, leaf = info.name.rpartition(".")
        setattr(get_module(as_linear.model, parent), leaf, linear)
    assert not any(i.transposed for i in discover_layers(as_linear.model))
    assert weights_fingerprint(as_linear.model) == gpt2.fingerprint


def test_tied_lm_head_and_embeddings_are_reported_once(stories: LoadedModel) -> None:
    assert stories.model.lm_head.weight is stories.model.model.embed_tokens.weight
    with_head = load_model(STORIES_BIN, include_lm_head=True).layers
    assert len(with_head) == 36
    head = with_head[-1]
    assert (head.name, head.kind, head.block, head.tied_to) == ("lm_head", "lm_head", 5, "model.embed_tokens")
    assert (head.out_features, head.in_features) == (512, 64)
    both = discover_layers(stories.model, include_lm_head=True, include_embeddings=True)
    assert len(both) == 36 and both[0].kind == "embed" and both[0].tied_to == "lm_head"
    assert all(i.kind != "lm_head" for i in both)  # the tied pair is one matrix: listed once


def test_default_builtin_spec() -> None:
    if not (DEFAULT_DIR / "config.json").is_file():
        pytest.skip(f"embedded default model not there yet: {DEFAULT_DIR} has no config.json")
    lm = load_model("default")
    assert lm.name == "wikitext-llama" and lm.spec == "default"
    assert lm.tokenizer is not None and lm.dtype == torch.float32
    config = json.loads((DEFAULT_DIR / "config.json").read_text())
    assert lm.vocab_size == config["vocab_size"] and lm.n_blocks == config["num_hidden_layers"]
    assert [i.kind for i in lm.layers] == LLAMA_BLOCK * lm.n_blocks
    assert load_model("wikitext-llama").fingerprint == lm.fingerprint
    ids = lm.tokenizer("The game was released in 2011 .", add_special_tokens=False)["input_ids"]
    assert ids and max(ids) < lm.vocab_size
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits
    assert logits.shape == (1, len(ids), lm.vocab_size) and torch.isfinite(logits).all()


def test_tiny_specs_every_architecture() -> None:
    fingerprints = set()
    for arch in TINY_ARCHITECTURES:
        lm = load_model(f"tiny-{arch}")
        assert lm.spec == f"tiny-{arch}" and lm.tokenizer is None and lm.n_blocks == 2
        assert lm.layers and {i.block for i in lm.layers} == {0, 1}
        assert all(i.kind not in ("lm_head", "embed", "other") for i in lm.layers), arch
        assert lm.vocab_size == 256
        with torch.inference_mode():
            logits = lm.model(input_ids=torch.arange(8)[None], use_cache=False).logits
        assert logits.shape == (1, 8, 256) and torch.isfinite(logits).all()
        assert load_model(f"tiny-{arch}").fingerprint == lm.fingerprint  # seeded: same weights
        fingerprints.add(lm.fingerprint)
    assert len(fingerprints) == len(TINY_ARCHITECTURES)


def test_folder_spec_round_trip(tmp_path: Path) -> None:
    tiny = load_model("tiny-gpt2")  # Conv1D layers, stored transposed
    folder = tmp_path / "my-gpt2"
    tiny.model.save_pretrained(folder)
    lm = load_model(folder)
    assert lm.name == "my-gpt2" and lm.tokenizer is None
    assert lm.layers == tiny.layers and any(i.transposed for i in lm.layers)
    ids = torch.arange(16)[None]
    with torch.inference_mode():
        assert torch.equal(lm.model(input_ids=ids).logits, tiny.model(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear QenvError each
# ---------------------------------------------------------------------------------------------

def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(QenvError) as err:
        load_model(tmp_path / "no-such-model")
    clear_error(err, "not found", "no-such-model")
    with pytest.raises(QenvError) as err:
        load_model(str(tmp_path / "missing" / "model.bin"))
    clear_error(err, "not found")


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(QenvError) as err:
        load_model(tmp_path)
    clear_error(err, "config.json", str(tmp_path))
    with pytest.raises(QenvError) as err:
        load_model(tmp_path / "notes.txt")  # a file that is neither a folder nor a .bin
    clear_error(err, "neither", "notes.txt")


def test_unknown_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bogus-arch"}))
    with pytest.raises(QenvError) as err:
        load_model(tmp_path)
    clear_error(err, "bogus-arch", "causal LM")


def test_unknown_tiny_architecture_dtype_and_device() -> None:
    with pytest.raises(QenvError) as err:
        load_model("tiny-bogus")
    clear_error(err, "bogus", "llama")
    with pytest.raises(QenvError) as err:
        load_model("tiny-llama", dtype="int8")
    clear_error(err, "dtype", "int8")
    with pytest.raises(QenvError) as err:
        load_model("tiny-llama", device="warp-drive")
    clear_error(err, "device", "warp-drive")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU, so 'cuda' is valid here")
def test_cuda_on_a_cpu_machine() -> None:
    with pytest.raises(QenvError) as err:
        load_model("tiny-llama", device="cuda")
    clear_error(err, "cuda", "no CUDA GPU")


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([nn.Conv1d(8, 8, 3) for _ in range(2)])
        self.norm = nn.LayerNorm(8)


def test_model_without_linear_layers() -> None:
    for module in (_ConvNet(), nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))):
        with pytest.raises(QenvError) as err:
            discover_layers(module)
        clear_error(err, "no quantizable linear layers", type(module).__name__)


def test_text_file_too_short_or_empty(stories: LoadedModel, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time, there was a little girl named Lily.")
    with pytest.raises(QenvError) as err:
        tokens_from_text(stories.tokenizer, short, n_tokens=512, seq_len=64)
    clear_error(err, "short.txt", "only 15 tokens", "512")
    for content in ("", "  \n\n \t\n"):
        empty = tmp_path / "empty.txt"
        empty.write_text(content)
        with pytest.raises(QenvError) as err:
            tokens_from_text(stories.tokenizer, empty, n_tokens=512, seq_len=64)
        clear_error(err, "empty.txt", "empty")


def test_unknown_preset(stories: LoadedModel) -> None:
    for name in ("bogus", "q5_k_x", "rtn-4", "gptq-w4-g100x"):
        with pytest.raises(QenvError) as err:
            preset(name, stories.layers)
        clear_error(err, "unknown preset", name, "rtn-w4")
    with pytest.raises(QenvError) as err:
        preset("rtn-w7", stories.layers)  # a well-formed name with an unsupported bit width
    clear_error(err, "bits=7")
    with pytest.raises(QenvError) as err:
        llamacpp_mix(stories.layers, "Q7_K_M")
    clear_error(err, "Q7_K_M", "Q4_K_M")


@pytest.mark.parametrize("seed", range(12))
def test_a_freshly_initialised_encoder_is_refused_whatever_its_init(seed: int) -> None:
    """A random BERT moves its earlier logits by only ~1e-3 of their scale; the probe's bar is float noise."""
    import transformers
    from transformers import AutoModelForCausalLM, BertConfig

    from qenv.models.loading import check_causal

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    bert = AutoModelForCausalLM.from_config(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=32)).eval()
    with pytest.raises(QenvError, match="is not a causal language model"):
        check_causal(bert, "bert")


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_causal_models_pass_the_probe(arch: str) -> None:
    from qenv.models.loading import check_causal

    check_causal(load_model(f"tiny-{arch}").model, arch)


def test_a_gguf_is_parsed_once_and_loads_as_when_parsed_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 26: loading SmolLM2's GGUF parsed its metadata five times (qenv's checks, transformers'
    config, weights and tokenizer), most of a 2-minute load. ``one_reader`` parses it once, and the
    model is bit for bit the one every reader of its own gave; the patch is gone afterwards."""
    import gguf

    from qenv.models.gguf import load_gguf

    src = STORIES_BIN.with_suffix(".gguf")
    if not src.is_file():
        pytest.skip(f"stories260K.gguf missing at {src}")
    made: list[str] = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            made.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    names = gguf.get_tensor_name_map
    loaded = load_model(src)
    assert len(made) == 1
    assert gguf.GGUFReader is CountingReader and gguf.get_tensor_name_map is names
    made.clear()
    model, _ = load_gguf(src)  # without one_reader: each reader parses the file again
    assert len(made) >= 3
    expected = model.state_dict()
    got = loaded.model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], expected[key]) for key in expected)
