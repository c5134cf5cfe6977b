"""Tests for qenv.models.llama2c against the real stories260K checkpoint in shared/data.

The reference numbers (header, greedy ids, NLL) come from shared/data/README.md. A small
independent llama2.c-convention forward pass is used to check the conversion logit by logit,
which is what catches a wrong q/k permutation or a misplaced tensor.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qenv.errors import QenvError
from qenv.models import llama2c
from qenv.models.llama2c import Llama2cHeader, load_llama2c, read_llama2c_header

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORIES = DATA / "stories260K"
BIN = STORIES / "stories260K.bin"
TOK = STORIES / "tok512.model"
VALID = DATA / "tinystories" / "TinyStories-valid-first1000.txt"

pytestmark = pytest.mark.skipif(
    not (BIN.is_file() and TOK.is_file()),
    reason=f"stories260K data not found at {STORIES} (shared/data is not checked out beside the repo)",
)

README_FIRST_IDS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338]
README_TEXT_START = "Once upon a time, there was a little girl named Lily."


@pytest.fixture(scope="module")
def loaded():
    return load_llama2c(BIN)


@pytest.fixture(scope="module")
def sp():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(TOK))


# ---------------------------------------------------------------- independent llama2.c reference

_ORDER = ["emb", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final", "fc_re", "fc_im"]


def _shapes(dim, hid, n, nh, nkv, vocab, seq):
    hs, kv = dim // nh, dim // nh * nkv
    return dict(emb=(vocab, dim), rms_att=(n, dim), wq=(n, dim, dim), wk=(n, kv, dim), wv=(n, kv, dim),
                wo=(n, dim, dim), rms_ffn=(n, dim), w1=(n, hid, dim), w2=(n, dim, hid), w3=(n, hid, dim),
                rms_final=(dim,), fc_re=(seq, hs // 2), fc_im=(seq, hs // 2), wcls=(vocab, dim))


def _ref_read(path: Path) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
    raw = path.read_bytes()
    hdr = struct.unpack("<7i", raw[:28])
    flat = np.frombuffer(raw[28:], dtype="<f4")
    shapes = _shapes(*hdr[:5], abs(hdr[5]), hdr[6])
    w, pos = {}, 0
    for name in _ORDER + ([] if hdr[5] > 0 else ["wcls"]):
        n = int(np.prod(shapes[name]))
        w[name] = flat[pos:pos + n].reshape(shapes[name]).astype(np.float64)
        pos += n
    assert pos == flat.size
    w.setdefault("wcls", w["emb"])
    return hdr, w


def _ref_logits(hdr, w, tokens: list[int]) -> np.ndarray:
    """llama2.c run.c semantics: RoPE on adjacent pairs (2i, 2i+1), GQA, SwiGLU, RMSNorm eps 1e-5."""
    dim, _, n_layers, nh, nkv = hdr[:5]
    hs, t = dim // nh, len(tokens)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g

    pos = np.arange(t)[:, None]
    ang = pos * 10000.0 ** (-np.arange(0, hs, 2) / hs)[None, :]  # [t, hs/2]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):  # x: [t, heads, hs]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos[:, None] - b * sin[:, None]
        out[..., 1::2] = a * sin[:, None] + b * cos[:, None]
        return out

    x = w["emb"][tokens]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(n_layers):
        xb = rms(x, w["rms_att"][i])
        q = rope((xb @ w["wq"][i].T).reshape(t, nh, hs))
        k = rope((xb @ w["wk"][i].T).reshape(t, nkv, hs))
        v = (xb @ w["wv"][i].T).reshape(t, nkv, hs)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hs) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", att, v).reshape(t, dim) @ w["wo"][i].T
        xb = rms(x, w["rms_ffn"][i])
        g = xb @ w["w1"][i].T
        x = x + ((g / (1 + np.exp(-g))) * (xb @ w["w3"][i].T)) @ w["w2"][i].T
    return rms(x, w["rms_final"]) @ w["wcls"].T


def _write_ckpt(path: Path, dim=16, hid=40, n=2, nh=4, nkv=2, vocab=512, seq=32, shared=True, seed=0) -> None:
    rng = np.random.default_rng(seed)
    shapes = _shapes(dim, hid, n, nh, nkv, vocab, seq)
    names = _ORDER + ([] if shared else ["wcls"])
    with path.open("wb") as f:
        f.write(struct.pack("<7i", dim, hid, n, nh, nkv, vocab if shared else -vocab, seq))
        for name in names:
            arr = rng.normal(0, 0.3, shapes[name]).astype("<f4")
            if name.startswith("rms"):
                arr += 1.0
            f.write(arr.tobytes())


# ---------------------------------------------------------------- the real checkpoint


def test_header_matches_readme() -> None:
    h = read_llama2c_header(BIN)
    assert h == Llama2cHeader(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512,
                              seq_len=512, shared_classifier=True)
    assert h.file_bytes == BIN.stat().st_size == 1_056_540


def test_model_config_and_tied_classifier(loaded) -> None:
    model, _ = loaded
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.vocab_size) == (64, 172, 5, 8, 4, 8, 512)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 260_032
    assert not model.training


def test_logits_match_llama2c_reference(loaded, sp) -> None:
    model, _ = loaded
    hdr, w = _ref_read(BIN)
    ids = [1] + sp.encode("Once upon a time, there was a dog named Max. He liked to run.")
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double().numpy()
    assert np.abs(got - _ref_logits(hdr, w, ids)).max() < 1e-3


def test_greedy_generation_matches_readme(loaded) -> None:
    model, tok = loaded
    out = model.generate(torch.tensor([[1]]), max_new_tokens=len(README_FIRST_IDS) - 1 + 8, do_sample=False)
    ids = out[0].tolist()
    assert ids[: len(README_FIRST_IDS)] == README_FIRST_IDS
    assert tok.decode(ids, skip_special_tokens=True).startswith(README_TEXT_START)
    assert model.generation_config.eos_token_id == 1  # stories end at BOS, as in run.c


def _mean_nll(model, sp, n_stories: int) -> float:
    stories = [s for s in VALID.read_text(encoding="utf-8").split("\n<|endoftext|>\n") if s.strip()]
    total, count = 0.0, 0
    with torch.no_grad():
        for story in stories[:n_stories]:
            x = torch.tensor([([1] + sp.encode(story.strip()))[:512]])
            logp = torch.log_softmax(model(x).logits[0, :-1].float(), dim=-1)
            total -= logp.gather(1, x[0, 1:, None]).sum().item()
            count += x.shape[1] - 1
    return total / count


@pytest.mark.skipif(not VALID.is_file(), reason=f"TinyStories validation text not found at {VALID}")
def test_tinystories_nll(loaded, sp, monkeypatch) -> None:
    model, _ = loaded
    # Over all 1000 stories this is the README's 1.5133 (checked once: 1.51334 on 369,989 tokens); the first
    # 50 stories are easier and give 1.2882, so pin that value and keep a loose band around the README number.
    nll = _mean_nll(model, sp, 50)
    assert 1.1 < nll < 1.75
    assert nll == pytest.approx(1.2882, abs=0.005)

    # Without the q/k permutation the same weights score far worse: the permutation is what makes it right.
    monkeypatch.setattr(llama2c, "_permute_rope", lambda w, n_heads: w)
    unpermuted, _ = load_llama2c(BIN)
    assert _mean_nll(unpermuted, sp, 5) > nll + 1.0


def test_tokenizer_matches_sentencepiece(loaded, sp) -> None:
    _, tok = loaded
    texts = [
        "Once upon a time, there was a little girl named Lily.",
        "  Lily's mom said,  \"Let's go!\"\n\nThey had 123 apples. ",
        "\nhéllo wörld ✓\t tab\n",
        "",
    ]
    if VALID.is_file():
        texts += VALID.read_text(encoding="utf-8").split("\n<|endoftext|>\n")[:20]
    for text in texts:
        assert tok(text)["input_ids"] == [1] + sp.encode(text.strip()), repr(text)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, len(tok)) == (1, 2, 0, 512)
    ids = tok(texts[0])["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids) == texts[0]


def test_tokenizer_save_reload_round_trip(loaded, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    _, tok = loaded
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["  Lily's  mom. ", "x", "Once upon a time\n"]:
        assert again(text)["input_ids"] == tok(text)["input_ids"], repr(text)


# ---------------------------------------------------------------- synthetic checkpoints


def test_untied_classifier_follows_freq_cis(tmp_path: Path) -> None:
    ckpt = tmp_path / "untied.bin"
    _write_ckpt(ckpt, shared=False)
    h = read_llama2c_header(ckpt)
    assert (h.vocab_size, h.shared_classifier, h.file_bytes) == (512, False, ckpt.stat().st_size)
    model, _ = load_llama2c(ckpt, tokenizer_path=TOK)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    hdr, w = _ref_read(ckpt)
    assert torch.equal(model.lm_head.weight, torch.from_numpy(w["wcls"]).float())
    ids = [1, 5, 300, 42, 7, 511, 260, 9]
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double().numpy()
    assert np.abs(got - _ref_logits(hdr, w, ids)).max() < 1e-3


def test_dtype(tmp_path: Path) -> None:
    ckpt = tmp_path / "tiny.bin"
    _write_ckpt(ckpt)
    model, _ = load_llama2c(ckpt, tokenizer_path=STORIES, dtype=torch.bfloat16)  # a dir: discovered inside
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------- errors


def _raises(match: str, *args, **kwargs) -> QenvError:
    with pytest.raises(QenvError, match=match) as info:
        load_llama2c(*args, **kwargs)
    assert info.value.fix
    return info.value


def test_missing_file(tmp_path: Path) -> None:
    _raises("not found", tmp_path / "nope.bin")


def test_truncated_file(tmp_path: Path) -> None:
    cut = tmp_path / "cut.bin"
    cut.write_bytes(BIN.read_bytes()[:500_000])
    err = _raises("truncated", cut)
    assert "1056540" in str(err) and "500000" in str(err)
    (tmp_path / "tiny.bin").write_bytes(b"\x40\x00\x00\x00")
    _raises("truncated.*header", tmp_path / "tiny.bin")


def test_extra_trailing_bytes(tmp_path: Path) -> None:
    long = tmp_path / "long.bin"
    long.write_bytes(BIN.read_bytes() + b"\0" * 8)
    _raises("8 extra trailing bytes", long)


def test_bad_header(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    _raises("bad header", junk)
    zero = tmp_path / "zero.bin"
    zero.write_bytes(struct.pack("<7i", 64, 172, 0, 8, 4, 512, 512))
    _raises("bad header.*non-positive", zero)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(struct.pack("<7i", 64, 172, 5, 8, 3, 512, 512))
    _raises("bad header", odd)
    versioned = tmp_path / "v1.bin"
    versioned.write_bytes(struct.pack("<7i", 0x616B3432, 1, 64, 172, 5, 8, 4) + b"\0" * 256)
    _raises("legacy v0", versioned)


def test_missing_tokenizer(tmp_path: Path) -> None:
    shutil.copyfile(BIN, tmp_path / "stories260K.bin")
    err = _raises("tokenizer not found", tmp_path / "stories260K.bin")
    assert str(tmp_path) in str(err) and "tokenizer_path" in err.fix
    _raises("tokenizer not found", tmp_path / "stories260K.bin", tokenizer_path=tmp_path / "nope.model")
    shutil.copyfile(TOK, tmp_path / "tok512.model")  # discovered by the tok{vocab}.model name
    model, tok = load_llama2c(tmp_path / "stories260K.bin")
    assert len(tok) == 512


def test_vocab_mismatch(tmp_path: Path) -> None:
    ckpt = tmp_path / "v300.bin"
    _write_ckpt(ckpt, vocab=300)
    _raises("vocab size mismatch.*512.*300", ckpt, tokenizer_path=TOK)
