"""Human presets' metrics, cached on disk: a baseline is scored once per model, tokens and settings.

``eval_agent.py`` compares every policy with the same human presets (rtn/gptq/awq widths,
llama.cpp's mixes), which do not depend on the policy: on a real model they were most of its
run time. :func:`cached_metrics` reads a recipe's :class:`~qenv.eval.evaluator.Metrics` from qenv's
cache folder (``presets-v1-<hash>.safetensors``, in :mod:`qenv.cache_files`' checked format: the
full key in the header, a checksum, written atomically) or scores it with the evaluator and writes
it there. The key is everything that changes the numbers: the model's fingerprint, the scored
tokens' fingerprint, the calibration tokens' fingerprint (the quantized weights of GPTQ, AWQ and
imatrix rules come from them, which for held-out scoring are not the scored tokens), the recipe
itself (every layer's rule, not the preset's name), the evaluator's batch split, the torch
numerics (:func:`~qenv.eval.reference.numerics_key`) and qenv's version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qenv.cache_files import read_cache_file, write_cache_file
from qenv.eval.reference import batching_key, numerics_key
from qenv.quant.rules import KEEP, Rule

_STEM = "presets-v1"
_FIELDS = ("kl", "ppl", "top1", "bpw", "model_bytes", "n_tokens")


def calibration_fingerprint(evaluator: Any) -> str:
    """Fingerprint of the tokens the evaluator's quantized weights were calibrated on (the evaluator's
    own tokens, or those of the evaluator whose weights it shares, as eval_agent's held-out scorer does)."""
    owner = getattr(getattr(evaluator.weights, "calibration", None), "__self__", None)
    tokens = getattr(owner, "tokens", None) or evaluator.tokens
    return str(tokens.fingerprint)


def recipe_key(layers: Any, recipe: Mapping[str, Rule]) -> str:
    """Every layer's rule, in layer order: two recipes with one key quantize every weight alike."""
    return "|".join(f"{info.name}={recipe.get(info.name, KEEP)!r}" for info in layers)


def metrics_cache_key(evaluator: Any, recipe: Mapping[str, Rule]) -> str:
    """Everything ``recipe``'s metrics on ``evaluator`` depend on, as one string (stored in the file)."""
    from qenv import __version__

    return "\n".join([_STEM, evaluator.loaded.cache_key, evaluator.tokens.fingerprint,
                      calibration_fingerprint(evaluator), recipe_key(evaluator.layers, recipe),
                      "b" + batching_key(evaluator.batches), numerics_key(evaluator.loaded.device), __version__])


def metrics_cache_path(evaluator: Any, recipe: Mapping[str, Rule]) -> Path | None:
    """Where ``recipe``'s metrics on ``evaluator`` are cached (``None`` when it has no cache folder)."""
    if evaluator.cache_dir is None:
        return None
    digest = hashlib.sha1(metrics_cache_key(evaluator, recipe).encode()).hexdigest()[:20]
    return Path(evaluator.cache_dir) / f"{_STEM}-{digest}.safetensors"


def _check(tensors: dict[str, torch.Tensor]) -> str | None:
    values = tensors.get("metrics")
    if values is None or tuple(values.shape) != (len(_FIELDS),) or values.dtype != torch.float64:
        return "it holds no metrics vector"
    if bool(torch.isnan(values).any()) or not bool(torch.isfinite(values[3:]).all()) or bool((values[3:] < 0).any()):
        return "its metrics are not numbers a measurement gives"
    return None


def cached_metrics(evaluator: Any, recipe: Mapping[str, Rule]) -> tuple[Any, bool]:
    """``(metrics, from_cache)``: ``evaluator.evaluate(recipe)``, read from the cache when it was measured
    before under the same key, else measured and written."""
    from qenv.eval.evaluator import Metrics

    path = metrics_cache_path(evaluator, recipe)
    key = metrics_cache_key(evaluator, recipe) if path is not None else ""
    cached = read_cache_file(path, key, _check)
    if cached is not None:
        values = dict(zip(_FIELDS, (float(v) for v in cached["metrics"])))
        return Metrics(kl=values["kl"], ppl=values["ppl"], top1=values["top1"], bpw=values["bpw"],
                       model_bytes=int(values["model_bytes"]), n_tokens=int(values["n_tokens"])), True
    metrics = evaluator.evaluate(recipe)
    if path is not None:
        vector = torch.tensor([float(getattr(metrics, f)) for f in _FIELDS], dtype=torch.float64)
        write_cache_file(path, {"metrics": vector}, key)
    return metrics, False


__all__ = ["cached_metrics", "calibration_fingerprint", "metrics_cache_key", "metrics_cache_path", "recipe_key"]
