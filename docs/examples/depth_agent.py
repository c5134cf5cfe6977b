"""Bits by depth: more bits for the first and last blocks; learn() picks how many more."""
import json
from pathlib import Path

import numpy as np
from qenv.agents.base import rollout_recipe
from qenv.envs.features import EPISODE_NAMES, STATIC_NAMES


class DepthAgent:
    action_kinds = ("discrete",)  # picks from the env's menu of rules
    DEPTH = STATIC_NAMES.index("depth")  # observation entries: 0..1 through the model, bpw left / 16
    BPW_LEFT = len(STATIC_NAMES) + EPISODE_NAMES.index("bpw_left_for_rest")

    def __init__(self, env, seed=0, bonuses=(0.0, 0.5, 1.0, 2.0), bonus=None):
        self.env, self.seed, self.bonuses = env, seed, [float(b) for b in bonuses]
        self.bonus = self.bonuses[0] if bonus is None else float(bonus)
        self.bits = np.array([rule.bits for rule in env.unwrapped.mapper.menu])

    def learn(self, total_timesteps, callback=None, progress_bar=False):  # a bandit: 1 episode per arm
        returns, n_layers = {}, len(self.env.unwrapped.task.layers)
        for self.bonus in self.bonuses[: max(1, total_timesteps // n_layers)]:
            returns[self.bonus] = rollout_recipe(self, self.env)[1]["episode_return"]
        self.bonus = max(returns, key=returns.get)  # the env is deterministic: keep the best arm
        return self

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        obs = np.asarray(observation, dtype=np.float64)
        edge = np.abs(2 * obs[..., self.DEPTH] - 1)  # 0 in the middle block, near 1 at either end
        target = obs[..., self.BPW_LEFT] * 16 - 0.5 + self.bonus * (edge - 0.5)  # ~0.5 bpw go to scales
        fits = np.where(self.bits <= target[..., None], self.bits, -1)
        return fits.argmax(axis=-1), state  # most bits that fit (the env lowers it if over budget)

    def save(self, path):
        Path(path).write_text(json.dumps({"seed": self.seed, "bonuses": self.bonuses, "bonus": self.bonus}))

    @classmethod
    def load(cls, path, env=None):
        return cls(env, **json.loads(Path(path).read_text()))
