"""Load Karpathy's llama2.c checkpoints (legacy "v0" ``.bin``) as a transformers ``LlamaForCausalLM``.

llama2.c's tiny TinyStories models (e.g. ``stories260K``) are real, fully trained Llamas small enough
to quantize and evaluate on a CPU in seconds, so qenv uses them as its fast end-to-end test model.
Converting them to ``LlamaForCausalLM`` lets every other part of qenv treat them like any HF model.

File format (llama2.c ``export.py`` ``legacy_export``): 7 little-endian int32 header values
``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len`` (a negative ``vocab_size``
means the classifier is not shared with the embedding), then float32 tensors in this order:
token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3 (each stacked over layers), rms_final,
freq_cis_real, freq_cis_imag, and finally wcls when the classifier is not shared. Matrices are
``[out, in]`` like ``nn.Linear.weight``. See ``shared/data/README.md`` (stories260K) for the recipe.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from qenv.errors import QenvError

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = ["HEADER_BYTES", "Llama2cHeader", "load_llama2c", "read_llama2c_header"]

#: Size of the legacy header: 7 int32 values.
HEADER_BYTES = 7 * 4
#: Magic number that starts llama2.c's newer "version 1/2" exports (b"ak42" read as little-endian uint32).
_VERSIONED_MAGIC = 0x616B3432
#: Upper bounds that no real llama2.c checkpoint exceeds; larger values mean the file is not one.
_MAX_DIM = 1 << 16
_MAX_HIDDEN = 1 << 18
_MAX_LAYERS = 1024
_MAX_HEADS = 1024
_MAX_VOCAB = 1 << 21
_MAX_SEQ = 1 << 20


@dataclass(frozen=True)
class Llama2cHeader:
    """The llama2.c checkpoint header, with the sign of ``vocab_size`` decoded into ``shared_classifier``."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # always positive here; the file stores it negated when the classifier is untied
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    @property
    def n_floats(self) -> int:
        """Number of float32 values after the header (weights, freq_cis, and wcls if untied)."""
        d, h, n, v, kv = self.dim, self.hidden_dim, self.n_layers, self.vocab_size, self.kv_dim
        per_layer = d + d * d + 2 * kv * d + d * d + d + 3 * h * d  # rms_att, wq, wk, wv, wo, rms_ffn, w1-3
        total = v * d + n * per_layer + d + self.seq_len * self.head_dim  # + rms_final + freq_cis (re+im)
        return total if self.shared_classifier else total + v * d

    @property
    def file_bytes(self) -> int:
        """Exact size a v0 checkpoint with this header must have."""
        return HEADER_BYTES + 4 * self.n_floats


def _bad_header(path: Path, what: str) -> QenvError:
    return QenvError(
        f"{path} does not look like a llama2.c checkpoint: bad header ({what}).",
        "pass a llama2.c legacy (v0) .bin written by llama2.c's export.py / model.export, e.g. stories260K.bin.",
    )


def read_llama2c_header(path: Path) -> Llama2cHeader:
    """Read and sanity-check the 28-byte header, so that a wrong or corrupt file fails before any allocation."""
    path = Path(path)
    if not path.is_file():
        raise QenvError(
            f"llama2.c checkpoint not found: {path}" + (" (it is a directory)." if path.is_dir() else "."),
            "check the path to the .bin file (e.g. shared/data/stories260K/stories260K.bin).",
        )
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise QenvError(
            f"{path} is truncated: it has {size} bytes, shorter than the {HEADER_BYTES}-byte llama2.c header.",
            "re-download or re-export the checkpoint.",
        )
    with path.open("rb") as f:
        raw = struct.unpack("<7i", f.read(HEADER_BYTES))
    if raw[0] == _VERSIONED_MAGIC:
        raise QenvError(
            f"{path} is a versioned llama2.c export (magic 'ak42'); only the legacy v0 format is supported.",
            "export it with llama2.c's `export.py --version 0`, or use the original legacy .bin.",
        )
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = raw
    fields = dict(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                  seq_len=seq_len)
    shown = ", ".join(f"{k}={v}" for k, v in {**fields, "vocab_size": vocab_size}.items())
    if any(v <= 0 for v in fields.values()) or vocab_size == 0:
        raise _bad_header(path, f"non-positive size in {shown}")
    limits = dict(dim=_MAX_DIM, hidden_dim=_MAX_HIDDEN, n_layers=_MAX_LAYERS, n_heads=_MAX_HEADS,
                  n_kv_heads=_MAX_HEADS, seq_len=_MAX_SEQ)
    too_big = [k for k, lim in limits.items() if fields[k] > lim]
    if abs(vocab_size) > _MAX_VOCAB:
        too_big.append("vocab_size")
    if too_big:
        raise _bad_header(path, f"absurdly large {', '.join(too_big)} in {shown}")
    if dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise _bad_header(
            path, f"dim must split into an even head size and n_heads must be a multiple of n_kv_heads; got {shown}"
        )
    return Llama2cHeader(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         vocab_size=abs(vocab_size), seq_len=seq_len, shared_classifier=vocab_size > 0)


def _check_size(path: Path, header: Llama2cHeader) -> None:
    """The format has no checksum, so an exact size match is the only guard against truncation or misparsing."""
    actual, expected = path.stat().st_size, header.file_bytes
    if actual < expected:
        raise QenvError(
            f"{path} is truncated: the header implies {expected} bytes but the file has {actual} "
            f"({expected - actual} missing).",
            "re-download or re-export the checkpoint; the copy is incomplete.",
        )
    if actual > expected:
        raise QenvError(
            f"{path} has {actual - expected} extra trailing bytes: the header implies {expected} "
            f"bytes but the file has {actual}.",
            "make sure this is a legacy (v0) llama2.c export and that nothing was appended to it; "
            "a negative vocab_size in the header is needed when the file carries a separate classifier.",
        )


def _permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k output rows from llama2.c's adjacent-pair RoPE to HF's half-split ``rotate_half`` layout."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _read_state_dict(path: Path, h: Llama2cHeader) -> dict[str, torch.Tensor]:
    """Map the flat float32 body onto HF Llama parameter names (freq_cis is skipped; HF recomputes RoPE)."""
    body = np.memmap(path, dtype="<f4", mode="r", offset=HEADER_BYTES, shape=(h.n_floats,))
    pos = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal pos
        n = int(np.prod(shape))
        t = torch.from_numpy(np.array(body[pos:pos + n], dtype=np.float32)).view(*shape)
        pos += n
        return t

    d, hid, n, kv = h.dim, h.hidden_dim, h.n_layers, h.kv_dim
    emb = take(h.vocab_size, d)
    rms_att, wq, wk, wv, wo = take(n, d), take(n, d, d), take(n, kv, d), take(n, kv, d), take(n, d, d)
    rms_ffn, w1, w2, w3 = take(n, d), take(n, hid, d), take(n, d, hid), take(n, hid, d)
    rms_final = take(d)
    pos += h.seq_len * h.head_dim  # freq_cis_real + freq_cis_imag, each [seq_len, head_dim // 2]
    wcls = emb if h.shared_classifier else take(h.vocab_size, d)
    assert pos == h.n_floats, (pos, h.n_floats)
    del body

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": emb, "model.norm.weight": rms_final,
                                   "lm_head.weight": wcls}
    for i in range(n):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = rms_att[i]
        sd[p + "self_attn.q_proj.weight"] = _permute_rope(wq[i], h.n_heads)
        sd[p + "self_attn.k_proj.weight"] = _permute_rope(wk[i], h.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = wv[i]
        sd[p + "self_attn.o_proj.weight"] = wo[i]
        sd[p + "post_attention_layernorm.weight"] = rms_ffn[i]
        sd[p + "mlp.gate_proj.weight"] = w1[i]
        sd[p + "mlp.down_proj.weight"] = w2[i]
        sd[p + "mlp.up_proj.weight"] = w3[i]
    return sd


def _find_tokenizer(bin_path: Path, tokenizer_path: str | Path | None, vocab_size: int) -> Path:
    """llama2.c ships tokenizers beside the checkpoint under a few names; find the sentencepiece one."""
    if tokenizer_path is not None:
        tp = Path(tokenizer_path)
        if tp.is_file():
            return tp
        if not tp.is_dir():
            raise QenvError(f"tokenizer not found: {tp}.", "pass the path of the sentencepiece .model file.")
        folder = tp
    else:
        folder = bin_path.parent
    names = ["tokenizer.model", f"tok{vocab_size}.model"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    models = sorted(p for p in folder.glob("*.model") if p.is_file())
    if len(models) == 1:
        return models[0]
    if models:
        raise QenvError(
            f"several tokenizers in {folder} ({', '.join(p.name for p in models)}) and none is named "
            f"{' or '.join(names)}, so which one belongs to the checkpoint is ambiguous.",
            "pass tokenizer_path=... with the right sentencepiece .model file.",
        )
    raise QenvError(
        f"tokenizer not found: looked in {folder} for {', '.join(names)} or a single *.model file.",
        "pass tokenizer_path=... pointing to the checkpoint's sentencepiece .model file "
        "(llama2.c's tokenizer .bin format is not supported).",
    )


def _load_tokenizer(model_file: Path, vocab_size: int, seq_len: int) -> PreTrainedTokenizerFast:
    """Build a transformers fast tokenizer whose ids equal llama2.c's ``[BOS] + sp.encode(text.strip())``.

    The sentencepiece file is converted by ``LlamaTokenizer.from_pretrained`` from a temp dir where it is
    named ``tokenizer.model`` (``LlamaTokenizer(vocab_file=...)`` returns empty encodings in transformers
    5.24). The result is re-wrapped as a plain ``PreTrainedTokenizerFast`` because ``LlamaTokenizer``
    rebuilds its normalizer on reload, which would silently undo the whitespace fix below after a
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round trip.
    """
    import sentencepiece as spm
    import transformers
    from tokenizers import Regex, normalizers

    if model_file.suffix == ".bin":
        raise QenvError(
            f"{model_file} is a llama2.c tokenizer .bin, which cannot be loaded as a transformers tokenizer.",
            "pass the sentencepiece .model file it was made from (e.g. tok512.model).",
        )
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as e:
        raise QenvError(f"{model_file} is not a valid sentencepiece model ({e}).",
                        "pass the sentencepiece .model file of this checkpoint.") from e
    if sp.get_piece_size() != vocab_size:
        raise QenvError(
            f"vocab size mismatch: tokenizer {model_file} has {sp.get_piece_size()} tokens but the checkpoint "
            f"has vocab_size={vocab_size}.",
            "pass the tokenizer this checkpoint was trained with (e.g. tok512.model for vocab 512).",
        )
    with tempfile.TemporaryDirectory(prefix="qenv_llama2c_tok_") as tmp:
        shutil.copyfile(model_file, os.path.join(tmp, "tokenizer.model"))
        # add_bos_token defaults to False on this path; llama2.c always starts with BOS and never appends EOS.
        llama_tok = transformers.LlamaTokenizer.from_pretrained(
            tmp, add_bos_token=True, add_eos_token=False, legacy=False
        )
    backend = llama_tok.backend_tokenizer
    # sentencepiece's remove_extra_whitespaces (strip + collapse runs of spaces) is not carried over by the
    # conversion, and llama2.c strips the text too; without this "a  b" or a trailing newline encode differently.
    # The "\u2581" prefix moves from the Metaspace pre-tokenizer into the normalizer because Metaspace's
    # prepend_scheme="first" looks at original offsets and so drops the prefix once Strip removed leading spaces.
    backend.normalizer = normalizers.Sequence([
        normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " "),
        normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581"),
    ])
    backend.pre_tokenizer = None
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=llama_tok.bos_token, eos_token=llama_tok.eos_token,
        unk_token=llama_tok.unk_token, add_bos_token=True, add_eos_token=False, model_max_length=seq_len,
        padding_side=llama_tok.padding_side, clean_up_tokenization_spaces=False,
    )
    if len(tok) != vocab_size or (tok.bos_token_id, tok.eos_token_id) != (sp.bos_id(), sp.eos_id()):
        raise QenvError(
            f"tokenizer {model_file} converted to {len(tok)} tokens with BOS/EOS ids {tok.bos_token_id}/"
            f"{tok.eos_token_id}, but the checkpoint has vocab_size={vocab_size} and sentencepiece says "
            f"{sp.bos_id()}/{sp.eos_id()} (vocab size mismatch or an unusual sentencepiece model).",
            "pass the sentencepiece tokenizer this checkpoint was trained with.",
        )
    tok.name_or_path = str(model_file)
    return tok


def load_llama2c(
    path: str | Path,
    tokenizer_path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load a llama2.c v0 checkpoint as ``(LlamaForCausalLM, PreTrainedTokenizerFast)`` in eval mode.

    The tokenizer is ``tokenizer_path`` or, if None, ``tokenizer.model`` / ``tok{vocab}.model`` / the only
    ``*.model`` beside the checkpoint. The generation config stops on BOS (id 1), as llama2.c's run.c does,
    because the models were trained with BOS between stories and never saw EOS.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise QenvError(f"dtype must be a floating torch.dtype, got {dtype!r}.", "use e.g. torch.float32.")
    header = read_llama2c_header(path)
    _check_size(path, header)
    tokenizer = _load_tokenizer(
        _find_tokenizer(path, tokenizer_path, header.vocab_size), header.vocab_size, header.seq_len
    )

    config = LlamaConfig(
        vocab_size=header.vocab_size, hidden_size=header.dim, intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers, num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads, head_dim=header.head_dim,
        max_position_embeddings=header.seq_len, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
        tie_word_embeddings=header.shared_classifier, attention_bias=False, mlp_bias=False,
        bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config)  # random init is cheap at llama2.c sizes and is overwritten below
    model.load_state_dict(_read_state_dict(path, header), strict=True)
    if header.shared_classifier:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    model = model.to(dtype).eval()
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    return model, tokenizer
