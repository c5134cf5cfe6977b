"""llama.cpp loads and decodes in a child process: a crash there is one error here, never a dead process.

llama.cpp's repacked CPU kernels (``use_extra_bufts``, on by default) segfault on AVX-512 CPUs for
some of the types qenv writes (``docs/llama_cpp_repack_crash.md``). A segfault cannot be caught in
the process it happens in, so every place qenv runs llama.cpp on a .gguf (the export check, the
tests) goes through :func:`run_llama_cpp`, which runs :mod:`qenv.llama_cpp_child` in a fresh
Python process with repacking off, and turns a signal or a non-zero exit into a :class:`QenvError`
naming the signal and the workaround.

- :func:`score_gguf`: llama.cpp's logits of token rows.
- :func:`tokenize_gguf`: the .gguf's own tokenization of a text.
- :func:`check_gguf_export`: a written model.gguf, loaded and scored by llama.cpp, against qenv's
  own logits of the same recipe.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qenv.errors import QenvError

#: the workaround for llama.cpp's repacking crash, as a user applies it
REPACK_WORKAROUND = ("load it with llama.cpp's weight repacking off (llama-cli/llama-server/llama-perplexity "
                     "--no-repack; llama-cpp-python: model_params.use_extra_bufts = False); see "
                     "docs/llama_cpp_repack_crash.md")
#: the export check's bar: qenv's and llama.cpp's (F32 KV cache) next-token distributions, mean KL per
#: position, may differ by float noise (it flips 8-bit activation roundings: 6e-4 to 1e-3 on the default
#: model) or by a tenth of the quantization's own error (KL of the full-precision model to qenv's),
#: whichever is larger. A wrong tensor, type or layout costs far more than either.
EXPORT_CHECK_MAX_KL = 1e-3
EXPORT_CHECK_RELATIVE = 0.1
#: rows and positions the export check scores (a few are enough to catch a wrong tensor)
EXPORT_CHECK_ROWS = 2
EXPORT_CHECK_POSITIONS = 64
_CHILD = Path(__file__).with_name("llama_cpp_child.py")


def signal_name(returncode: int) -> str | None:
    """``SIGSEGV`` for a child killed by signal 11 (``returncode`` -11), ``None`` for a normal exit."""
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def run_llama_cpp(request: Mapping[str, Any], what: str, timeout: float = 600.0,
                  script: Sequence[str] | None = None) -> tuple[dict[str, Any], Path]:
    """Run one llama.cpp task (``request["task"]``: ``score`` or ``tokenize``) in a child process.

    Returns the child's JSON result and the folder holding the arrays it wrote (a temporary folder
    the caller reads before the next call; it lives until the process ends or the caller removes
    it). A child killed by a signal, one exiting non-zero, one running past ``timeout`` seconds or
    one printing no result raises :class:`QenvError` naming ``what`` and the cause; the calling
    process goes on. ``script`` replaces the child's command line (``[sys.executable, "-c", code]``),
    which is how the tests make a real child crash.
    """
    out_dir = Path(tempfile.mkdtemp(prefix="qenv-llama-cpp-"))
    try:
        return _run_child(request, what, timeout, script, out_dir)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # nothing left behind by a failed call
        raise


def _run_child(request: Mapping[str, Any], what: str, timeout: float, script: Sequence[str] | None,
               out_dir: Path) -> tuple[dict[str, Any], Path]:
    payload = json.dumps({**dict(request), "out_dir": str(out_dir)})
    command = list(script) if script is not None else [sys.executable, str(_CHILD)]
    try:
        done = subprocess.run(command, input=payload, capture_output=True, text=True, timeout=timeout,
                              cwd=out_dir)
    except subprocess.TimeoutExpired:
        raise QenvError(f"llama.cpp did not finish {what} within {timeout:g} s (stopped).",
                        "check the file with llama.cpp directly, or use a smaller model.") from None
    killed = signal_name(done.returncode)
    if killed is not None:
        raise QenvError(f"llama.cpp crashed while {what}: its process was killed by {killed}.",
                        "this is llama.cpp's crash, not qenv's; if repacking was on, " + REPACK_WORKAROUND + ".")
    last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
    if done.returncode != 0:
        raise QenvError(f"llama.cpp failed while {what} (exit status {done.returncode}: {last}).",
                        "check that the file is a .gguf llama.cpp can run and that llama-cpp-python is installed "
                        "(pip install 'qenv[gguf]').")
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        raise QenvError(f"llama.cpp printed no result while {what} ({last}).", "run the check again; if it repeats, "
                                                                              "report it with the file.")
    return result, out_dir


def score_gguf(path: str | Path, ids: Any, f32_cache: bool = False, repack: bool = False,
               n_threads: int = 1, timeout: float = 600.0) -> np.ndarray:
    """llama.cpp's logits (``[rows, positions, vocab]`` float32) of the token rows ``ids`` on ``path``.

    ``f32_cache`` keeps the KV cache in F32 (llama.cpp's default F16 also rounds the queries and the
    attention probabilities); ``repack`` turns llama.cpp's CPU weight repacking on, as its tools
    default to (off here: it crashes on some CPUs)."""
    rows = [[int(t) for t in row] for row in np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids).tolist()]
    if not rows or not rows[0] or len({len(r) for r in rows}) != 1:
        raise QenvError("score_gguf needs rows of token ids of one length.", "pass a [rows, positions] array.")
    request = {"task": "score", "path": str(path), "ids": rows, "f32_cache": f32_cache, "repack": repack,
               "n_threads": n_threads}
    result, out_dir = run_llama_cpp(request, f"scoring {path}" + (" with repacking on" if repack else ""), timeout)
    try:
        logits = np.load(out_dir / str(result.get("logits")), allow_pickle=False)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if logits.ndim != 3 or logits.shape[:2] != (len(rows), len(rows[0])):
        raise QenvError(f"llama.cpp returned logits of shape {logits.shape} for {len(rows)} x {len(rows[0])} tokens.",
                        "report it with the file.")
    return logits


def tokenize_gguf(path: str | Path, text: str, add_bos: bool = False) -> dict[str, Any]:
    """``{"ids", "bos", "eos"}``: the .gguf's own tokenizer on ``text`` (special tokens parsed)."""
    result, out_dir = run_llama_cpp({"task": "tokenize", "path": str(path), "text": text, "add_bos": add_bos},
                                    f"tokenizing with {path}")
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def mean_kl(p_logits: Any, q_logits: Any) -> float:
    """Mean over positions of KL(p || q) between two arrays of logits of one shape."""
    import torch

    p = torch.log_softmax(torch.as_tensor(p_logits).double(), -1)
    q = torch.log_softmax(torch.as_tensor(q_logits).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def check_gguf_export(evaluator: Any, recipe: Mapping[str, Any], path: str | Path,
                      probe_repack: bool = True) -> str:
    """Load ``path`` (the recipe's model.gguf) in llama.cpp, in a child process with repacking off, score
    a few calibration rows and compare with qenv's own logits of ``recipe``; returns a one-line report.

    Raises :class:`QenvError` when llama.cpp cannot load or run it, or disagrees with qenv by more
    than float noise (:data:`EXPORT_CHECK_MAX_KL`). With ``probe_repack``, the file is also run with
    llama.cpp's default repacking on, and the report says whether that crashed on this CPU.
    """
    import torch

    ids = evaluator.batches[0][:EXPORT_CHECK_ROWS, :EXPORT_CHECK_POSITIONS]
    theirs = score_gguf(path, ids, f32_cache=True)
    with evaluator.weights.applied(recipe), torch.inference_mode():
        ours = evaluator.model(input_ids=ids).logits.float().cpu()
    if ours.shape != theirs.shape:
        raise QenvError(f"llama.cpp's logits of {path} have shape {tuple(theirs.shape)}, qenv's {tuple(ours.shape)}.",
                        "report it: the written file is not the model qenv scored.")
    with torch.inference_mode():
        full = evaluator.model(input_ids=ids).logits.float().cpu()
    kl, error = mean_kl(ours, theirs), mean_kl(full, ours)
    bar = max(EXPORT_CHECK_MAX_KL, EXPORT_CHECK_RELATIVE * error)
    if not kl <= bar:
        raise QenvError(f"llama.cpp's scores of {path} differ from qenv's by KL {kl:.3g}, more than float noise "
                        f"({bar:.3g}; the quantization's own KL is {error:.3g}): the file is not the model qenv "
                        "measured.",
                        "report it with the recipe; use the recipe.json / llamacpp-quantize.sh export meanwhile.")
    report = (f"model.gguf checked: llama.cpp (repacking off, F32 KV cache) scores {ids.shape[0]} x {ids.shape[1]} "
              f"tokens within KL {kl:.2g} of qenv (quantization KL {error:.2g})")
    if probe_repack:
        try:
            score_gguf(path, ids[:1, :8], repack=True)
        except QenvError as exc:
            report += (f"; with llama.cpp's default repacking it failed on this CPU ({exc.problem}), "
                       f"so {REPACK_WORKAROUND}")
        else:
            report += "; it also runs with llama.cpp's default repacking on this CPU (other CPUs may crash: " \
                      "docs/llama_cpp_repack_crash.md)"
    return report


__all__ = ["EXPORT_CHECK_MAX_KL", "REPACK_WORKAROUND", "check_gguf_export", "mean_kl", "run_llama_cpp",
           "score_gguf", "signal_name", "tokenize_gguf"]
