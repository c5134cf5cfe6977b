"""qenv: LLM quantization as a reinforcement-learning problem.

``import qenv`` registers the Gymnasium environment ``QuantLLM-v0``.
"""

from __future__ import annotations

import gymnasium

from qenv.errors import QenvError
from qenv.eval.evaluator import Evaluator, Metrics
from qenv.eval.tokens import TokenSet, tokens_from_model, tokens_from_text
from qenv.models.layers import LayerInfo, discover_layers
from qenv.models.loading import LoadedModel, load_model
from qenv.quant.presets import preset
from qenv.quant.quantizer import quantize_matrix
from qenv.quant.rules import KEEP, Recipe, Rule, layer_bits

__version__ = "0.1.0"
ENV_ID = "QuantLLM-v0"

if ENV_ID not in gymnasium.registry:
    # no max_episode_steps: an episode is one step per layer of its model, so it has no fixed length
    # (see QuantLLMEnv's docstring); every episode terminates by itself
    gymnasium.register(id=ENV_ID, entry_point="qenv.envs.quant_llm:QuantLLMEnv")

__all__ = [
    "ENV_ID", "KEEP", "Evaluator", "LayerInfo", "LoadedModel", "Metrics", "QenvError", "Recipe", "Rule", "TokenSet",
    "discover_layers", "layer_bits", "load_model", "preset", "quantize_matrix", "tokens_from_model",
    "tokens_from_text",
]
