#!/usr/bin/env python3
"""Train qenv's embedded default model: a small Llama causal LM on WikiText-2.

The output folder (default ``qenv/models/builtin/wikitext-llama/``) is a plain Hugging Face model
folder that loads offline with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained``. It holds ``config.json``, ``generation_config.json``,
``model.safetensors`` (float16), ``tokenizer.json``, ``tokenizer_config.json`` and a model card
``README.md`` recording the command, the data checksums, the training run and the test perplexity.

Steps:

1. Train a byte-level BPE tokenizer (``tokenizers`` library) on ``train.txt``, or reuse the one in
   ``--tokenizer-dir``. Special tokens: ``<unk>`` (0), ``<s>`` (1, BOS), ``</s>`` (2, EOS),
   ``<pad>`` (3). WikiText's literal ``<unk>`` word is encoded as the single ``<unk>`` token.
2. Tokenize the corpus line by line (each line keeps its trailing newline) and concatenate.
3. Train ``LlamaForCausalLM`` with AdamW and a warmup + cosine schedule on random windows
   ``[<s>] + tokens[i : i + seq_len - 1]``.
4. Evaluate on ``test.txt``: the token stream is cut into non-overlapping chunks of
   ``seq_len - 1`` tokens, each prefixed with ``<s>``, so every test token is scored exactly once.
   Token-level perplexity = exp(total NLL / test tokens); word-level perplexity =
   exp(total NLL / (whitespace words + one <eos> per line)), the usual WikiText-2 word count.
5. Write everything to a temporary sibling folder, then rename it into place.

Example (the shipped artifacts record their exact command in their README.md)::

    python3 scripts/train_default_model.py --device cuda --steps 3000

Data layout: ``--data-dir`` holds ``train.txt`` and ``test.txt`` (optionally ``valid.txt``), the
WikiText-2 v1 tokenized files (see ../shared/data/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "wikitext-2"
DEFAULT_OUT = REPO_ROOT / "qenv" / "models" / "builtin" / "wikitext-llama"

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0, 1, 2, 3
UNK, BOS, EOS, PAD = SPECIAL_TOKENS


class UserError(Exception):
    """A problem with the arguments or inputs, reported without a traceback."""


# --------------------------------------------------------------------------------------------
# helpers


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_lines(path: Path, max_chars: int | None = None) -> list[str]:
    """Lines of a UTF-8 text file, each keeping its trailing newline; optionally truncated."""
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if max_chars is not None and len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars)
        text = text[: cut + 1] if cut >= 0 else text[:max_chars]
    return text.splitlines(keepends=True)


def count_words(lines: list[str]) -> int:
    """WikiText-2 word count: whitespace-separated words plus one <eos> per line."""
    return sum(len(line.split()) for line in lines) + len(lines)


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(lines: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # "<unk>" in the text is matched as the special token at encode time, so keep it out of the
    # merge statistics.
    tok.train_from_iterator((line.replace("<unk>", "") for line in lines), trainer=trainer,
                            length=len(lines))
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t!r} got id {tok.token_to_id(t)}, expected {i}")
    bos_id = tok.token_to_id(BOS)
    # transformers' tokenizer(text) prepends <s>, which is how the model was trained.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)],
    )
    return tok


def save_hf_tokenizer(tok, out_dir: Path, model_max_length: int) -> None:
    """Save as tokenizer.json + tokenizer_config.json loadable by AutoTokenizer offline."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )
    hf_tok.save_pretrained(str(out_dir))
    # Pin the class so AutoTokenizer loads tokenizer.json as-is (never the model_type's
    # sentencepiece-style LlamaTokenizer), in transformers 4.x and 5.x alike.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def encode_lines(tok, lines: list[str]) -> list[int]:
    """Encode each line (no special tokens added) and concatenate the ids."""
    ids: list[int] = []
    step = 4096
    for i in range(0, len(lines), step):
        for enc in tok.encode_batch(lines[i : i + step], add_special_tokens=False):
            ids.extend(enc.ids)
    return ids


# --------------------------------------------------------------------------------------------
# model


def build_config(args, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        use_cache=True,
    )


def eval_chunks(ids: list[int], seq_len: int, bos_id: int):
    """Non-overlapping windows [<s>] + ids[k*(L-1):(k+1)*(L-1)] as (inputs, labels) tensors."""
    import torch

    n = seq_len - 1
    rows_in, rows_lab = [], []
    for s in range(0, len(ids), n):
        chunk = ids[s : s + n]
        inp = [bos_id] + chunk
        # labels[t] is the target for position t (predicted from positions <= t)
        lab = chunk + [-100]
        pad = seq_len - len(inp)
        rows_in.append(inp + [bos_id] * pad)
        rows_lab.append(lab + [-100] * pad)
    return torch.tensor(rows_in), torch.tensor(rows_lab)


def evaluate_nll(model, ids: list[int], seq_len: int, bos_id: int, device, batch: int = 32,
                 autocast_dtype=None) -> tuple[float, int]:
    """(total NLL in nats, number of scored tokens) over ``ids``; every token scored once."""
    import torch
    import torch.nn.functional as F

    inputs, labels = eval_chunks(ids, seq_len, bos_id)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch):
            x = inputs[i : i + batch].to(device)
            y = labels[i : i + batch].to(device)
            with _autocast(device, autocast_dtype):
                logits = model(input_ids=x).logits
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                  ignore_index=-100, reduction="sum")
            total += float(nll)
            count += int((y != -100).sum())
    model.train(was_training)
    return total, count


def _autocast(device, dtype):
    import contextlib

    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train qenv's embedded default Llama model (and its BPE tokenizer) on "
                    "WikiText-2, evaluate test perplexity, and save a Hugging Face model folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data / output")
    g.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="folder with WikiText-2 train.txt, test.txt (and optionally valid.txt)")
    g.add_argument("--out", "--output-dir", dest="out", type=Path, default=DEFAULT_OUT,
                   help="output model folder")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g.add_argument("--tokenizer-dir", type=Path, default=None,
                   help="reuse tokenizer.json from this folder instead of training one")
    g.add_argument("--max-train-chars", type=int, default=None,
                   help="use only the first N characters of train.txt (for smoke tests)")
    g.add_argument("--max-eval-tokens", type=int, default=None,
                   help="evaluate on only the first N test tokens (for smoke tests)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--vocab-size", type=int, default=2048)
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--layers", type=int, default=6)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--intermediate", type=int, default=384)
    g.add_argument("--max-positions", type=int, default=512)
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=3000)
    g.add_argument("--batch", type=int, default=128, help="sequences per step")
    g.add_argument("--seq-len", type=int, default=256, help="training/eval window (incl. <s>)")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.05, help="final lr / peak lr")
    g.add_argument("--warmup", type=int, default=None, help="warmup steps (default 3%% of steps)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--device", default="cuda" if _cuda_available() else "cpu",
                   help="torch device: cuda, cuda:N or cpu")
    g.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast for training (auto: on for CUDA)")
    g.add_argument("--eval-every", type=int, default=500,
                   help="evaluate valid.txt every N steps (0: never); the best step is kept")
    g.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be divisible by --heads and --heads by --kv-heads")
    if args.seq_len < 2 or args.seq_len > args.max_positions:
        p.error("--seq-len must be in [2, --max-positions]")
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be positive")
    return args


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args, argv) -> int:
    data_dir: Path = args.data_dir
    train_path, test_path, valid_path = (data_dir / f for f in ("train.txt", "test.txt", "valid.txt"))
    if not data_dir.is_dir():
        raise UserError(f"data folder not found: {data_dir} (expected WikiText-2 train.txt/test.txt; "
                        "pass --data-dir)")
    for path in (train_path, test_path):
        if not path.is_file():
            raise UserError(f"data file not found: {path} (pass --data-dir)")
    out: Path = args.out.resolve()
    if out.exists() and not args.overwrite:
        raise UserError(f"output folder exists: {out} (pass --overwrite to replace it)")
    if args.tokenizer_dir is not None and not (args.tokenizer_dir / "tokenizer.json").is_file():
        raise UserError(f"tokenizer.json not found in --tokenizer-dir {args.tokenizer_dir}")

    import numpy as np
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    try:
        device = torch.device(args.device)
        torch.empty(1, device=device)
    except Exception as e:  # noqa: BLE001 - report, don't trace
        raise UserError(f"device {args.device!r} is not usable: {e}") from None
    use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and device.type == "cuda")
    amp_dtype = torch.bfloat16 if use_bf16 else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    t_start = time.time()
    command = "python3 " + " ".join(shlex.quote(a) for a in
                                    ([sys.argv[0]] + (list(argv) if argv is not None else sys.argv[1:])))
    log(f"command: {command}")
    log(f"device: {dev_name}; bf16 autocast: {use_bf16}")

    # ---- data + tokenizer
    train_lines = read_lines(train_path, args.max_train_chars)
    test_lines = read_lines(test_path)
    valid_lines = read_lines(valid_path) if (valid_path.is_file() and args.eval_every > 0) else None
    from tokenizers import Tokenizer

    t0 = time.time()
    if args.tokenizer_dir is not None:
        tok = Tokenizer.from_file(str(args.tokenizer_dir / "tokenizer.json"))
        tok_source = f"reused from {args.tokenizer_dir}"
    else:
        tok = train_tokenizer(train_lines, args.vocab_size)
        tok_source = f"trained (byte-level BPE, vocab {args.vocab_size})"
    vocab_size = tok.get_vocab_size()
    bos_id = tok.token_to_id(BOS)
    log(f"tokenizer {tok_source}: vocab {vocab_size} in {time.time() - t0:.1f}s")
    t0 = time.time()
    train_ids = encode_lines(tok, train_lines)
    test_ids = encode_lines(tok, test_lines)
    if args.max_eval_tokens is not None:
        test_ids = test_ids[: args.max_eval_tokens]
    valid_ids = encode_lines(tok, valid_lines) if valid_lines is not None else None
    log(f"tokens: train {len(train_ids):,}, test {len(test_ids):,}"
        + (f", valid {len(valid_ids):,}" if valid_ids else "")
        + f" ({time.time() - t0:.1f}s); train chars/token {sum(map(len, train_lines)) / len(train_ids):.2f}")
    if len(train_ids) < args.seq_len + 1:
        raise UserError("training text is shorter than one window; use a larger --max-train-chars")

    # ---- model
    from transformers import GenerationConfig, LlamaForCausalLM

    config = build_config(args, vocab_size)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt_kwargs = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    if device.type == "cuda":
        opt_kwargs["fused"] = True
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], **opt_kwargs)
    warmup = args.warmup if args.warmup is not None else max(1, int(0.03 * args.steps))

    def lr_at(step: int) -> float:  # step is 0-based
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cos)

    data = torch.tensor(train_ids, dtype=torch.long, device=device)
    n_body = args.seq_len - 1
    max_start = len(train_ids) - n_body
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    arange = torch.arange(n_body, device=device)
    bos_col = torch.full((args.batch, 1), bos_id, dtype=torch.long, device=device)

    best = None  # (valid_nll_per_token, step, state_dict)
    history = []
    model.train()
    t_train = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, max_start + 1, (args.batch,), generator=gen).to(device)
        body = data[starts[:, None] + arange[None, :]]
        x = torch.cat([bos_col, body], dim=1)
        with _autocast(device, amp_dtype):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        last = step + 1 == args.steps
        if (step + 1) % args.log_every == 0 or step == 0 or last:
            elapsed = time.time() - t_train
            log(f"step {step + 1}/{args.steps} loss {loss.item():.4f} lr {lr_at(step):.2e} "
                f"{elapsed:.0f}s ({(step + 1) * args.batch * n_body / max(elapsed, 1e-9):,.0f} tok/s)")
        if valid_ids and ((step + 1) % args.eval_every == 0 or last):
            v_nll, v_n = evaluate_nll(model, valid_ids, args.seq_len, bos_id, device, autocast_dtype=amp_dtype)
            v = v_nll / v_n
            history.append((step + 1, v))
            log(f"  valid token ppl {math.exp(v):.3f} at step {step + 1}")
            if best is None or v < best[0]:
                best = (v, step + 1, {k: t.detach().clone() for k, t in model.state_dict().items()})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_time = time.time() - t_train
    kept_step = args.steps
    if best is not None and best[1] != args.steps:
        model.load_state_dict(best[2])
        kept_step = best[1]
        log(f"keeping the weights of step {kept_step} (best valid ppl {math.exp(best[0]):.3f})")
    del best

    # ---- final evaluation in fp32 on the fp16-rounded weights that are shipped
    model.half().float()
    t0 = time.time()
    nll, n_tok = evaluate_nll(model, test_ids, args.seq_len, bos_id, device)
    token_ppl = math.exp(nll / n_tok)
    word_count = count_words(test_lines) if args.max_eval_tokens is None else None
    word_ppl = math.exp(nll / word_count) if word_count else None
    log(f"test: {n_tok:,} tokens, token ppl {token_ppl:.3f}"
        + (f", {word_count:,} words, word ppl {word_ppl:.2f}" if word_ppl else "")
        + f" ({time.time() - t0:.1f}s)")
    valid_ppl = None
    if valid_ids:
        v_nll, v_n = evaluate_nll(model, valid_ids, args.seq_len, bos_id, device)
        valid_ppl = math.exp(v_nll / v_n)
        log(f"valid token ppl (fp16 weights, fp32 compute): {valid_ppl:.3f}")

    # sample text (greedy would loop; fixed-seed sampling shows the style)
    model.eval()
    torch.manual_seed(args.seed)
    prompt = " = Valkyria Chronicles = \n \n"
    prompt_ids = torch.tensor([[bos_id] + tok.encode(prompt, add_special_tokens=False).ids], device=device)
    sample_ids = model.generate(prompt_ids, max_new_tokens=80, do_sample=True, temperature=0.8,
                                top_k=50, pad_token_id=3, eos_token_id=None)
    sample = tok.decode(sample_ids[0, 1:].tolist(), skip_special_tokens=False)
    log("sample:\n" + sample)

    # ---- save (temp folder, then rename)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model = model.half().cpu()
        model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3,
                                                   do_sample=True, temperature=0.8, top_k=50,
                                                   max_new_tokens=64)
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_hf_tokenizer(tok, tmp, args.max_positions)
        size = (tmp / "model.safetensors").stat().st_size
        import tokenizers
        import transformers

        stats = dict(
            command=command, device=dev_name, bf16=use_bf16, n_params=n_params,
            steps=args.steps, kept_step=kept_step, batch=args.batch, seq_len=args.seq_len,
            train_tokens_seen=args.steps * args.batch * n_body, train_tokens=len(train_ids),
            train_time_s=train_time, total_time_s=time.time() - t_start,
            test_tokens=n_tok, test_words=word_count, test_nll=nll, token_ppl=token_ppl,
            word_ppl=word_ppl, valid_ppl=valid_ppl, history=history,
            safetensors_bytes=size, tok_source=tok_source, vocab_size=vocab_size,
            train_sha=sha256_file(train_path), test_sha=sha256_file(test_path),
            train_path=str(train_path), test_path=str(test_path),
            max_train_chars=args.max_train_chars, max_eval_tokens=args.max_eval_tokens,
            versions=f"torch {torch.__version__}, transformers {transformers.__version__}, "
                     f"tokenizers {tokenizers.__version__}, Python {platform.python_version()}",
            sample=sample, args=vars(args), config=config,
        )
        (tmp / "README.md").write_text(model_card(stats), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"saved {out} (model.safetensors {size:,} bytes)")
    return 0


def model_card(s: dict) -> str:
    c = s["config"]
    a = s["args"]
    lines = [
        "---",
        "license: cc-by-sa-3.0",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "datasets:",
        "- wikitext",
        "---",
        "",
        "# wikitext-llama — qenv's embedded default model",
        "",
        f"A {s['n_params']:,}-parameter Llama-architecture causal LM ({c.num_hidden_layers} decoder "
        f"blocks, hidden {c.hidden_size}, {c.num_attention_heads} heads / {c.num_key_value_heads} KV heads, "
        f"MLP {c.intermediate_size}, tied embeddings, vocab {c.vocab_size}) with a byte-level BPE tokenizer, "
        "trained from scratch on WikiText-2 (v1, tokenized) so that qenv works without any download. "
        "It is a test/demo model: small enough to quantize in seconds on a CPU, "
        "trained enough that quantization error shows up as a perplexity change.",
        "",
        "Produced by `scripts/train_default_model.py` in the qenv repository.",
        "",
        "## Command",
        "",
        "```",
        s["command"],
        "```",
        "",
        f"- Device: {s['device']} (bf16 autocast: {'yes' if s['bf16'] else 'no'}); {s['versions']}",
        f"- Training: {s['steps']:,} steps × batch {s['batch']} × {s['seq_len']} tokens "
        f"(`<s>` + {s['seq_len'] - 1} text tokens) = {s['train_tokens_seen']:,} text tokens seen "
        f"({s['train_tokens_seen'] / s['train_tokens']:.1f} epochs of {s['train_tokens']:,} train tokens); "
        f"training time {s['train_time_s']:.1f} s, whole run {s['total_time_s']:.1f} s",
        f"- Weights kept: step {s['kept_step']:,}"
        + (" (best valid.txt perplexity)" if s["kept_step"] != s["steps"] else " (final)"),
        f"- Optimizer: AdamW (β 0.9/0.95, weight decay {a['weight_decay']} on matrices), peak lr {a['lr']}, "
        f"warmup {a['warmup'] if a['warmup'] is not None else max(1, int(0.03 * s['steps']))} steps then cosine to "
        f"{a['min_lr_ratio']}× peak, grad clip {a['grad_clip']}, seed {a['seed']}",
        f"- Tokenizer: {s['tok_source']}; special tokens `<unk>`=0, `<s>`=1, `<pad>`=3, `</s>`=2; "
        "WikiText's literal `<unk>` word is the `<unk>` token; `tokenizer(text)` prepends `<s>`.",
        f"- Weights: float16 `model.safetensors`, {s['safetensors_bytes']:,} bytes",
        "",
        "## Data",
        "",
        "| file | sha256 |",
        "|---|---|",
        f"| wikitext-2/train.txt | `{s['train_sha']}` |",
        f"| wikitext-2/test.txt | `{s['test_sha']}` |",
        "",
        "WikiText-2 v1 (`wiki.*.tokens`, Merity et al. 2016), CC BY-SA 3.0; "
        "the data is not shipped with qenv.",
    ]
    if s["max_train_chars"]:
        lines.append(f"Only the first {s['max_train_chars']:,} characters of train.txt were used.")
    lines += [
        "",
        "## Test perplexity",
        "",
        "Measured on the saved float16 weights (computed in float32). The test token stream "
        "(each line encoded with its trailing newline, lines concatenated) is cut into non-overlapping "
        f"chunks of {s['seq_len'] - 1} tokens, each prefixed with `<s>`, so every token is scored exactly once.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| test tokens scored | {s['test_tokens']:,} |",
        f"| total NLL (nats) | {s['test_nll']:.1f} |",
        f"| **token-level perplexity** | **{s['token_ppl']:.3f}** |",
    ]
    if s["word_ppl"] is not None:
        lines += [
            f"| test words (whitespace words + one `<eos>` per line) | {s['test_words']:,} |",
            f"| **word-level perplexity** exp(NLL / words) | **{s['word_ppl']:.2f}** |",
        ]
    if s["max_eval_tokens"]:
        lines.append(f"| (only the first {s['max_eval_tokens']:,} test tokens were scored) | |")
    if s["valid_ppl"] is not None:
        lines.append(f"| valid.txt token-level perplexity | {s['valid_ppl']:.3f} |")
    if s["history"]:
        lines += ["", "Valid token perplexity during training (bf16 autocast if used): "
                  + ", ".join(f"step {st}: {math.exp(v):.2f}" for st, v in s["history"]) + "."]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)",
        "ids = tok(\" = Robert Boulter = \\n\", return_tensors=\"pt\").input_ids",
        "print(tok.decode(model.generate(ids, max_new_tokens=40)[0]))",
        "```",
        "",
        "## Sample",
        "",
        "Sampled (temperature 0.8, top-k 50) after the prompt ` = Valkyria Chronicles = \\n \\n`:",
        "",
        "```",
        s["sample"].rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
