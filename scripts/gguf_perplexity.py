#!/usr/bin/env python3
"""Perplexity of a .gguf on a text file, computed by llama.cpp itself (llama-cpp-python's libllama).

    python scripts/gguf_perplexity.py model.gguf text.txt [--n-tokens 4096] [--ctx 256]

The text is tokenized by the .gguf's own tokenizer (llama.cpp's), and its first ``--n-tokens``
tokens are cut into windows of ``--ctx`` tokens exactly as qenv's ``tokens_from_text(n_tokens,
seq_len=ctx)`` cuts them (no BOS added), so the number is comparable with the held-out perplexity
``eval_agent.py --data`` prints (for text without ``<|endoftext|>`` separators, which qenv turns
into document boundaries and this script does not). Every window is evaluated by llama.cpp with all logits kept;
perplexity is ``exp(mean NLL)`` of each next token inside a window. llama.cpp's CPU weight repacking is
off (``use_extra_bufts=False``, as ``--no-repack`` in llama.cpp's tools): its repacked kernels crash on
some CPUs, see docs/llama_cpp_repack_crash.md. Needs the gguf extra: ``pip install 'qenv[gguf]'``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a .gguf file")
    p.add_argument("text", help="a UTF-8 text file")
    p.add_argument("--n-tokens", type=int, default=2048, help="tokens read (default: %(default)s)")
    p.add_argument("--ctx", type=int, default=128, help="window length (default: %(default)s, qenv's seq_len)")
    args = p.parse_args(argv)
    for path in (args.model, args.text):
        if not Path(path).is_file():
            print(f"error: {path} does not exist. Fix: pass an existing file.", file=sys.stderr)
            return 2
    try:
        import llama_cpp
        import numpy as np

        from qenv.llama_cpp_child import load_llama
    except ImportError:
        print("error: llama-cpp-python is not installed. Fix: pip install 'qenv[gguf]'.", file=sys.stderr)
        return 2
    try:
        # repacking off: llama.cpp's repacked kernels crash on some CPUs (docs/llama_cpp_repack_crash.md)
        llm = load_llama(args.model, logits_all=True, n_ctx=args.ctx, n_batch=args.ctx, n_ubatch=args.ctx,
                         verbose=False)
    except ValueError as exc:
        print(f"error: llama.cpp cannot load {args.model} ({exc}). Fix: pass a valid .gguf.", file=sys.stderr)
        return 2
    # special=True: special tokens written in the text (wikitext's "<unk>") are parsed as transformers does
    ids = llm.tokenize(Path(args.text).read_text(encoding="utf-8").encode(), add_bos=False, special=True)
    n_windows = args.n_tokens // args.ctx
    if len(ids) < n_windows * args.ctx or n_windows == 0:
        print(f"error: {args.text} holds {len(ids)} tokens, fewer than {max(n_windows, 1) * args.ctx}. "
              "Fix: use a longer text or a smaller --n-tokens.", file=sys.stderr)
        return 2
    nll, count = 0.0, 0
    for w in range(n_windows):
        chunk = ids[w * args.ctx:(w + 1) * args.ctx]
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: len(chunk)], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logprobs[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
    print(f"{Path(args.model).name}: perplexity {math.exp(nll / count):.4f} on {count} tokens of "
          f"{Path(args.text).name} (llama.cpp {llama_cpp.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
