#!/usr/bin/env python3
"""Train the larger benchmark models of ``bench/bench_quality.py``: Llama-, GPT-2- and Qwen2-style
causal LMs of 10-50M parameters on WikiText-2, on a GPU.

The models are *not* shipped with qenv (too big); the quality benchmark trains them in the same GPU
run that measures them. The recipe is the embedded default model's
(``scripts/train_default_model.py``, whose helpers this script imports): the same byte-level BPE
tokenizer (reused from ``qenv/models/builtin/wikitext-llama/tokenizer.json``, vocab 2048), the same
corpus encoding (each line keeps its newline), random windows ``[<s>] + tokens[i : i + seq_len - 1]``,
AdamW with warmup + cosine decay, bf16 autocast on CUDA, the weights of the best ``valid.txt``
perplexity kept, and the test perplexity measured on the saved float16 weights in float32 with
every test token scored once.

Each architecture is written with ``save_pretrained`` (float16 safetensors) plus the tokenizer to
``<out-dir>/bench-<arch>/`` through a temporary folder renamed into place, so the folder's existence means
the model is complete (the benchmark waits for it). ``train_stats.json`` beside the weights records
the run. Architectures (``--arch``, default all three; run several processes to train them at once):

- ``llama``: LlamaForCausalLM, hidden 512, 8 blocks, 8 heads / 4 KV heads, SwiGLU MLP 1408, tied
  embeddings (~25M parameters, 7 linears per block);
- ``gpt2``: GPT2LMHeadModel, hidden 512, 8 blocks, 8 heads, GELU MLP 2048, LayerNorm, learned
  positions, fused qkv Conv1D (~26M parameters, 4 linears per block);
- ``qwen2``: Qwen2ForCausalLM, hidden 384, 8 blocks, 6 heads / 2 KV heads, SwiGLU MLP 1536, qkv bias
  (~18M parameters, 7 linears per block).
- ``gpt2-small`` (not in the default set): the GPT-2 layout at hidden 128, 4 blocks, 4 heads, GELU MLP
  512, no dropout (~1.1M parameters), small enough to train on a CPU: a trained GPT-2-layout model for
  CPU experiments (the zero-shot transfer table in BENCHMARKS.md).

The zoo (``--zoo``, issue 25): small trained models of every layout the layer walker knows, for
transfer policies. ``ZOO`` is what a policy trains on: GPT-2 (Conv1D, fused qkv), Llama (GQA),
Qwen2 (GQA, qkv bias), Mistral (sliding window, untied head), Phi-3 (fused qkv and gate_up),
GPT-NeoX (fused qkv with bias, parallel residual), OPT (q/k/v with bias, ReLU) and Falcon (fused GQA
qkv, parallel attention), ~1-1.4M parameters each (hidden 128, 4 blocks), each with its own seed
and one of three corpora (WikiText-2; TinyShakespeare and TinyStories split 90/5/5 by lines).
``HELD_OUT`` is what a transfer policy is *measured* on and never trained on: Gemma (a layout the zoo
lacks), a wider GPT-2 and a deeper Qwen2 (other shapes, seeds and corpora than their zoo kin); with
SmolLM2-135M (packaged) these are four trained models of four layouts. Defaults are CPU-reasonable
(300 steps of 16 x 128 tokens: a few minutes per model on one free core; ``--steps`` for more, e.g.
on a GPU). Models go to ``<qenv cache>/zoo/<name>/`` (or ``--out-dir``), a folder trained with the
same settings is reused, and :func:`build_zoo` is the same builder for programs
(``scripts/train_transfer_policy.py``)::

    python3 scripts/train_bench_models.py --zoo                 # ZOO and HELD_OUT, CPU defaults
    python3 scripts/train_bench_models.py --zoo zoo --steps 2000 --device cuda

Example (what the benchmark's GPU run used; see BENCHMARKS.md)::

    python3 scripts/train_bench_models.py --arch llama --data-dir .device/qdata/wikitext-2 \\
        --out-dir /tmp/bench_models --steps 1200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import train_default_model as tdm  # noqa: E402  (the embedded model's helpers: one copy)

DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "wikitext-2"
DEFAULT_TOKENIZER_DIR = REPO_ROOT / "qenv" / "models" / "builtin" / "wikitext-llama"
ARCHS = ("llama", "gpt2", "qwen2")
SMALL_ARCHS = ("gpt2-small",)  # trainable on a CPU: a GPT-2-layout test model for CPU experiments

# --------------------------------------------------------------------------------------------
# the zoo: small trained models of every layout, for policies that transfer (issue 25)

DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
#: corpus name (a folder of ``DATA_ROOT``) -> its one text file, split 90/5/5 by lines into
#: train/valid/test; ``wikitext-2`` has its own train/valid/test.txt
SINGLE_FILE_CORPORA = {"tinyshakespeare": "input.txt", "tinystories": "TinyStories-valid-first1000.txt"}
CORPORA = ("wikitext-2",) + tuple(SINGLE_FILE_CORPORA)
# CPU-reasonable defaults: ~0.5-1.5M parameters per model, a few minutes each on one free core.
ZOO_STEPS = 300
ZOO_BATCH = 16
ZOO_SEQ_LEN = 128
ZOO_MAX_POSITIONS = 128  # the environment's default seq_len; a longer one is refused by qenv's context check
ZOO_LR = 2e-3
ZOO_EVAL_TOKENS = 16384
_SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}  # the shared tokenizer's ids


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: a transformers layout, its size, the corpus and the seed it is trained with.

    ``config`` holds the config fields besides the shared ones (vocabulary, context length, special
    token ids), so the entry alone says which model comes out (with the step count and batch)."""

    name: str
    model_type: str  # transformers' config.model_type
    layout: str  # what the layer walker sees: why this model is in the zoo
    corpus: str  # one of CORPORA
    seed: int
    config: dict[str, Any] = field(hash=False)

    def build(self, vocab_size: int, max_positions: int):
        """The model, randomly initialised from ``seed`` (the caller seeds torch)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        positions = {"n_positions": max_positions} if self.model_type == "gpt2" else \
            {"max_position_embeddings": max_positions}
        if self.model_type == "phi3":
            positions["original_max_position_embeddings"] = max_positions
        cfg = AutoConfig.for_model(self.model_type, vocab_size=vocab_size, **positions, **_SPECIAL_IDS,
                                   **self.config)
        return AutoModelForCausalLM.from_config(cfg)


_LLAMA_LIKE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-5, initializer_range=0.02)
_NO_DROPOUT_GPT2 = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                        layer_norm_epsilon=1e-5, initializer_range=0.02, tie_word_embeddings=True)

#: The models a transfer policy is trained on: every layout family the layer walker knows, each on
#: its own corpus and seed. Never benchmark a transfer policy on these (see HELD_OUT).
ZOO: tuple[ZooModel, ...] = (
    ZooModel("zoo-gpt2", "gpt2", "Conv1D weights stored [in, out], fused qkv (c_attn), GELU c_fc/c_proj, "
             "LayerNorm, learned positions, tied head", "wikitext-2", 0,
             dict(n_embd=128, n_layer=4, n_head=4, n_inner=512, **_NO_DROPOUT_GPT2)),
    ZooModel("zoo-llama", "llama", "separate q/k/v/o, GQA 4/2, SwiGLU gate/up/down, RMSNorm, tied head",
             "wikitext-2", 1, dict(_LLAMA_LIKE, tie_word_embeddings=True)),
    ZooModel("zoo-qwen2", "qwen2", "separate q/k/v with bias, GQA 4/1, SwiGLU, tied head", "tinystories", 2,
             dict(_LLAMA_LIKE, num_key_value_heads=1, use_sliding_window=False, tie_word_embeddings=True)),
    ZooModel("zoo-mistral", "mistral", "separate q/k/v/o, GQA 4/2, SwiGLU, sliding window 64, untied head",
             "tinyshakespeare", 3, dict(_LLAMA_LIKE, sliding_window=64, tie_word_embeddings=False)),
    ZooModel("zoo-phi3", "phi3", "fused qkv_proj (registered after o_proj) and fused gate_up_proj, untied head",
             "wikitext-2", 4, dict(_LLAMA_LIKE, num_key_value_heads=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                   attention_dropout=0.0, tie_word_embeddings=False)),
    ZooModel("zoo-gpt-neox", "gpt_neox", "fused query_key_value with bias, parallel residual, GELU "
             "dense_h_to_4h/dense_4h_to_h, rotary on a quarter of each head, untied head", "tinystories", 5,
             dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                  rotary_pct=0.25, use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0,
                  tie_word_embeddings=False, initializer_range=0.02)),
    ZooModel("zoo-opt", "opt", "separate q/k/v with bias (registered k, v, q), ReLU fc1/fc2, learned "
             "positions, tied head", "tinyshakespeare", 6,
             dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, ffn_dim=512, word_embed_proj_dim=128,
                  dropout=0.0, attention_dropout=0.0, activation_function="relu", do_layer_norm_before=True,
                  init_std=0.02, tie_word_embeddings=True)),
    ZooModel("zoo-falcon", "falcon", "fused query_key_value with GQA 4/2, attention and MLP in parallel, "
             "GELU dense_h_to_4h/dense_4h_to_h, tied head", "wikitext-2", 7,
             dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, new_decoder_architecture=True,
                  num_kv_heads=2, multi_query=False, parallel_attn=True, ffn_hidden_size=512, alibi=False,
                  bias=False, hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=True)),
)

#: The trained models transfer is *measured* on, never trained on: a layout the zoo lacks (Gemma), and
#: the two layouts transfer failed on most (GPT-2, Qwen2: issue 25) at other widths, depths, seeds and
#: corpora than their zoo kin. SmolLM2-135M (``smollm2-135m``, packaged, not built here) is the fourth.
HELD_OUT: tuple[ZooModel, ...] = (
    ZooModel("heldout-gemma", "gemma", "a layout not in the zoo: GeGLU MLP, head_dim 40, MQA 4/1, embeddings "
             "scaled by sqrt(hidden), 5 blocks of 160", "tinyshakespeare", 101,
             dict(hidden_size=160, intermediate_size=480, num_hidden_layers=5, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=40, initializer_range=0.02, tie_word_embeddings=True)),
    ZooModel("heldout-gpt2-wide", "gpt2", "GPT-2 at 3 blocks of 192 (6 heads, GELU 768)", "tinystories", 102,
             dict(n_embd=192, n_layer=3, n_head=6, n_inner=768, **_NO_DROPOUT_GPT2)),
    ZooModel("heldout-qwen2-deep", "qwen2", "Qwen2 at 6 blocks of 96 (6/2 heads, SwiGLU 288)", "wikitext-2", 103,
             dict(_LLAMA_LIKE, hidden_size=96, intermediate_size=288, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=2, use_sliding_window=False, tie_word_embeddings=True)),
)
ZOO_BY_NAME: dict[str, ZooModel] = {m.name: m for m in ZOO + HELD_OUT}
#: group names ``build_zoo`` and ``--zoo-models`` accept besides single model names
ZOO_GROUPS: dict[str, tuple[str, ...]] = {"zoo": tuple(m.name for m in ZOO),
                                           "held-out": tuple(m.name for m in HELD_OUT)}


def default_zoo_dir() -> Path:
    """``<qenv cache>/zoo`` ($QENV_CACHE_DIR or ~/.cache/qenv): outside the repository, rebuilt on demand."""
    from qenv.eval.reference import default_cache_dir

    return default_cache_dir() / "zoo"


def zoo_names(names: Sequence[str] | None) -> list[str]:
    """Model names of ``names`` (single names or the groups ``zoo`` / ``held-out``), in order, once each."""
    picked: list[str] = []
    for name in names or ["zoo"]:
        for one in ZOO_GROUPS.get(name, (name,)):
            if one not in ZOO_BY_NAME:
                raise tdm.UserError(f"unknown zoo model {one!r}; use one of {sorted(ZOO_BY_NAME)} "
                                    f"or a group ({', '.join(ZOO_GROUPS)})")
            if one not in picked:
                picked.append(one)
    return picked


def _first_chars(lines: list[str], max_chars: int | None) -> list[str]:
    """The first whole lines of ``lines`` holding at most ``max_chars`` characters (all without a limit)."""
    if max_chars is None:
        return lines
    kept, total = [], 0
    for line in lines:
        total += len(line)
        if total > max_chars:
            break
        kept.append(line)
    return kept


def corpus_lines(corpus: str, data_root: Path, max_train_chars: int | None = None,
                 max_eval_chars: int | None = None) -> dict[str, list[str]]:
    """train/valid/test lines of ``corpus``: WikiText-2's own files, or a single file split 90/5/5 by
    lines; ``max_*_chars`` keep the first whole lines of a split (short runs need not encode it all)."""
    if corpus == "wikitext-2":
        return {split: tdm.read_lines(data_root / corpus / f"{split}.txt",
                                      max_train_chars if split == "train" else max_eval_chars)
                for split in ("train", "valid", "test")}
    if corpus not in SINGLE_FILE_CORPORA:
        raise tdm.UserError(f"unknown corpus {corpus!r}; use one of {CORPORA}")
    lines = tdm.read_lines(data_root / corpus / SINGLE_FILE_CORPORA[corpus])
    cut_valid, cut_test = int(0.90 * len(lines)), int(0.95 * len(lines))
    return {"train": _first_chars(lines[:cut_valid], max_train_chars),
            "valid": _first_chars(lines[cut_valid:cut_test], max_eval_chars),
            "test": _first_chars(lines[cut_test:], max_eval_chars)}


def _zoo_key(entry: ZooModel, settings: dict[str, Any], tokenizer_sha: str) -> dict[str, Any]:
    """Everything a zoo model's weights depend on: a cached model is reused only when this matches."""
    return {"name": entry.name, "model_type": entry.model_type, "config": entry.config, "corpus": entry.corpus,
            "seed": entry.seed, "tokenizer_sha256": tokenizer_sha, **settings}


def _cached_zoo_model(folder: Path, key: dict[str, Any]) -> bool:
    """Whether ``folder`` holds a complete zoo model trained with ``key`` (its train_stats.json is
    read as untrusted input: a missing, oversized or unreadable file means "train it again")."""
    stats = folder / "train_stats.json"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file() or not stats.is_file():
        return False
    if stats.stat().st_size > 1_000_000:
        return False
    try:
        recorded = json.loads(stats.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(recorded, dict) and recorded.get("zoo_key") == json.loads(json.dumps(key))


def build_zoo(names: Sequence[str] | None = None, out_dir: Path | None = None, steps: int = ZOO_STEPS, *,
              data_root: Path = DATA_ROOT, tokenizer_dir: Path = DEFAULT_TOKENIZER_DIR, device: str = "cpu",
              batch: int = ZOO_BATCH, seq_len: int = ZOO_SEQ_LEN, max_positions: int = ZOO_MAX_POSITIONS,
              lr: float = ZOO_LR, max_eval_tokens: int | None = ZOO_EVAL_TOKENS, max_train_chars: int | None = None,
              overwrite: bool = False) -> list[Path]:
    """Train (or reuse) the zoo models ``names`` (default: the ``zoo`` group) under ``out_dir``
    (default :func:`default_zoo_dir`) and return their folders, in order.

    Each folder is a transformers model (float16 safetensors, the shared tokenizer) that
    ``qenv.load_model`` reads, plus ``train_stats.json`` (parameters, training time, validation
    loss, the command's settings). A folder trained with the same settings is reused, so the policy
    script can call this every time; other settings (or ``overwrite``) train it again. Training is
    seeded per model: the same call gives the same weights on the same device and torch.
    Bad names, a missing corpus or impossible settings raise ``UserError``.
    """
    import torch
    from tokenizers import Tokenizer

    picked = zoo_names(names)
    if steps < 1 or batch < 1 or seq_len < 2:
        raise tdm.UserError(f"steps ({steps}) and batch ({batch}) must be at least 1 and seq_len ({seq_len}) at least 2")
    if seq_len > max_positions:
        raise tdm.UserError(f"seq_len {seq_len} is longer than the models' context ({max_positions} positions)")
    out_dir = Path(out_dir) if out_dir is not None else default_zoo_dir()
    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise tdm.UserError(f"tokenizer not found: {tokenizer_file}")
    tokenizer_sha = tdm.sha256_file(tokenizer_file)
    settings = {"steps": steps, "batch": batch, "seq_len": seq_len, "max_positions": max_positions, "lr": lr,
                "max_eval_tokens": max_eval_tokens, "max_train_chars": max_train_chars}
    todo = [name for name in picked if overwrite or not _cached_zoo_model(
        out_dir / name, _zoo_key(ZOO_BY_NAME[name], settings, tokenizer_sha))]
    if todo:
        tok = Tokenizer.from_file(str(tokenizer_file))
        dev = torch.device(device)
        encoded: dict[str, dict[str, list[int]]] = {}
        for corpus in dict.fromkeys(ZOO_BY_NAME[name].corpus for name in todo):  # every corpus read before writing
            # a token of the byte-level BPE is rarely over 16 characters: encode only what is scored
            max_eval_chars = 16 * max_eval_tokens if max_eval_tokens else None
            ids = {split: tdm.encode_lines(tok, lines)
                   for split, lines in corpus_lines(corpus, Path(data_root), max_train_chars, max_eval_chars).items()}
            if max_eval_tokens:
                ids["valid"], ids["test"] = ids["valid"][:max_eval_tokens], ids["test"][:max_eval_tokens]
            if len(ids["train"]) < seq_len or not ids["valid"] or not ids["test"]:
                raise tdm.UserError(f"corpus {corpus} holds too little text for seq_len {seq_len}")
            encoded[corpus] = ids
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in todo:
            entry = ZOO_BY_NAME[name]
            args = argparse.Namespace(out_dir=out_dir, seed=entry.seed, weight_decay=0.1, min_lr_ratio=0.1,
                                      grad_clip=1.0, eval_every=max(1, steps // 3), log_every=max(1, steps // 10),
                                      **{k: v for k, v in settings.items() if k not in ("max_eval_tokens", "max_train_chars")})
            command = (f"build_zoo([{name!r}], steps={steps}, batch={batch}, seq_len={seq_len}, lr={lr}, "
                       f"max_eval_tokens={max_eval_tokens}, max_train_chars={max_train_chars}, device={device!r})")
            train_one(name, args, tok, encoded[entry.corpus], dev, command, folder_name=name,
                      extra_stats={"zoo_key": _zoo_key(entry, settings, tokenizer_sha), "corpus": entry.corpus,
                                   "seed": entry.seed, "layout": entry.layout})
    return [out_dir / name for name in picked]



def _gpt2(vocab_size: int, max_positions: int, *, width: int, blocks: int, heads: int, mlp: int, dropout: float):
    """A GPT2LMHeadModel (random init) of the given size, with the bench models' common settings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_positions=max_positions, n_embd=width, n_layer=blocks, n_head=heads,
                     n_inner=mlp, activation_function="gelu_new", resid_pdrop=dropout, embd_pdrop=dropout,
                     attn_pdrop=dropout, layer_norm_epsilon=1e-5, initializer_range=0.02, tie_word_embeddings=True,
                     bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return GPT2LMHeadModel(cfg)


def build_model(arch: str, vocab_size: int, max_positions: int):
    """The model of ``arch`` (random init) and a one-line description."""
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                          max_position_embeddings=max_positions, rms_norm_eps=1e-5, hidden_act="silu",
                          tie_word_embeddings=True, attention_bias=False, mlp_bias=False, initializer_range=0.02,
                          bos_token_id=1, eos_token_id=2, pad_token_id=3)
        return LlamaForCausalLM(cfg), "Llama: hidden 512, 8 blocks, 8/4 heads, SwiGLU 1408, tied embeddings"
    if arch == "gpt2":
        return (_gpt2(vocab_size, max_positions, width=512, blocks=8, heads=8, mlp=2048, dropout=0.1),
                "GPT-2: hidden 512, 8 blocks, 8 heads, GELU 2048, LayerNorm, learned positions")
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=384, intermediate_size=1536, num_hidden_layers=8,
                          num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=max_positions,
                          rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True, initializer_range=0.02,
                          bos_token_id=1, eos_token_id=2, pad_token_id=3, use_sliding_window=False)
        return Qwen2ForCausalLM(cfg), "Qwen2: hidden 384, 8 blocks, 6/2 heads, SwiGLU 1536, qkv bias, tied embeddings"
    if arch in ZOO_BY_NAME:
        entry = ZOO_BY_NAME[arch]
        return entry.build(vocab_size, max_positions), f"{entry.model_type}: {entry.layout}"
    if arch == "gpt2-small":
        return (_gpt2(vocab_size, max_positions, width=128, blocks=4, heads=4, mlp=512, dropout=0.0),
                "GPT-2 (small): hidden 128, 4 blocks, 4 heads, GELU 512, LayerNorm, learned positions")
    raise tdm.UserError(f"unknown --arch {arch!r}; use one of {ARCHS + SMALL_ARCHS}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS + SMALL_ARCHS,
                   help="gpt2-small (0.8M parameters besides the embeddings) trains on a CPU in minutes")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="WikiText-2 train/valid/test.txt")
    p.add_argument("--data-root", type=Path, default=DATA_ROOT,
                   help="--zoo: the folder holding the corpora (wikitext-2/, tinystories/, tinyshakespeare/)")
    p.add_argument("--tokenizer-dir", type=Path, default=DEFAULT_TOKENIZER_DIR)
    p.add_argument("--zoo", nargs="*", metavar="NAME", default=None,
                   help="build the zoo instead (names or the groups 'zoo' and 'held-out'; bare --zoo: both groups) "
                        "under --out-dir (default: <qenv cache>/zoo), with the zoo's CPU defaults")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="models go to <out-dir>/bench-<arch>/ (required without --zoo)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--steps", type=int, default=None, help=f"default 1200, with --zoo {ZOO_STEPS}")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--log-every", type=int, default=200)
    p.add_argument("--max-train-chars", type=int, default=None, help="smoke tests: first N chars of train.txt")
    p.add_argument("--max-eval-tokens", type=int, default=None, help="smoke tests: first N valid/test tokens")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cuda" if tdm._cuda_available() else "cpu")
    return p.parse_args(argv)


def train_one(arch: str, args, tok, ids: dict[str, list[int]], device, command: str, *,
              folder_name: str | None = None, extra_stats: dict | None = None) -> dict:
    """Train ``arch`` (a bench architecture or a zoo name), keep the best-validation weights, measure
    the test perplexity and write ``<out-dir>/<folder_name or bench-<arch>>/`` atomically."""
    import torch

    amp = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(args.seed)
    model, desc = build_model(arch, tok.get_vocab_size(), args.max_positions)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    tdm.log(f"[{arch}] {desc}: {n_params:,} parameters")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            **({"fused": True} if device.type == "cuda" else {}))
    warmup = max(1, int(0.03 * args.steps))

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    bos = tok.token_to_id(tdm.BOS)
    data = torch.tensor(ids["train"], dtype=torch.long, device=device)
    n_body = args.seq_len - 1
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    arange = torch.arange(n_body, device=device)
    bos_col = torch.full((args.batch, 1), bos, dtype=torch.long, device=device)
    best, history = None, []
    t0 = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, len(ids["train"]) - n_body + 1, (args.batch,), generator=gen).to(device)
        x = torch.cat([bos_col, data[starts[:, None] + arange[None, :]]], dim=1)
        with tdm._autocast(device, amp):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        last = step + 1 == args.steps
        if (step + 1) % args.log_every == 0 or step == 0 or last:
            tdm.log(f"[{arch}] step {step + 1}/{args.steps} loss {loss.item():.4f} {time.time() - t0:.0f}s")
        if (step + 1) % args.eval_every == 0 or last:
            nll, n = tdm.evaluate_nll(model, ids["valid"], args.seq_len, bos, device, autocast_dtype=amp)
            history.append((step + 1, nll / n))
            tdm.log(f"[{arch}]   valid token ppl {math.exp(nll / n):.3f} at step {step + 1}")
            if best is None or nll / n < best[0]:
                best = (nll / n, step + 1, {k: t.detach().clone() for k, t in model.state_dict().items()})
    train_time = time.time() - t0
    kept = args.steps
    if best is not None and best[1] != args.steps:
        model.load_state_dict(best[2])
        kept = best[1]
    model.eval()
    model.half().float()  # measure the float16 weights that are saved
    nll, n = tdm.evaluate_nll(model, ids["test"], args.seq_len, bos, device)
    stats = {"arch": arch, "description": desc, "n_params": n_params, "steps": args.steps, "kept_step": kept,
             "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr, "train_time_s": train_time,
             "train_tokens": len(ids["train"]), "tokens_seen": args.steps * args.batch * n_body,
             "valid_history": [(s, math.exp(v)) for s, v in history], "test_tokens": n,
             "test_token_ppl": math.exp(nll / n), "device": str(device), "command": command,
             "bf16_autocast": amp is not None,
             "valid_loss": None if best is None else best[0], **(extra_stats or {})}
    tdm.log(f"[{arch}] kept step {kept}; test token ppl {stats['test_token_ppl']:.3f} ({train_time:.0f}s training)")

    out = (args.out_dir / (folder_name or f"bench-{arch}")).resolve()
    tmp = out.parent / f".{arch}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.half().cpu().save_pretrained(str(tmp), safe_serialization=True)
    tdm.save_hf_tokenizer(tok, tmp, args.max_positions)
    (tmp / "train_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    tdm.log(f"[{arch}] saved {out}")
    return stats


def zoo_main(args) -> int:
    """``--zoo``: build (or reuse) the zoo models and print one line per model."""
    folders = build_zoo(args.zoo or ["zoo", "held-out"], args.out_dir, args.steps or ZOO_STEPS,
                        data_root=args.data_root,
                        tokenizer_dir=args.tokenizer_dir, device=args.device, overwrite=args.overwrite,
                        max_train_chars=args.max_train_chars,
                        max_eval_tokens=args.max_eval_tokens if args.max_eval_tokens is not None else ZOO_EVAL_TOKENS)
    for folder in folders:
        stats = json.loads((folder / "train_stats.json").read_text())
        print(f"{folder.name}: {stats['n_params']:,} parameters, {stats['train_time_s']:.0f}s training, "
              f"valid loss {stats['valid_loss']:.3f}, test token ppl {stats['test_token_ppl']:.2f} -> {folder}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.zoo is not None:
            return zoo_main(args)
        if args.out_dir is None:
            raise tdm.UserError("--out-dir is required (or pass --zoo to build the zoo under the qenv cache)")
        args.steps = args.steps or 1200
        import torch
        from tokenizers import Tokenizer

        for arch in args.arch:
            if (args.out_dir / f"bench-{arch}").exists() and not args.overwrite:
                raise tdm.UserError(f"{args.out_dir / f'bench-{arch}'} exists (pass --overwrite)")
        device = torch.device(args.device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        command = "python3 " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv or sys.argv[1:]))
        tdm.log(f"command: {command}\ndevice: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
                f"; torch {torch.__version__}, Python {platform.python_version()}")
        tok = Tokenizer.from_file(str(args.tokenizer_dir / "tokenizer.json"))
        ids = {}
        for split in ("train", "valid", "test"):
            lines = tdm.read_lines(args.data_dir / f"{split}.txt", args.max_train_chars if split == "train" else None)
            ids[split] = tdm.encode_lines(tok, lines)
            if split != "train" and args.max_eval_tokens:
                ids[split] = ids[split][: args.max_eval_tokens]
        tdm.log("tokens: " + ", ".join(f"{k} {len(v):,}" for k, v in ids.items()))
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for arch in args.arch:
            train_one(arch, args, tok, ids, device, command)
    except tdm.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
