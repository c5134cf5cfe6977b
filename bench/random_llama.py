"""Random-weight Llama models of a given size, wrapped as a :class:`qenv.LoadedModel`.

Used by the speed benchmarks to time the environment on models of realistic width and depth
without downloading anything. The weights are drawn by ``transformers``' own initializer under a
fixed seed, directly on the target device (so a 1B model is built in seconds on a GPU).
"""

from __future__ import annotations

from typing import Any

import torch

from qenv.models.layers import discover_layers, find_blocks
from qenv.models.loading import LoadedModel, _fingerprint, resolve_device, resolve_dtype, weights_fingerprint

#: size name -> LlamaConfig fields (vocabulary 32000, like Llama-2 / TinyLlama).
SIZES: dict[str, dict[str, Any]] = {
    # ~100M: 12 blocks of width 768 (GQA 12/4 heads), tied embeddings
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, tie_word_embeddings=True),
    # ~500M: 16 blocks of width 1536 (GQA 12/4 heads), untied head
    "500m": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
                 num_key_value_heads=4, tie_word_embeddings=False),
    # ~1B: Llama-3.2-1B's shape (16 blocks of width 2048, MLP 8192, GQA 32/8) with a 32k vocabulary
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    # SmolLM2-135M's shape (30 blocks of width 576, MLP 1536, GQA 9/3, vocabulary 49152, tied): times the
    # environment like the real model on a machine that does not hold its GGUF
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, tie_word_embeddings=True, vocab_size=49152, rope_theta=100000.0),
}


def random_llama_config(size: str, **overrides: Any):
    from transformers import LlamaConfig

    key = size.lower()
    if key not in SIZES:
        raise ValueError(f"unknown random-llama size {size!r}; use one of {sorted(SIZES)}")
    fields = dict(vocab_size=32000, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    fields.update(SIZES[key])
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_random_llama(size: str, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                       seed: int = 0, **overrides: Any) -> LoadedModel:
    """A random-weight ``LlamaForCausalLM`` of ``size`` (see :data:`SIZES`) as a ``LoadedModel``."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    config = random_llama_config(size, **overrides)
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(dev):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    model = model.to(dev).eval()
    model.requires_grad_(False)
    name = f"random-llama-{size.lower()}"
    return LoadedModel(model=model, tokenizer=None, name=name, spec=name, layers=discover_layers(model),
                       fingerprint=weights_fingerprint(model), blocks_path=find_blocks(model)[0],
                       cache_key=_fingerprint(model, dt))
