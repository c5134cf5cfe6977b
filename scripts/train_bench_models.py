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
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import train_default_model as tdm  # noqa: E402  (the embedded model's helpers: one copy)

DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "wikitext-2"
DEFAULT_TOKENIZER_DIR = REPO_ROOT / "qenv" / "models" / "builtin" / "wikitext-llama"
ARCHS = ("llama", "gpt2", "qwen2")
SMALL_ARCHS = ("gpt2-small",)  # trainable on a CPU: a GPT-2-layout test model for CPU experiments


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
    p.add_argument("--tokenizer-dir", type=Path, default=DEFAULT_TOKENIZER_DIR)
    p.add_argument("--out-dir", type=Path, required=True, help="models go to <out-dir>/bench-<arch>/")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--steps", type=int, default=1200)
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


def train_one(arch: str, args, tok, ids: dict[str, list[int]], device, command: str) -> dict:
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
             "bf16_autocast": amp is not None}
    tdm.log(f"[{arch}] kept step {kept}; test token ppl {stats['test_token_ppl']:.3f} ({train_time:.0f}s training)")

    out = (args.out_dir / f"bench-{arch}").resolve()
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


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
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
