"""Agents that pick survival rules: SB3 algorithms, searchers and plug-ins, behind one protocol.

Importing this package is cheap: SB3 and the searchers load when an agent is built.
"""

from qenv.agents.base import Agent, rollout_recipe, score_recipe
from qenv.agents.registry import AGENTS, DEFAULT_AGENT, available_agents, load_agent, make_agent, register_agent

__all__ = [
    "AGENTS", "DEFAULT_AGENT", "Agent", "available_agents", "load_agent", "make_agent", "register_agent",
    "rollout_recipe", "score_recipe",
]
