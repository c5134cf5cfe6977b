"""The llama.cpp side of :mod:`qenv.llama_cpp_isolated`: runs in a child process, never in qenv's own.

llama.cpp's repacked CPU kernels (its default ``use_extra_bufts=True``) segfault on some CPUs for
some types (see ``docs/llama_cpp_repack_crash.md``); a segfault cannot be caught, so every load
and decode qenv does happens here, in a child started by
:func:`qenv.llama_cpp_isolated.run_llama_cpp`, and a crash becomes one error in the parent.

Run as a script, this module reads one JSON request on stdin, writes the arrays it computes as
``.npy`` files into the request's ``out_dir`` and prints one JSON line of results. It imports only
the standard library, numpy and llama_cpp (not qenv, whose import would cost seconds per call).
:func:`load_llama` is also what ``scripts/gguf_perplexity.py`` loads models with.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the script's own folder (qenv/) must not shadow modules such as io or signals
    sys.path.pop(0)

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402


def load_llama(model_path: str, repack: bool = False, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(model_path, **kwargs)`` with llama.cpp's CPU weight repacking off unless ``repack``.

    llama-cpp-python 0.3.36 does not expose ``use_extra_bufts`` as an argument, so the model
    parameters it starts from (``llama_model_default_params``) are given the flag for this one load.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params

    def params() -> Any:
        value = default()
        value.use_extra_bufts = bool(repack)
        return value

    low.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=model_path, **kwargs)
    finally:
        low.llama_model_default_params = default


def _score(request: dict[str, Any]) -> dict[str, Any]:
    """Logits of every position of every row of ``ids`` (all rows the same length)."""
    import numpy as np

    ids = [[int(t) for t in row] for row in request["ids"]]
    seq = max(len(row) for row in ids)
    kv = {"type_k": 0, "type_v": 0} if request.get("f32_cache") else {}  # GGML_TYPE_F32
    llm = load_llama(request["path"], repack=bool(request.get("repack")), logits_all=True, n_ctx=seq, n_batch=seq,
                     n_ubatch=seq, n_threads=int(request.get("n_threads", 1)), verbose=False, **kv)
    out = []
    for row in ids:
        llm.reset()
        llm.eval(row)
        out.append(np.array(llm.scores[: len(row)], dtype=np.float32))
    llm.close()
    np.save(Path(request["out_dir"]) / "logits.npy", np.stack(out), allow_pickle=False)
    return {"logits": "logits.npy"}


def _tokenize(request: dict[str, Any]) -> dict[str, Any]:
    """The .gguf's own tokenization of ``text`` (vocabulary only, no weights loaded)."""
    llm = load_llama(request["path"], n_ctx=64, verbose=False, vocab_only=True)
    ids = llm.tokenize(request["text"].encode(), add_bos=bool(request.get("add_bos")), special=True)
    return {"ids": ids, "bos": llm.token_bos(), "eos": llm.token_eos()}


TASKS = {"score": _score, "tokenize": _tokenize}


def main() -> int:
    request = json.loads(sys.stdin.read())
    result = TASKS[request["task"]](request)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
