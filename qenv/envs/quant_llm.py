"""``QuantLLM-v0``: an agent fixes one layer's survival rule per step.

An episode walks the model's quantizable layers in forward order. Each step picks the rule of
the next layer; whenever all layers of a block are fixed, the block runs on the hidden states
of the quantized prefix (streaming evaluation), so an episode costs about one forward pass over
the calibration tokens. The episode ends at or under the bit budget, with a reward measured
against the uniform human-designed rule of the same size (see :mod:`qenv.envs.reward`).

How an action becomes a rule depends on ``action_kind`` (:mod:`qenv.envs.spaces`); the
Discrete and MultiDiscrete kinds expose ``action_masks()`` (sb3-contrib's convention) so that
an agent never picks a rule that makes the budget unreachable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from qenv.envs.config import RENDER_MODES, EnvConfig, is_number, check_env_arguments
from qenv.envs.kinds import KINDS, ActionKind, keeps_knobs
from qenv.envs.features import OBS_LIMIT, model_relative, observation_size
from qenv.envs.render import recipe_image, recipe_table
from qenv.envs.reward import check_reward_kind, fidelity_reward
from qenv.envs.spaces import MASKABLE_KINDS
from qenv.envs.task import _TASKS, build_task, inherit_act_scale
from qenv.errors import QenvError
from qenv.eval.evaluator import Metrics, Stream, stage_of
from qenv.models.layers import LayerInfo
from qenv.models.loading import LoadedModel
from qenv.quant.accounting import fallbacks, rule_text
from qenv.quant.rules import Rule, layer_bits

class QuantLLMEnv(gym.Env):
    """Pick a survival rule for each quantizable layer of a causal LM, under a bits-per-weight budget.

    **Description.** An episode walks the model's quantizable layers in forward order; each step
    fixes the rule of the next layer. When a block's layers are all fixed, the block runs on the
    hidden states of the quantized prefix (streaming evaluation), so an episode costs about one
    forward pass over the calibration tokens. Settings: ``EnvConfig`` (``qenv.envs.config``), as
    one config or as its fields in keyword arguments.

    **Action space** (``action_kind``; ``action_masks()`` for the maskable kinds, in sb3-contrib's
    convention, so that no allowed action makes the budget unreachable):

    =============  ============================  =========  =================================================
    kind           space                         maskable   an action means
    =============  ============================  =========  =================================================
    discrete       Discrete(len(menu))           yes        the menu rule with that index
    multidiscrete  MultiDiscrete([6, 4, 3, 2])   yes        bits, group, outlier fraction, rounding
    continuous     Box(-1, 1, (10,))             no         every rule knob in equal bins (HAQ-style): bits,
                                                            group, outliers, rounding (nearest, gptq,
                                                            learned), clip, salience a, b, c, act_scale,
                                                            symmetric
    rule           MultiDiscrete(10 knobs)       yes        the same ten knobs by index
    relative       Discrete(7)                   yes        bits per weight above the even share of the
                                                            budget left (0, +0.5, -0.5, +1, -1, +2, -2):
                                                            the most accurate menu rule at or under it
    residual       Discrete(7)                   yes        a shift along the layer's cost-sorted menu from
                                                            the best start (0, +1, -1, +2, -2, +3, -3);
                                                            action 0 everywhere is the best start's recipe
    allocation     Box(-1, 1, (1,))              no         the layer's preference p; after the last layer,
                                                            the moves that exp(3p) makes in greedy's plan,
                                                            applied to the best start (p = 0: the best start)
    =============  ============================  =========  =================================================

    The plan-based kinds (``residual``, ``allocation``) start from the **best start**
    (``ModelTask.start_plan``): the best measured recipe (KL on the calibration
    tokens) of greedy's plan, the human presets the menu expresses and the uniform rules that fit.
    It is measured once per (model, budget) and process, cached on the task and shared by every
    episode and env of the process; the ``reset`` that measured it says how many evaluations it cost
    (``info["start_evaluations"]``, 0 afterwards) and ``info["start"]`` names it.

    With ``menu="gguf"`` the knob kinds choose (llama.cpp type, importance matrix). An action the
    space does not contain is refused (``QenvError``), never rounded.

    **Observation**: ``Box(-10, 10, (45,), float32)``, every entry clipped to [-10, 10]. Entries 0-33 describe the layer, 34-44 the episode:

    =====  =========================  ===========  ==================================================
    index  feature                    range        meaning
    =====  =========================  ===========  ==================================================
    0      depth                      [0, 1]       where the layer's block sits in the model
    1-14   kind_q ... kind_other      {0, 1}       one-hot layer kind: q, k, v, o, qkv, gate, up,
                                                   down, gate_up, fc_in, fc_out, lm_head, embed, other
    15-16  log_fan_in, log_fan_out    [0, 1]       log2 of the input and output width / 16
    17     log_numel                  [0, 1]       log10 of the layer's weights / 10
    18     param_share                [0, 1]       the layer's share of the quantizable weights
    19-21  w_log_std, _kurtosis,      [-10, 10]    weight statistics (log10)
           _peak
    22-23  x_log_rms, _peak_ratio     [-10, 10]    input-activation statistics (log10)
    24-28  log_err_w2 ... w8          [-10, 10]    log10 relative output error at RTN widths 2, 3, 4,
                                                   6, 8, / 4
    29-33  z_log_err_w2 ... w8        [-10, 10]    the same, z-scored over the model's layers, / 2
    34     budget_bpw                 (0, 1]       the budget / 16
    35     bpw_left_for_rest          [-10, 10]    bits per weight left for this and later layers / 16
    36     budget_used                [0, 10]      bits spent / budget bits
    37     params_left                [0, 1]       weights left / all weights
    38     prev_bits                  [0, 1]       the previous layer's bits / 16 (0: none)
    39     prev_rule                  [0, 1]       (the previous layer's rule index + 1) / rules
    40     layers_left                (0, 1]       layers left, this one included / layers
    41     greedy_bits                [0, 1]       bits greedy gives this layer from what is left / 16
    42     greedy_minus_even          [-10, 10]    (greedy_bits - bpw_left_for_rest) / 4
    43     gain_vs_median             [-10, 10]    log10 of one more bit's error drop here over the
                                                   median of the layers left, / 2
    44     sensitivity_share_left     [-10, 10]    this layer's share of the 3-bit error x size left
    =====  =========================  ===========  ==================================================

    With ``observation="relative"`` the size, statistic and error entries are taken relative to
    the model's median layer, so that no entry says how large the model is.

    **Menu** (the default, ``DEFAULT_MENU``: every human rule, rtn/gptq/awq at 2-8 bits; ``menu=`` takes
    any list of rules, ``"compact"`` for the 13 rules of qenv's earlier default, ``"gguf"``, or
    ``"learned"``: this menu, then 37 ``w2g128a-learned-mse``, 38 ``w3g128a-learned-mse`` and 39
    ``w4g128a-learned-mse``, rules no human preset uses, at GPTQ's size to the bit (2.141, 3.148, 4.156)),
    each rule's bits per weight on a 4096x4096 layer (``qenv.quant.presets.menu_table``):

    ==  ===================  ================  ===============
    #   rule                 human preset      bpw (4096x4096)
    ==  ===================  ================  ===============
    0   w2g64a               rtn-w2-g64        2.281
    1   w2g32a-mse-awq0.5    awq-w2-g32        2.562
    2   w3g128a              rtn-w3            3.148
    3   w3g128a-mse-awq0.5   awq-w3            3.148
    4   w3g128a-gptq         gptq-w3           3.148
    5   w3g32a-mse-awq0.5    awq-w3-g32        3.594
    6   w3g64a-gptq-o0.5%                      3.497
    7   w4g128a              rtn-w4            4.156
    8   w4g128a-mse-awq0.5   awq-w4            4.156
    9   w4g128a-gptq         gptq-w4           4.156
    10  w5g128a              rtn-w5            5.164
    11  w6g128a              rtn-w6            6.172
    12  w8g128a              rtn-w8            8.188
    13  w2g128a              rtn-w2            2.141
    14  w2g128a-gptq         gptq-w2           2.141
    15  w2g128a-mse-awq0.5   awq-w2            2.141
    16  w2g64a-gptq          gptq-w2-g64       2.281
    17  w2g64a-mse-awq0.5    awq-w2-g64        2.281
    18  w2g32a               rtn-w2-g32        2.562
    19  w2g32a-gptq          gptq-w2-g32       2.562
    20  w2g128a-gptq-awq0.5  (AWQ then GPTQ)   2.141
    21  w2g128a-gptq-mse     (GPTQ, MSE clip)  2.141
    22  w3g64a               rtn-w3-g64        3.297
    23  w3g64a-gptq          gptq-w3-g64       3.297
    24  w3g64a-mse-awq0.5    awq-w3-g64        3.297
    25  w3g32a               rtn-w3-g32        3.594
    26  w3g32a-gptq          gptq-w3-g32       3.594
    27  w3g128a-gptq-awq0.5  (AWQ then GPTQ)   3.148
    28  w3g128a-gptq-mse     (GPTQ, MSE clip)  3.148
    29  w4g128a-gptq-awq0.5  (AWQ then GPTQ)   4.156
    30  w4g128a-gptq-mse     (GPTQ, MSE clip)  4.156
    31  w5g128a-gptq         gptq-w5           5.164
    32  w5g128a-mse-awq0.5   awq-w5            5.164
    33  w6g128a-gptq         gptq-w6           6.172
    34  w6g128a-mse-awq0.5   awq-w6            6.172
    35  w8g128a-gptq         gptq-w8           8.188
    36  w8g128a-mse-awq0.5   awq-w8            8.188
    ==  ===================  ================  ===============

    **Reward**: 0 at every step but the last (unless ``dense_weight`` or ``shaping_weight`` is
    set), then the fidelity against the uniform RTN frontier at the budget, ``log(KL_ref / KL)``
    for ``reward="kl"``: 0 means as faithful as the human-designed uniform rule of that size, on
    every model (``qenv.envs.reward``). In the ``hard`` budget mode an action that would break
    the budget is lowered (``info["clamped"]``); in the ``penalty`` mode breaking it is charged
    and never pays.

    **Episode end**: the episode terminates after one step per quantizable layer of its model
    (``episode_length``); none is truncated, and the registration sets no ``max_episode_steps``
    (the length depends on the model). The last step's ``info`` holds the recipe and its
    measured ``kl``, ``ppl``, ``top1``, ``bpw`` and size.

    **Example**:

    >>> import gymnasium as gym, qenv
    >>> env = gym.make("QuantLLM-v0", model="tiny-llama", budget_bpw=3.0, n_tokens=256, seq_len=32)
    >>> obs, info = env.reset(seed=0)
    >>> obs.shape
    (45,)
    >>> terminated = False
    >>> while not terminated:
    ...     obs, reward, terminated, truncated, info = env.step(int(env.unwrapped.action_masks().nonzero()[0][-1]))
    >>> info["bpw"] <= 3.0
    True
    """

    metadata = {"render_modes": list(RENDER_MODES), "render_fps": 4}

    def __init__(self, config: EnvConfig | str | LoadedModel | Sequence[str | LoadedModel] | None = None, *,
                 render_mode: str | None = None, **kwargs: Any) -> None:
        """``QuantLLMEnv(config)``, or ``QuantLLMEnv(**kwargs)`` with :class:`EnvConfig`'s fields as
        keyword arguments (what ``gym.make("QuantLLM-v0", budget_bpw=2.5)`` passes); keyword
        arguments next to a config replace its fields. A first argument that is not a config is
        the model (``QuantLLMEnv("tiny-llama", budget_bpw=2.5)``)."""
        super().__init__()
        if render_mode is not None and render_mode not in RENDER_MODES:
            check_env_arguments({"render_mode": render_mode})
        if isinstance(config, EnvConfig):
            config = dataclasses.replace(config, **kwargs) if kwargs else config
        else:
            if config is not None:
                kwargs = {"model": config, **kwargs}
            config = EnvConfig.from_kwargs(**kwargs)
        self.config = config
        self.reward_kind = check_reward_kind(config.reward)
        self.render_mode = render_mode
        self.budget_bpw = float(config.budget_bpw)
        self.nominal_budget_bpw = self.budget_bpw
        # the budgets episodes sample from (budget_bpw until the first reset, or when only it is given)
        drawn = config.episode_budgets  # budgets, or budget_range's grid
        self.budgets: tuple[float, ...] = (self.budget_bpw,) if drawn is None else drawn
        self._sample_budgets = drawn is not None
        self.budget_mode = config.budget_mode
        self.dense_weight = float(config.dense_weight)
        self.shaping_weight = float(config.shaping_weight)
        self.size_weight = float(config.size_weight)
        self.penalty_weight = float(config.penalty_weight)
        self.kind: ActionKind = KINDS[config.action_kind].from_config(config)  # what an action means
        self.mapper = config.action_mapper(self.kind)
        self.action_space = self.mapper.space
        self.observation_space = spaces.Box(-OBS_LIMIT, OBS_LIMIT, shape=(observation_size(config.observation),),
                                            dtype=np.float32)
        self.observation_kind = config.observation
        self.max_deviations = config.max_deviations
        self.tasks = [
            build_task(spec, self.mapper, data=config.data, n_tokens=config.n_tokens, seq_len=config.seq_len,
                       batch_size=config.batch_size, seed=config.seed, device=config.device, dtype=config.dtype,
                       include_lm_head=config.include_lm_head, cache_dir=config.cache_dir,
                       weight_cache_gib=config.weight_cache_gib, prebuild=config.prebuild,
                       validation_fraction=config.validation_fraction)
            for spec in config.models
        ]
        if self.dense_weight > 0 or self.shaping_weight > 0:
            for task in self.tasks:
                if task.evaluator.reference.block_outputs is None:
                    raise QenvError("dense_weight or shaping_weight > 0 needs the reference block outputs, which "
                                    "were not kept.")
        if self.budget_mode == "hard":
            lowest = min(self.budget_bpw, *self.budgets)
            for task in self.tasks:
                floor = task.rest_min[0] / task.total_weights
                if floor > lowest + 1e-12:
                    zoo = (f" (one of the {len(self.tasks)} models of this zoo, which all share the budget)"
                           if len(self.tasks) > 1 else "")
                    floors = max(t.rest_min[0] / t.total_weights for t in self.tasks)
                    name = f"budget_bpw={lowest:g} is" if lowest == self.budget_bpw else f"budgets has {lowest:g}, which is"
                    raise QenvError(
                        f"{name} below the {floor:.3f} bpw that the cheapest rules reach on "
                        f"{task.name}{zoo}.",
                        f"raise the budget to at least {floors:.3f}"
                        + (", train the models that cannot meet it separately," if zoo else "")
                        + " or add cheaper rules to the menu.",
                    )
        self.task = self.tasks[0]
        self._reset_episode()

    # -- episode state ---------------------------------------------------------------------------
    def _reset_episode(self) -> None:
        self.index = 0
        self.deviations = 0  # residual kind: steps whose asked rule left the current plan
        self.recipe: dict[str, Rule] = {}
        self.spent = 0.0
        self.prev_rule: Rule | None = None
        self.clamped = 0
        self.inherited = 0
        self.dense_return = 0.0
        self.potential = 0.0
        self.stream: Stream = self.task.evaluator.stream()
        self.last_metrics: Metrics | None = None
        self.preferences: list[float] = []  # allocation kind
        self.plan: np.ndarray | None = None  # plan-based kinds: the best start, re-planned after a deviation
        if self.kind.plans:
            cached = self.budget_bpw in self.task.starts
            start = self.task.start_plan(self.budget_bpw)
            # the best start's evaluations, reported by the next reset() (the first reset runs in __init__)
            self.start_evaluations = getattr(self, "start_evaluations", 0) + (0 if cached else len(start.measured))
            self.plan = np.array(start.candidate.choice, dtype=np.int64)

    @property
    def episode_length(self) -> int:
        """Steps of the current episode: one per quantizable layer of its model."""
        return len(self.task.layers)

    @property
    def model_episode_lengths(self) -> tuple[int, ...]:
        """Episode length of each model of the env (one entry per model of a zoo), e.g. to size an
        agent's exploration to the episode before any episode is played. (Not ``episode_lengths``:
        SB3's ``Monitor`` wrapper has a list of that name, which ``VecEnv.get_attr`` finds first.)"""
        return tuple(len(t.layers) for t in self.tasks)

    @property
    def budget_bits(self) -> float:
        return self.budget_bpw * self.task.total_weights

    def _observation(self) -> np.ndarray:
        task = self.task
        n = len(task.layers)
        i = min(self.index, n - 1)
        remaining = float(task.rest_numel[self.index])
        bpw_left = (self.budget_bits - self.spent) / remaining if remaining else 0.0
        prev_index = -1 if self.prev_rule is None else self.mapper.rule_index(self.prev_rule)
        episode = [
            self.budget_bpw / 16, bpw_left / 16, self.spent / self.budget_bits, remaining / task.total_weights,
            0.0 if self.prev_rule is None else self.prev_rule.bits / 16,
            (prev_index + 1) / len(self.mapper.rules), (n - self.index) / n,
        ]
        bits_left = self.budget_bits - self.spent
        episode += model_relative(task.ladder_costs, task.ladder_sens, i, bits_left if self.index < n else 0.0,
                                  bpw_left, task.numel, task.ladder_table, task.ladder_gains)
        if self.observation_kind != "full":  # the share of the sensitivity left, over the mean share
            episode[-1] = math.log10(max(episode[-1] * (n - self.index), 1e-6)) / 2.0
        # the static entries of the model ("relative": no scale of its own)
        static = task.static if self.observation_kind == "full" else task.relative_static
        obs = np.concatenate([static[i], np.asarray(episode, dtype=np.float32)])
        return np.clip(obs, -OBS_LIMIT, OBS_LIMIT).astype(np.float32)

    def _allowed_bits(self) -> float:
        """The most bits this layer may take so that the rest can still meet the budget."""
        return self.budget_bits - self.spent - self.task.rest_min[self.index + 1]

    def _fit_budget(self, rule: Rule) -> tuple[Rule, bool]:
        """In hard mode, the costliest producible rule that still lets the rest meet the budget
        (the continuous and rule kinds keep the asked rule's other knobs)."""
        task = self.task
        i = self.index
        info = task.layers[i]
        cost = layer_bits(rule, info.out_features, info.in_features)
        allowed = self._allowed_bits()
        if self.budget_mode != "hard" or cost <= allowed + 1e-9:
            return rule, False
        costs = task.costs[i]
        fits = np.flatnonzero(costs <= allowed + 1e-9)
        if fits.size == 0:  # cannot happen once the budget passed the floor check; be safe
            return self.mapper.rules[int(np.argmin(costs))], True
        best = self.mapper.rules[int(fits[np.argmax(costs[fits])])]
        if keeps_knobs(self.kind, self):
            best = dataclasses.replace(best, clip=rule.clip, mse_clip=rule.mse_clip, salience=rule.salience,
                                       act_scale=rule.act_scale, symmetric=rule.symmetric)
        return best, True

    # -- state-dependent kinds -----------------------------------------------------------------
    def _menu_choice(self, action: Any) -> int:
        """The menu index a relative, residual or allocation action asks for at this layer."""
        return self.kind.choice(self, action)

    def action_masks(self) -> np.ndarray:
        """Which actions keep the budget reachable (sb3-contrib's convention: a flat bool array;
        MultiDiscrete: the per-knob masks concatenated). Every allowed action's rule leaves the
        later layers room for their cheapest rules, so no lowering happens; at least one action
        is always allowed. In the ``penalty`` budget mode everything is allowed."""
        if not self.kind.maskable:
            raise QenvError(f"The {self.mapper.kind!r} action space (a Box) has no action masks.",
                            f"use one of {MASKABLE_KINDS}, or an agent that needs no masks.")
        space = self.action_space
        n_total = int(space.n) if isinstance(space, spaces.Discrete) else int(np.sum(space.nvec))  # type: ignore[attr-defined]
        if self.budget_mode != "hard" or self.index >= len(self.task.layers):
            return np.ones(n_total, dtype=bool)
        return self.kind.masks(self, self._allowed_bits() + 1e-9)

    def _fold_act_scale(self, info: LayerInfo, rule: Rule) -> tuple[Rule, bool]:
        """Layers reading the same input (q/k/v, gate/up) share one AWQ scale, so that it folds into the
        norm before them: a later layer inherits the ``act_scale`` its group already chose. Bits do not
        depend on ``act_scale``, so the budget is unaffected; ``info["act_scale_inherited"]`` says so."""
        folded = inherit_act_scale(rule, self.task.input_groups.get(info.name, ()), self.recipe)
        if folded is rule:
            return rule, False
        self.inherited += 1
        return folded, True

    #: the keys ``reset(options=...)`` reads
    RESET_OPTIONS: tuple[str, ...] = ("model_index", "budget_bpw")

    def _check_reset(self, seed: Any, options: Any) -> tuple[int | None, float | None]:
        """The seed, model index and budget a ``reset`` asks for, or a clear error before anything
        changes: a refused reset leaves the env (and gymnasium's wrappers around it) as it was."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise QenvError(f"reset(seed={seed!r}) is not a seed.", "pass a whole number of at least 0, or None.")
        if options is None:
            return None, None
        if not isinstance(options, dict):
            raise QenvError(f"reset(options={options!r}) is not a dict.",
                            f"pass a dict with any of the keys {list(self.RESET_OPTIONS)}, or None.")
        unknown = sorted(str(k) for k in options if k not in self.RESET_OPTIONS)
        if unknown:
            raise QenvError(f"reset(options=...) has unknown key(s) {unknown}.",
                            f"use only {list(self.RESET_OPTIONS)}.")
        index = None
        if "model_index" in options:
            index = options["model_index"]
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(self.tasks):
                raise QenvError(f"reset(options={{'model_index': {index!r}}}) names no model: this environment has "
                                f"{len(self.tasks)} model(s), numbered from 0.",
                                f"pass a model_index from 0 to {len(self.tasks) - 1}.")
            index = int(index)
        budget = None
        if "budget_bpw" in options:
            asked = options["budget_bpw"]
            known = (*self.budgets, self.nominal_budget_bpw)
            match = [b for b in known if is_number(asked) and abs(float(asked) - b) <= 1e-6]
            if not match:
                raise QenvError(f"reset(options={{'budget_bpw': {asked!r}}}) is not one of this environment's "
                                f"budgets {sorted(set(known))} (budget_bpw and budgets).",
                                "pass one of them, or make the environment with it.")
            budget = match[0]
        return index, budget

    # -- gymnasium API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        index, budget = self._check_reset(seed, options)
        super().reset(seed=None if seed is None else int(seed))
        if index is not None:
            self.task = self.tasks[index]
        elif len(self.tasks) > 1:
            self.task = self.tasks[int(self.np_random.integers(len(self.tasks)))]
        if budget is not None:
            self.budget_bpw = budget
        elif self._sample_budgets:
            self.budget_bpw = self.budgets[int(self.np_random.integers(len(self.budgets)))]
        self._reset_episode()
        info = {"model": self.task.name, "layer": self.task.layers[0].name, "n_layers": len(self.task.layers)}
        if self.kind.plans:  # the best start's evaluations, counted once: at the reset that measured them
            info["start"] = self.task.starts[self.budget_bpw].candidate.label
            info["start_evaluations"], self.start_evaluations = self.start_evaluations, 0
        return self._observation(), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        task = self.task
        if self.index >= len(task.layers):
            raise QenvError("step() was called after the episode ended.", "call reset() first.")
        # 1. the rule the action asks for, read by the action kind against the episode (an action
        #    the space does not contain is refused, never rounded)
        asked, choice, reward, kind_info = self.kind.decode(self, action)
        # 2. in the hard budget mode, lowered to a rule that leaves the later layers room; layers
        #    reading one input share one AWQ scale
        rule, clamped = self._fit_budget(asked)
        info_layer = task.layers[self.index]
        rule, inherited = self._fold_act_scale(info_layer, rule)
        # 3. fixed in the recipe and charged
        self.recipe[info_layer.name] = rule
        self.spent += layer_bits(rule, info_layer.out_features, info_layer.in_features)
        self.clamped += int(clamped)
        self.prev_rule = rule
        # 4. the kind's own bookkeeping (the residual kind re-plans the layers left after a deviation)
        self.kind.after_step(self, choice, clamped)
        info: dict[str, Any] = {"layer": info_layer.name, "rule": rule_text(rule, info_layer),
                                "asked": asked.label(), "clamped": clamped, "act_scale_inherited": inherited,
                                **kind_info}
        # 5. a finished block runs on the quantized prefix's hidden states (dense and shaping terms)
        if task.stage_end[self.index] and self.kind.streams:
            reward = self._block_finished(stage_of(info_layer), reward)
        self.index += 1
        terminated = self.index == len(task.layers)
        # 6. the last layer: the kind finishes the recipe, which is scored against the reference
        if terminated:
            self.kind.finish(self)
            metrics = self.stream.finish(self.recipe)
            self.last_metrics = metrics
            final, final_info = self.score(metrics, self.recipe)
            reward += final - self.potential  # the potential returns to 0 at the end
            self.dense_return -= self.potential
            self.potential = 0.0
            final_info.update(self.kind.final_info(self))
            final_info.update({"dense_return": self.dense_return, "clamped_actions": self.clamped,
                               "act_scales_inherited": self.inherited})
            info.update(final_info)
        obs = self._observation()
        if self.render_mode == "ansi" and terminated:
            info["table"] = self.render()
        return obs, float(reward), terminated, False, info

    def _block_finished(self, stage: int, reward: float) -> float:
        """Stream block ``stage`` on the quantized prefix; ``reward`` plus its dense and shaping terms."""
        task = self.task
        if 0 <= stage < task.evaluator.n_blocks:
            self.stream.advance(self.recipe, stage)
            if self.dense_weight > 0 or self.shaping_weight > 0:
                error = self.stream.block_error(stage)
            if self.dense_weight > 0:
                dense = -self.dense_weight * error
                self.dense_return += dense
                reward += dense
            if self.shaping_weight > 0:
                ref = task.block_reference(self.budget_bpw)[stage]
                phi = -self.shaping_weight * float(np.log(max(error, 1e-12) / max(ref, 1e-12)))
                reward += phi - self.potential
                self.dense_return += phi - self.potential
                self.potential = phi
        return reward

    def score(self, metrics: Metrics, recipe: dict[str, Rule]) -> tuple[float, dict[str, Any]]:
        """The final reward of a finished recipe (no dense terms) and the terminal ``info`` keys.

        The one place the episode's end is scored: ``step`` uses it, and so do searchers that
        evaluate recipes without stepping (see :mod:`qenv.envs.reward` for the formula).
        """
        task = self.task
        ref = task.reference(self.budget_bpw)
        fidelity = fidelity_reward(self.reward_kind, metrics, ref)
        size = self.size_weight * (self.budget_bpw - metrics.bpw) / self.budget_bpw
        penalty = 0.0
        over = max(0.0, metrics.bpw - self.budget_bpw)
        if self.budget_mode == "penalty" and over > 0:
            # the bits over budget are charged, and the fidelity gained over an in-budget recipe is
            # forfeited: an over-budget recipe then scores below that recipe (its fidelity is at most
            # the in-budget one's, its size term negative, its charge positive) whatever the weight,
            # so breaking the budget never pays (8 bits everywhere would otherwise out-score greedy)
            floor = fidelity_reward(self.reward_kind, task.in_budget_metrics(self.budget_bpw), ref)
            penalty = self.penalty_weight * over + max(0.0, fidelity - floor)
        reward = fidelity + size - penalty
        info = {
            "model": task.name, "bpw": metrics.bpw, "model_bytes": metrics.model_bytes,
            "model_mb": metrics.model_mb, "kl": metrics.kl, "ppl": metrics.ppl, "top1": metrics.top1,
            "n_tokens": metrics.n_tokens, "reference_kl": ref.kl, "reference_ppl": ref.ppl,
            "reference_top1": ref.top1, "reference": ref.description, "fidelity_reward": fidelity,
            "budget_bpw": self.budget_bpw, "budget_met": metrics.bpw <= self.budget_bpw + 1e-9,
            "recipe": {info.name: recipe[info.name].label() for info in task.layers if info.name in recipe},
            # GGUF rules whose type llama.cpp cannot hold on the layer's rows: scored and charged as the fallback
            "fallback": fallbacks(task.layers, recipe),
            "recipe_rules": {info.name: recipe[info.name].to_dict() for info in task.layers if info.name in recipe},
        }
        if self.budget_mode == "penalty":
            info["budget_penalty"] = penalty
        return reward, info

    def close(self) -> None:
        """Drop this env's models from the per-process task cache: once no other env holds them,
        the model, its reference and its quantized weights are freed (a program that evaluates
        several models one after another keeps only one in memory)."""
        for task in self.tasks:
            for key in [key for key, cached in _TASKS.items() if cached is task]:
                del _TASKS[key]
        super().close()

    def render(self) -> str | np.ndarray | None:
        if self.render_mode == "ansi":
            return recipe_table(self.task.layers, self.recipe, self.last_metrics)
        if self.render_mode == "rgb_array":
            return recipe_image(self.task.layers, self.recipe, self.budget_bpw)
        return None
