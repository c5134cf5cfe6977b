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

One keyword is qenv's own, not SB3's: ``plan_deviations=d`` starts a categorical policy on the
``residual`` action kind at greedy's plan (:func:`start_at_plan`; configs set it in their
``qenv:`` section, which rl-zoo3 does not read).
"""

from __future__ import annotations

import importlib
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from qenv.envs.spaces import ACTION_SPACE_KINDS, MASKABLE_KINDS
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
                 device: str = "cpu", plan_deviations: float | None = None, **hyperparams: Any) -> None:
        """``plan_deviations`` (qenv's, not SB3's; configs put it in the ``qenv:`` section): start
        the policy at the plan of the ``residual`` action kind; see :func:`start_at_plan`."""
        algorithm = self.algorithm_class()
        kwargs = {**self.default_hyperparams(env), **hyperparams}
        self.seed = seed
        self.model = algorithm(policy or self.default_policy, env, seed=seed, verbose=verbose, device=device, **kwargs)
        if plan_deviations is not None:
            start_at_plan(self.model, plan_deviations)

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
        """Save the SB3 model (SB3 appends ``.zip`` when ``path`` has no suffix); returns the file.

        The zip also records which agent wrote it (``qenv_agent.json``, which SB3 ignores), so that
        loading it as another algorithm is refused by name instead of failing or mislabelling."""
        path = Path(path)
        self.model.save(path)
        file = path if path.suffix else path.with_name(path.name + ".zip")
        with zipfile.ZipFile(file, "a") as archive:
            archive.writestr(AGENT_ENTRY, json.dumps({"agent": self.name, "algorithm": self.class_name}))
        return file

    @classmethod
    def load(cls, path: str | Path, env: Any = None, device: str = "cpu", **kwargs: Any) -> SB3Agent:
        path = Path(path)
        if not path.is_file() and not path.with_name(path.name + ".zip").is_file():
            raise QenvError(f"No saved {cls.name} model at {path}.", "pass the .zip written by agent.save().")
        file = path if path.is_file() else path.with_name(path.name + ".zip")
        check_zip_sizes(file)
        saved = agent_name_of_zip(file)
        if saved is not None and saved != cls.name:
            if saved not in SB3_AGENTS:  # a plug-in's record: not repeated back as advice (the file chose it)
                raise QenvError(f"The saved agent {file} was not trained with {cls.class_name} ({cls.name}): it "
                                "records another agent, which is not a registered one.",
                                "pass --agent yourself: the plug-in that trained it if you wrote or trust it.")
            raise QenvError(f"The saved agent {file} was trained with {SB3_AGENTS[saved].class_name} ({saved}), not "
                            f"{cls.class_name} ({cls.name}).", f"load it as {saved} (--agent {saved}), or leave "
                                                               "--agent out to use the run's agent.")
        # SB3 would cloudpickle.loads the zip's non-JSON entries, which runs whatever code the file
        # holds; they are unpickled here with an allow-list instead and handed over as custom_objects.
        custom_objects = {**safe_custom_objects(file), **(kwargs.pop("custom_objects", None) or {})}
        agent = cls.__new__(cls)
        try:
            agent.model = cls.algorithm_class().load(file, env=env, device=device, custom_objects=custom_objects,
                                                     **kwargs)
        except pickle.UnpicklingError:  # torch.load(weights_only=True) met a pickled object among the tensors
            # (torch's own text suggests weights_only=False, which would run it: not repeated)
            raise QenvError(f"The agent file {file} holds pickled Python objects among its tensors (policy.pth or "
                            "pytorch_variables.pth), which qenv does not load: unpickling them could run arbitrary "
                            "code.", "use agent files written by qenv (train_agent.py) or Stable-Baselines3 with "
                                     "standard policies.") from None
        except (ValueError, KeyError, AssertionError, RuntimeError) as exc:
            import torch

            if isinstance(exc, torch.OutOfMemoryError):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if _trained_on_the_old_gguf_menu(env, first):
                raise QenvError(f"The saved agent {file} was trained on menu='gguf' before Q6_K with the importance "
                                "matrix joined it (18 rules, now 19), so its actions no longer name the same rules.",
                                "train it again on menu='gguf' (its recipes, e.g. recipe.json, still load), or use "
                                "a knob action kind (multidiscrete, continuous, rule), whose space did not change."
                                ) from None
            raise QenvError(f"The saved agent {file} cannot be loaded as {cls.name} for this environment ({first}).",
                            "evaluate it with the agent that trained it (--agent) on an environment with the same "
                            "action_kind and menu it was trained with.") from None
        agent.seed = agent.model.seed
        return agent

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.class_name}, seed={self.seed})"


# -- residual policy learning: start at the plan ------------------------------------------------
def plan_bias(deviations: float, episode_length: float, n_actions: int) -> float:
    """The logit of action 0 (all other logits 0) at which a categorical policy over ``n_actions``
    deviates from action 0 with probability ``deviations / episode_length`` per step, i.e.
    ``deviations`` times per episode in expectation:
    ``P(a != 0) = (n - 1) / (e^b + n - 1) = p``  gives  ``b = log((n - 1) (1 - p) / p)``."""
    p = float(deviations) / float(episode_length)
    if not 0.0 < p < 1.0:
        raise QenvError(f"plan_deviations={deviations:g} must be more than 0 and fewer than the episode's "
                        f"{episode_length:g} steps.", "pass e.g. plan_deviations: 2 (in the config's qenv: section).")
    return float(np.log((n_actions - 1) * (1.0 - p) / p))


def start_at_plan(model: Any, deviations: float) -> float:
    """Initialise ``model``'s action head so that the untrained policy keeps the plan (residual
    policy learning): the ``residual`` action kind's action 0 keeps greedy's plan for the layer,
    so a policy that starts near-uniform over its 7 actions deviates on most layers of a long
    episode (on a 210-layer model it starts far below greedy and did not learn in 282 episodes).

    The action head's weights are set to 0 and its bias to ``plan_bias`` for action 0 (0 for the
    others), so that before any update the policy is the same on every observation: its
    deterministic action is 0 everywhere (one deterministic rollout is exactly greedy's recipe) and
    it deviates with probability ``deviations / L`` per step, where L is the mean episode length
    over the env's models (fewer where the action masks hide shifts). The hidden layers keep their
    initialisation; the head's weights get gradients from the first update on. Returns the bias.

    Only for a categorical policy (PPO, MaskablePPO, A2C, RecurrentPPO) on the ``residual`` kind,
    where action 0 is the plan; anything else is a :class:`QenvError`.
    """
    import torch
    from gymnasium import spaces

    env = model.get_env()
    head = getattr(getattr(model, "policy", None), "action_net", None)
    if not isinstance(model.action_space, spaces.Discrete) or not isinstance(head, torch.nn.Linear):
        raise QenvError(f"plan_deviations needs a policy with one categorical action head over a Discrete action "
                        f"space; {type(model).__name__} on {model.action_space} has none.",
                        "use it with ppo or maskable_ppo on action_kind residual, or leave plan_deviations out.")
    kind = action_kind_of_vec(env)
    if kind != "residual":
        raise QenvError(f"plan_deviations starts the policy at action 0, which keeps the plan only on the residual "
                        f"action kind, not on {kind!r}.",
                        "train on --env-kwargs action_kind=residual, or leave plan_deviations out.")
    lengths = [int(n) for n in env.get_attr("model_episode_lengths", indices=[0])[0]]
    bias = plan_bias(deviations, float(np.mean(lengths)), int(model.action_space.n))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[0] = bias
    return bias


def action_kind_of_vec(env: Any) -> str:
    """The action kind of the first env of an SB3 vec env (or of a plain env)."""
    from qenv.envs.episodes import action_kind

    if hasattr(env, "get_attr"):
        mapper = env.get_attr("mapper", indices=[0])[0]
        return str(mapper.kind)
    return action_kind(env)


# -- safe loading of SB3 zips: qenv.sb3_zip (the library loads the policies it ships with it too) ----
from qenv.sb3_zip import (  # noqa: E402,F401  (re-exported: the agents' layer's names for them)
    _SAFE_NAMES, AGENT_ENTRY, MAX_DATA_BYTES, MAX_ENTRY_BYTES, MAX_ZIP_BYTES, UNNAMED_AGENT, _AllowListUnpickler,
    _loads, _read_entry, _Refused, agent_name_of_zip, check_zip_sizes, safe_custom_objects,
)


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


class MaskablePPOAgent(SB3Agent):
    """sb3-contrib's MaskablePPO: samples only actions that ``env.action_masks()`` allows, so the
    budget is never broken and nothing is lowered; ``predict`` reads the masks of the env it was
    given (or of ``action_masks=`` when passed)."""

    name, module, class_name = "maskable_ppo", "sb3_contrib", "MaskablePPO"
    action_kinds = MASKABLE_KINDS
    install_hint = "pip install sb3-contrib (or pip install 'qenv[contrib]')"

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None,
                deterministic: bool = True, action_masks: Any = None) -> tuple[np.ndarray, Any]:
        if action_masks is None:
            action_masks = _masks_of(self.model.get_env())
        return self.model.predict(observation, state=state, episode_start=episode_start, deterministic=deterministic,
                                  action_masks=action_masks)


def _masks_of(env: Any) -> Any:
    """The current action masks of a (vector) env, or ``None``."""
    if env is None:
        return None
    if hasattr(env, "env_method"):
        try:
            return np.stack(env.env_method("action_masks"))
        except (AttributeError, QenvError):
            return None
    inner = getattr(env, "unwrapped", env)
    method = getattr(inner, "action_masks", None)
    return method() if callable(method) else None


SB3_AGENTS: dict[str, type[SB3Agent]] = {
    cls.name: cls for cls in (PPOAgent, MaskablePPOAgent, A2CAgent, DQNAgent, SACAgent, TD3Agent, DDPGAgent,
                              RecurrentPPOAgent)
}


# -- observation normalisation (rl-zoo's ``normalize``) ------------------------------------------
def normalizer_state(vec: Any) -> dict[str, Any]:
    """The observation statistics of a ``VecNormalize`` as plain JSON numbers (not a pickle, so
    that reading them back can run no code)."""
    rms = vec.obs_rms
    return {"norm_obs": bool(vec.norm_obs), "norm_reward": bool(vec.norm_reward), "mean": np.asarray(rms.mean).tolist(),
            "var": np.asarray(rms.var).tolist(), "count": float(rms.count), "clip_obs": float(vec.clip_obs),
            "clip_reward": float(vec.clip_reward), "epsilon": float(vec.epsilon), "gamma": float(vec.gamma)}


def _observation_size(space: Any) -> int | None:
    shape = tuple(getattr(space, "shape", None) or ())
    return int(np.prod(shape)) if shape else None


def check_normalizer_state(state: Any, source: str | Path, size: int | None = None,
                           fix: str = "delete it, or retrain the policy.") -> dict[str, Any]:
    """Saved ``VecNormalize`` statistics (a file: input) checked before use, one error for any damage:
    ``mean``/``var`` lists of ``size`` finite numbers, variances at least 0, a positive count,
    ``clip_obs`` and ``epsilon`` positive numbers. Returns ``state``."""
    def bad(why: str) -> QenvError:
        return QenvError(f"Normalisation statistics {source} are damaged ({why}).", fix)

    def number(key: str, positive: bool) -> float:
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or \
                (positive and value <= 0):
            raise bad(f"{key}={value!r} is not a {'positive ' if positive else ''}number")
        return float(value)

    if not isinstance(state, dict):
        raise bad("not a JSON object")
    missing = [k for k in ("mean", "var", "count", "clip_obs", "epsilon") if k not in state]
    if missing:
        raise bad(f"no {', '.join(missing)}")
    arrays = {}
    for key in ("mean", "var"):
        value = state[key]
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value):
            raise bad(f"{key} is not a list of numbers")
        arrays[key] = np.asarray(value, dtype=np.float64)
        if not np.isfinite(arrays[key]).all():
            raise bad(f"{key} holds NaN or inf")
    if len(arrays["mean"]) != len(arrays["var"]) or (size is not None and len(arrays["mean"]) != size):
        want = f"{size}, the observation size" if size is not None else "equal lengths"
        raise bad(f"mean has {len(arrays['mean'])} entries and var {len(arrays['var'])}, not {want}")
    if (arrays["var"] < 0).any():
        raise bad(f"var holds a negative variance ({float(arrays['var'].min()):g})")
    number("count", True), number("clip_obs", True), number("epsilon", True)
    if not isinstance(state.get("norm_obs", True), bool):
        raise bad(f"norm_obs={state['norm_obs']!r} is not true or false")
    return state


def _trained_on_the_old_gguf_menu(env: Any, error: str) -> bool:
    """True when SB3 refused a discrete agent of the gguf menu's old size on an env of the gguf menu."""
    from qenv.quant.gguf import OLD_MENU_SIZE

    envs = getattr(env, "envs", None) or [env]  # a VecEnv holds its envs
    rules = getattr(getattr(getattr(envs[0], "unwrapped", envs[0]), "mapper", None), "menu", None)
    return bool(rules) and all(getattr(r, "gguf", None) for r in rules) and f"Discrete({OLD_MENU_SIZE})" in error


def load_normalizer_state(vec: Any, state: dict[str, Any], source: str | Path = "vecnormalize.json") -> None:
    """Put saved statistics back into a ``VecNormalize`` (resuming a run), checked first."""
    check_normalizer_state(state, source, _observation_size(vec.observation_space),
                           "delete it to resume with fresh statistics.")
    vec.obs_rms.mean = np.asarray(state["mean"], dtype=np.float64)
    vec.obs_rms.var = np.asarray(state["var"], dtype=np.float64)
    vec.obs_rms.count = float(state["count"])


class NormalizedAgent:
    """An agent trained behind ``VecNormalize``, acting on raw observations: ``predict`` scales
    them with the training statistics first (the rest is the wrapped agent's)."""

    def __init__(self, agent: Any, state: dict[str, Any], source: str | Path = "vecnormalize.json") -> None:
        space = getattr(getattr(agent, "model", None), "observation_space", None) or \
            getattr(agent, "observation_space", None)  # a qenv agent's SB3 model, or an SB3 model itself
        check_normalizer_state(state, source, _observation_size(space))
        self.agent = agent
        self.state = state
        self._mean = np.asarray(state["mean"], dtype=np.float64)
        self._scale = np.sqrt(np.asarray(state["var"], dtype=np.float64) + float(state["epsilon"]))

    def normalize(self, observation: Any) -> np.ndarray:
        obs = np.asarray(observation, dtype=np.float64)
        if not self.state.get("norm_obs", True):
            return obs.astype(np.float32)
        clip = float(self.state["clip_obs"])
        return np.clip((obs - self._mean) / self._scale, -clip, clip).astype(np.float32)

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None, deterministic: bool = True,
                action_masks: Any = None) -> tuple[np.ndarray, Any]:
        import inspect

        takes_masks = "action_masks" in inspect.signature(self.agent.predict).parameters
        extra = {"action_masks": action_masks} if action_masks is not None and takes_masks else {}
        return self.agent.predict(self.normalize(observation), state=state, episode_start=episode_start,
                                  deterministic=deterministic, **extra)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.agent, name)
