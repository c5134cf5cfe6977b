"""The Gymnasium environment and its parts (settings, action spaces, features, rewards)."""

from qenv.envs.config import EnvConfig

__all__ = ["EnvConfig"]
