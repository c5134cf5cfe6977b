"""Episodes and recipes of QuantLLM-v0, for every agent: play one, score one, map a rule back to an action.

These helpers sit in the library (not in ``qenv.agents``) because the library's own workers
(``qenv.distributed``) and the agents both need them, and the library never imports the
programs' layer. ``qenv.agents.base`` re-exports them for plug-in authors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qenv.envs.features import EPISODE_NAMES, OBS_DIM, STATIC_NAMES
from qenv.envs.spaces import ActionMapper
from qenv.errors import QenvError
from qenv.quant.rules import Recipe, Rule

#: where the "layers left" fraction sits in an observation: 1.0 at the first step of an episode
LAYERS_LEFT_INDEX = len(STATIC_NAMES) + EPISODE_NAMES.index("layers_left")


def base_env(env: Any) -> Any:
    """The ``QuantLLMEnv`` under any Gymnasium wrappers, or a clear error."""
    inner = getattr(env, "unwrapped", env)
    if not (hasattr(inner, "task") and hasattr(inner, "mapper") and hasattr(inner, "budget_bpw")):
        raise QenvError(f"{type(env).__name__} is not a QuantLLM-v0 environment.",
                        "pass an env made by gymnasium.make('QuantLLM-v0', ...) or qenv.envs.quant_llm.QuantLLMEnv.")
    return inner


def action_kind(env: Any) -> str:
    """The action kind of ``env`` (``discrete``, ``residual``, ...; a plain Gymnasium env: its space's family)."""
    from gymnasium import spaces

    mapper = getattr(getattr(env, "unwrapped", env), "mapper", None)
    if isinstance(mapper, ActionMapper):
        return mapper.kind
    space = getattr(env, "action_space", None)
    if isinstance(space, spaces.Discrete):
        return "discrete"
    if isinstance(space, spaces.MultiDiscrete):
        return "multidiscrete"
    if isinstance(space, spaces.Box):
        return "continuous"
    raise QenvError(f"Cannot tell the action-space kind of {type(env).__name__} ({space!r}).",
                    "pass a QuantLLM-v0 environment.")


def rule_to_action(mapper: ActionMapper, rule: Rule) -> np.ndarray:
    """The action of ``mapper``'s space that produces ``rule`` (inverse of ``mapper.to_rule``).

    Discrete: the menu index; multidiscrete: the knob indices; continuous: the centre of each
    knob's bin in [-1, 1]. A rule the space cannot produce is a :class:`QenvError`.
    """
    if mapper.stateful:
        raise QenvError(f"The {mapper.kind!r} action space has no fixed action per rule (its actions are read against "
                        "the episode's state).", "use an env with action_kind discrete, multidiscrete, continuous or rule.")
    if mapper.kind == "discrete":
        if rule not in mapper.menu:
            raise QenvError(f"Rule {rule.label()} is not on the environment's menu.",
                            "add it to the env's menu, or use a rule from env.mapper.rules.")
        action = np.asarray(mapper.menu.index(rule), dtype=np.int64)
    else:
        idx = mapper.rule_indices(rule)
        if idx is None:
            raise QenvError(f"Rule {rule.label()} is not one the {mapper.kind} action space can produce.",
                            "use a rule from env.mapper.rules.")
        if mapper.kind != "continuous":
            action = np.asarray(idx, dtype=np.int64)
        else:
            action = np.asarray([(2 * i + 1) / len(k) - 1.0 for i, k in zip(idx, mapper.knobs)], dtype=np.float32)
    if mapper.to_rule(action) != rule:
        raise QenvError(f"Rule {rule.label()} is not one the {mapper.kind} action space can produce.",
                        "use a rule from env.mapper.rules.")
    return action


def layer_index_of(observation: np.ndarray, n_layers: int) -> np.ndarray | None:
    """The step index within the episode that a batch of observations was taken at (or ``None``
    when the observations do not have the environment's layout)."""
    obs = np.asarray(observation, dtype=np.float64)
    if obs.shape[-1] != OBS_DIM:
        return None
    return n_layers - np.rint(obs[..., LAYERS_LEFT_INDEX] * n_layers).astype(np.int64)


def recipe_of(info: Mapping[str, Any]) -> Recipe:
    """The recipe in an episode's terminal ``info``."""
    if "recipe_rules" not in info:
        raise QenvError("The episode ended without a recipe in its info (was it truncated by a wrapper?).",
                        "run full episodes: QuantLLM-v0 terminates after the last layer.")
    return Recipe({name: Rule.from_dict(rule) for name, rule in info["recipe_rules"].items()})


def rollout_recipe(agent: Any, env: Any, deterministic: bool = True,
                   reset_options: dict[str, Any] | None = None) -> tuple[Recipe, dict[str, Any]]:
    """Run one episode with ``agent.predict`` and return its recipe and terminal ``info``.

    ``info`` is the environment's terminal info (kl, ppl, top1, bpw, reference_kl, recipe, ...)
    plus ``episode_return``, the sum of the episode's rewards.
    """
    import inspect

    obs, _ = env.reset(options=reset_options)
    state: Any = None
    start = True
    total = 0.0
    try:
        masked = "action_masks" in inspect.signature(agent.predict).parameters
    except (TypeError, ValueError):
        masked = False
    masks_of = getattr(getattr(env, "unwrapped", env), "action_masks", None) if masked else None
    while True:
        extra = {"action_masks": masks_of()} if callable(masks_of) else {}
        action, state = agent.predict(obs, state=state, episode_start=np.array([start]), deterministic=deterministic,
                                      **extra)
        obs, reward, terminated, truncated, info = env.step(action)
        total += float(reward)
        start = False
        if terminated or truncated:
            break
    return recipe_of(info), {**info, "episode_return": total}


def score_recipe(env: Any, recipe: Mapping[str, Rule], max_batches: int | None = None) -> tuple[float, dict[str, Any]]:
    """Evaluate any recipe with ``env``'s evaluator and reward, without stepping the env.

    The full evaluation uses the streaming path (as episodes do, sharing its prefix cache);
    ``max_batches`` scores only the first token batches instead (a cheap, noisier estimate).
    Returns ``(reward, info)`` with the keys of the environment's terminal info.
    """
    inner = base_env(env)
    task = inner.task
    recipe = Recipe(dict(recipe))
    ev = task.evaluator
    metrics = ev.evaluate_blockwise(recipe) if max_batches is None else ev.evaluate(recipe, max_batches=max_batches)
    full = {layer.name: recipe.rule_for(layer.name) for layer in task.layers}
    reward, info = inner.score(metrics, full)
    info["episode_return"] = reward
    return reward, info


def play_episode(env: Any, actions: Sequence[Any]) -> dict[str, Any]:
    """Play one episode with these actions: ``{"reward": return, **terminal info, "episode_return",
    "budget_met"}``."""
    inner = base_env(env)
    env.reset()
    total, info, terminated = 0.0, {}, False
    for action in actions:
        _, reward, terminated, truncated, info = env.step(action)
        total += float(reward)
    if not terminated:
        raise QenvError("The environment did not end after one action per layer.",
                        "evaluate recipes with a plain QuantLLM-v0 env, without step-limiting wrappers.")
    return {"reward": total, **info, "episode_return": total, "budget_met": info["bpw"] <= inner.budget_bpw + 1e-9}
