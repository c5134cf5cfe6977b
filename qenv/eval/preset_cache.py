"""Human presets' metrics, cached on disk: a baseline is scored once per model, tokens and settings.

``eval_agent.py`` compares every policy with the same human presets (rtn/gptq/awq widths,
llama.cpp's mixes), which do not depend on the policy: on a real model they were most of its
run time. :func:`cached_metrics` reads a recipe's :class:`~qenv.eval.evaluator.Metrics` from qenv's
cache folder (``presets-v1-<key>.npy``) or scores it with the evaluator and writes it there
atomically. The key is everything that changes the numbers: the model's fingerprint, the scored
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

import numpy as np

from qenv.eval.reference import batching_key, numerics_key
from qenv.io import read_cached_array, write_cached_array
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


def metrics_cache_path(evaluator: Any, recipe: Mapping[str, Rule]) -> Path | None:
    """Where ``recipe``'s metrics on ``evaluator`` are cached (``None`` when it has no cache folder)."""
    if evaluator.cache_dir is None:
        return None
    from qenv import __version__

    text = "\n".join([evaluator.loaded.fingerprint, evaluator.tokens.fingerprint, calibration_fingerprint(evaluator),
                      recipe_key(evaluator.layers, recipe), "b" + batching_key(evaluator.batches),
                      numerics_key(evaluator.loaded.device), __version__])
    return Path(evaluator.cache_dir) / f"{_STEM}-{hashlib.sha1(text.encode()).hexdigest()[:20]}.npy"


def cached_metrics(evaluator: Any, recipe: Mapping[str, Rule]) -> tuple[Any, bool]:
    """``(metrics, from_cache)``: ``evaluator.evaluate(recipe)``, read from the cache when it was measured
    before under the same key, else measured and written (whole or not at all)."""
    from qenv.eval.evaluator import Metrics

    path = metrics_cache_path(evaluator, recipe)
    cached = read_cached_array(path, (len(_FIELDS),))
    if cached is not None and cached.dtype == np.float64 and np.isfinite(cached[3:]).all():
        values = dict(zip(_FIELDS, (float(v) for v in cached)))
        return Metrics(kl=values["kl"], ppl=values["ppl"], top1=values["top1"], bpw=values["bpw"],
                       model_bytes=int(values["model_bytes"]), n_tokens=int(values["n_tokens"])), True
    metrics = evaluator.evaluate(recipe)
    write_cached_array(path, np.array([float(getattr(metrics, f)) for f in _FIELDS], dtype=np.float64))
    return metrics, False


__all__ = ["cached_metrics", "calibration_fingerprint", "metrics_cache_path", "recipe_key"]
