"""Shared pieces of qenv's command-line programs (``train_agent.py``, ``eval_agent.py``).

- :mod:`qenv.cli.common`: one-line errors (``error: <problem> Fix: <fix>``, exit 2), an argument
  parser that reports through them, run folders, ``key=value`` parsing, quiet library output.
- :mod:`qenv.cli.config`: rl-zoo style YAML hyperparameter files, keyed by environment id.
- :mod:`qenv.cli.envs`: environment factories that work in ``SubprocVecEnv`` workers.
"""

from __future__ import annotations

from qenv.cli.common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    ArgumentParser,
    new_run_dir,
    parse_key_values,
    quiet_libraries,
    run_cli,
)
from qenv.cli.config import RESERVED_KEYS, AgentConfig, load_agent_config
from qenv.cli.envs import ENV_ID, env_id_of, make_quant_env, make_vec, strip_env_id

__all__ = [
    "ENV_ID", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "RESERVED_KEYS", "AgentConfig", "ArgumentParser", "env_id_of",
    "load_agent_config", "make_quant_env", "make_vec", "new_run_dir", "parse_key_values", "quiet_libraries",
    "run_cli", "strip_env_id",
]
