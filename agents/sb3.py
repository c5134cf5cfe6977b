"""Stable-Baselines3 algorithms behind the agent protocol.

``ppo`` (the default), ``a2c``, ``dqn``, ``sac``, ``td3`` and ``ddpg`` come from SB3;
``recurrent_ppo`` comes from sb3-contrib when it is installed (``pip install sb3-contrib``).
Each wrapper builds the SB3 model as ``Algorithm(policy, env, seed=seed, verbose=0,
device="cpu", **hyperparams)`` and exposes it as ``.model``; ``learn``, ``predict``, ``save`` and
``load`` are SB3's own (``save`` writes ``<path>.zip``).

Defaults differ from SB3's in three places only: ``device="cpu"`` (the policies are small MLPs;
the model under quantization may still run on a GPU), a replay buffer of 100k transitions for
the off-policy algorithms (an episode is one step per layer, so 1M transitions is more than a
run ever collects), and Gaussian action noise (σ=0.1) for TD3 and DDPG, which otherwise explore
only through their initial weights. Any hyperparameter passed in wins.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from qenv.envs.spaces import ACTION_SPACE_KINDS
from qenv.errors import QenvError


class SB3Agent:
    """A Stable-Baselines3 algorithm as a qenv agent (``.model`` is the SB3 model)."""

    name: ClassVar[str] = "ppo"
    module: ClassVar[str] = "stable_baselines3"
    class_name: ClassVar[str] = "PPO"
    default_policy: ClassVar[str] = "MlpPolicy"
    action_kinds: ClassVar[tuple[str, ...]] = ACTION_SPACE_KINDS
    install_hint: ClassVar[str] = "pip install stable-baselines3"

    def __init__(self, env: Any, seed: int = 0, policy: str | type | None = None, verbose: int = 0,
                 device: str = "cpu", **hyperparams: Any) -> None:
        algorithm = self.algorithm_class()
        kwargs = {**self.default_hyperparams(env), **hyperparams}
        self.seed = seed
        self.model = algorithm(policy or self.default_policy, env, seed=seed, verbose=verbose, device=device, **kwargs)

    @classmethod
    def algorithm_class(cls) -> Any:
        try:
            module = importlib.import_module(cls.module)
        except ImportError:
            package = cls.module.replace("_", "-")
            raise QenvError(f"Agent {cls.name!r} needs the {package} package, which is not installed.",
                            f"{cls.install_hint}, or pick another agent.") from None
        return getattr(module, cls.class_name)

    def default_hyperparams(self, env: Any) -> dict[str, Any]:
        return {}

    @property
    def env(self) -> Any:
        return self.model.get_env()

    @property
    def num_timesteps(self) -> int:
        return int(self.model.num_timesteps)

    def learn(self, total_timesteps: int, callback: Any = None, progress_bar: bool = False, **kwargs: Any) -> SB3Agent:
        if int(total_timesteps) < 1:
            raise QenvError(f"total_timesteps={total_timesteps} must be at least 1.")
        self.model.learn(total_timesteps=int(total_timesteps), callback=callback, progress_bar=progress_bar, **kwargs)
        return self

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> tuple[np.ndarray, Any]:
        return self.model.predict(observation, state=state, episode_start=episode_start, deterministic=deterministic)

    def save(self, path: str | Path) -> Path:
        """Save the SB3 model (SB3 appends ``.zip`` when ``path`` has no suffix); returns the file."""
        path = Path(path)
        self.model.save(path)
        return path if path.suffix else path.with_name(path.name + ".zip")

    @classmethod
    def load(cls, path: str | Path, env: Any = None, device: str = "cpu", **kwargs: Any) -> SB3Agent:
        path = Path(path)
        if not path.is_file() and not path.with_name(path.name + ".zip").is_file():
            raise QenvError(f"No saved {cls.name} model at {path}.", "pass the .zip written by agent.save().")
        agent = cls.__new__(cls)
        agent.model = cls.algorithm_class().load(path, env=env, device=device, **kwargs)
        agent.seed = agent.model.seed
        return agent

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.class_name}, seed={self.seed})"


class _OffPolicy(SB3Agent):
    def default_hyperparams(self, env: Any) -> dict[str, Any]:
        return {"buffer_size": 100_000}


class _NoisyOffPolicy(_OffPolicy):
    def default_hyperparams(self, env: Any) -> dict[str, Any]:
        from stable_baselines3.common.noise import NormalActionNoise

        n = int(np.prod(env.action_space.shape))
        return {**super().default_hyperparams(env), "action_noise": NormalActionNoise(np.zeros(n), 0.1 * np.ones(n))}


class PPOAgent(SB3Agent):
    name, class_name = "ppo", "PPO"


class A2CAgent(SB3Agent):
    name, class_name = "a2c", "A2C"


class DQNAgent(_OffPolicy):
    name, class_name, action_kinds = "dqn", "DQN", ("discrete",)


class SACAgent(_OffPolicy):
    name, class_name, action_kinds = "sac", "SAC", ("continuous",)


class TD3Agent(_NoisyOffPolicy):
    name, class_name, action_kinds = "td3", "TD3", ("continuous",)


class DDPGAgent(_NoisyOffPolicy):
    name, class_name, action_kinds = "ddpg", "DDPG", ("continuous",)


class RecurrentPPOAgent(SB3Agent):
    """PPO with an LSTM policy; pass back ``state`` and ``episode_start`` to ``predict``."""

    name, module, class_name, default_policy = "recurrent_ppo", "sb3_contrib", "RecurrentPPO", "MlpLstmPolicy"
    install_hint = "pip install sb3-contrib (or pip install 'qenv[contrib]')"


SB3_AGENTS: dict[str, type[SB3Agent]] = {
    cls.name: cls for cls in (PPOAgent, A2CAgent, DQNAgent, SACAgent, TD3Agent, DDPGAgent, RecurrentPPOAgent)
}
