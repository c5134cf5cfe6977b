"""Agents that pick survival rules: SB3 algorithms, searchers and plug-ins, behind one protocol.

Importing this package is cheap: SB3 and the searchers load when an agent is built.
"""

from qenv.cli.common import check_agents_checkout

check_agents_checkout()  # before anything of this folder runs: it may be another checkout's (editable install)

from qenv.agents.base import Agent, rollout_recipe, score_recipe  # noqa: E402
from qenv.agents.registry import (  # noqa: E402
    AGENTS, DEFAULT_AGENT, available_agents, load_agent, make_agent, register_agent)

__all__ = [
    "AGENTS", "DEFAULT_AGENT", "Agent", "available_agents", "load_agent", "make_agent", "register_agent",
    "rollout_recipe", "score_recipe",
]
