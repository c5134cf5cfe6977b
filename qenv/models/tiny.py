"""Tiny random-weight causal LMs of every supported architecture.

Tests, examples and smoke runs need real ``transformers`` models (real module names, real
``Conv1D``/fused projections, real tied embeddings) without downloading anything. These builders
construct the config classes directly, so they work offline and take well under a second each.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig

from qenv.errors import QenvError

#: Architectures :func:`build_tiny_model` can build (``config.model_type`` names).
TINY_ARCHITECTURES: tuple[str, ...] = (
    "llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox", "opt", "falcon",
)

# Shared sizes: hidden 64 with 4 heads (head_dim 16), 2 KV heads where the architecture has GQA.
_HIDDEN = 64
_HEADS = 4
_KV_HEADS = 2
_INTER = 128
_LAYERS = 2
_VOCAB = 256
_MAX_POS = 256
# Special-token ids must lie inside the tiny vocabulary (several configs default to ids > 256,
# e.g. Phi-3 pad 32000, GPT-2 bos/eos 50256, and embedding lookups of pad ids would go out of range).
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _llama_like(**extra: Any) -> Callable[[], dict[str, Any]]:
    def kwargs() -> dict[str, Any]:
        return dict(
            vocab_size=_VOCAB, hidden_size=_HIDDEN, intermediate_size=_INTER,
            num_hidden_layers=_LAYERS, num_attention_heads=_HEADS, num_key_value_heads=_KV_HEADS,
            max_position_embeddings=_MAX_POS, **_TOKENS, **extra,
        )

    return kwargs


_BUILDERS: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "llama": ("LlamaConfig", _llama_like()),
    # Mistral defaults to a 4096-token sliding window; keep it but below max positions so the
    # sliding-window code path is real.
    "mistral": ("MistralConfig", _llama_like(sliding_window=128)),
    "qwen2": ("Qwen2Config", _llama_like()),
    # Gemma's default head_dim is 256 regardless of hidden size: pin it to hidden/heads.
    "gemma": ("GemmaConfig", _llama_like(head_dim=_HIDDEN // _HEADS)),
    # Phi-3 defaults pad_token_id=32000 (outside the tiny vocab) -> _TOKENS overrides it.
    "phi3": ("Phi3Config", _llama_like(original_max_position_embeddings=_MAX_POS)),
    "gpt2": ("GPT2Config", lambda: dict(
        vocab_size=_VOCAB, n_embd=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS, n_inner=_INTER,
        n_positions=_MAX_POS, **_TOKENS,
    )),
    "gpt_neox": ("GPTNeoXConfig", lambda: dict(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
        intermediate_size=_INTER, max_position_embeddings=_MAX_POS, **_TOKENS,
    )),
    "opt": ("OPTConfig", lambda: dict(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
        ffn_dim=_INTER, word_embed_proj_dim=_HIDDEN, max_position_embeddings=_MAX_POS, **_TOKENS,
    )),
    # Falcon: the "new decoder architecture" (Falcon-40B/180B style) is the one with GQA
    # (num_kv_heads); it ignores multi_query. ffn_hidden_size defaults to 4*hidden otherwise.
    "falcon": ("FalconConfig", lambda: dict(
        vocab_size=_VOCAB, hidden_size=_HIDDEN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
        new_decoder_architecture=True, num_kv_heads=_KV_HEADS, multi_query=False, parallel_attn=True,
        ffn_hidden_size=_INTER, max_position_embeddings=_MAX_POS, alibi=False, bias=False, **_TOKENS,
    )),
}
assert tuple(_BUILDERS) == TINY_ARCHITECTURES


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """An offline config for a tiny ``arch`` model; ``overrides`` replace any config field.

    Built from the config class directly (never ``from_pretrained``) so no network or cache is needed.
    """
    if arch not in _BUILDERS:
        raise QenvError(
            f"Unknown tiny architecture {arch!r}.",
            fix=f"Use one of: {', '.join(TINY_ARCHITECTURES)}.",
        )
    cls_name, kwargs_fn = _BUILDERS[arch]
    cls = getattr(transformers, cls_name)
    kwargs = kwargs_fn()
    kwargs.update(overrides)
    return cls(**kwargs)


def build_tiny_model(
    arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> transformers.PreTrainedModel:
    """A tiny random-weight causal LM in eval mode; the same ``seed`` gives the same weights."""
    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
