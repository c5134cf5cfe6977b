"""EnvConfig: the env's settings in one frozen, checked, serialisable object."""

from __future__ import annotations

import dataclasses
import json

import gymnasium as gym
import pytest

import qenv  # noqa: F401  (registers QuantLLM-v0)
from qenv import QenvError, Rule
from qenv.envs import EnvConfig
from qenv.envs.quant_llm import QuantLLMEnv

SMALL = {"n_tokens": 512, "seq_len": 64, "cache_dir": False}

ROUND_TRIPS = [
    {},
    {"budget_bpw": 2.5, "reward": "ppl", "shaping_weight": 0.5, "budget_mode": "penalty", "penalty_weight": 3.0},
    {"action_kind": "residual", "observation": "relative", "max_deviations": 4, "budgets": [2.5, 3.0, 4.0]},
    {"menu": [{"bits": 4}, {"bits": 8, "group_size": 64}], "data": ["a.txt", "b.txt"], "device": "cpu"},
    {"menu": "gguf", "action_kind": "multidiscrete", "model": ["tiny-llama", "default"], "cache_dir": "/tmp/x"},
    {"weight_cache_gib": 2.0, "prebuild": False, "include_lm_head": True, "seed": 7, "batch_size": 4},
    {"action_kind": "allocation", "observation": "relative", "budget_range": [2.5, 4.5]},
    {"validation_fraction": 0.25},
]


@pytest.mark.parametrize("kwargs", ROUND_TRIPS, ids=[",".join(k) or "defaults" for k in ROUND_TRIPS])
def test_to_dict_round_trips_through_json(kwargs):
    config = EnvConfig.from_kwargs(**kwargs)
    written = json.loads(json.dumps(config.to_dict()))
    assert written["version"] == 1 and set(written) == {"version", "task", "reward", "action", "budget"}
    assert EnvConfig.from_dict(written) == config
    assert EnvConfig.from_kwargs(**config.env_kwargs()) == config


def test_equal_settings_are_equal_configs():
    a = EnvConfig(menu=[{"bits": 4}, {"bits": 8}], budgets=[3, 4], data=["x.txt"])
    b = EnvConfig(menu=(Rule(bits=4), Rule(bits=8)), budgets=(3.0, 4.0), data=("x.txt",))
    assert a == b and hash(a.to_dict()["version"]) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.budget_bpw = 2.0  # type: ignore[misc]
    assert dataclasses.replace(a, budget_bpw=2.5).budget_bpw == 2.5


BAD = [
    ({"seq_len": 1}, "seq_len=1 must be a whole number of at least 2"),
    ({"n_tokens": "abc"}, "n_tokens='abc'"),
    ({"budget_bpw": 0}, "out of range"),
    ({"include_lm_head": "maybe"}, "must be true or false"),
    ({"weight_cache_gib": -1}, "at least 0"),
    ({"validation_fraction": 1.0}, "share of the calibration sequences"),
    ({"max_deviations": 3}, "applies to the residual action kind"),
    ({"observation": "actions"}, "observation='actions' was removed"),
    ({"ladder": "frontier"}, "ladder='frontier' was removed"),
    ({"budget": 3.0}, "has no setting 'budget'"),
    ({"model": []}, "must be a model spec"),
    ({"menu": []}, "menu is empty"),
    ({"budget_range": [4.5, 2.5]}, "low <= high"),
    ({"budget_range": [2.5]}, "must be two budgets"),
    ({"budget_range": [0, 4]}, "each in \\(0, 16\\]"),
    ({"budget_range": "2.5-4.5"}, "must be two budgets"),
    ({"budget_range": [2.5, 4.5], "budgets": [3.0]}, "pass only one of them"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[",".join(k) for k, _ in BAD])
def test_bad_settings_are_refused_by_the_config_alone(kwargs, message):
    with pytest.raises(QenvError, match=message):
        EnvConfig.from_kwargs(**kwargs)


@pytest.mark.parametrize("data, message", [
    ({"version": 2, "task": {}}, "version 2"),
    ([1, 2], "version None"),
    ({"version": 1, "tasks": {}}, "unknown group"),
    ({"version": 1, "task": {"modle": "x"}}, "unknown key"),
    ({"version": 1, "budget": {"budget_bpw": "three"}}, "out of range"),
    ({"version": 1, "budget": [3.0]}, "not a mapping"),
])
def test_from_dict_refuses_what_to_dict_did_not_write(data, message):
    with pytest.raises(QenvError, match=message):
        EnvConfig.from_dict(data)


def test_a_loaded_model_cannot_be_written_out(stories_bin):
    from qenv import load_model

    config = EnvConfig(model=load_model(str(stories_bin)), **SMALL)
    with pytest.raises(QenvError, match="already loaded model"):
        config.to_dict()


def test_gym_make_keyword_arguments_a_config_and_overrides_make_the_same_env(stories_bin):
    made = gym.make("QuantLLM-v0", model=str(stories_bin), budget_bpw=2.5, **SMALL).unwrapped
    config = EnvConfig(model=str(stories_bin), **SMALL)
    assert isinstance(made.config, EnvConfig) and made.config == dataclasses.replace(config, budget_bpw=2.5)
    from_config = QuantLLMEnv(config, budget_bpw=2.5)
    positional = QuantLLMEnv(str(stories_bin), budget_bpw=2.5, **SMALL)
    assert from_config.config == positional.config == made.config
    assert from_config.budget_bpw == made.budget_bpw == 2.5 and from_config.task is made.task


def test_the_env_docstring_is_a_contract_that_renders():
    """The env's docstring renders as reStructuredText without a warning (its tables were
    malformed), and its tables say what the code does: the observation's length and entries, the
    default menu's rules in order."""
    import inspect

    import docutils.core
    import docutils.nodes

    from qenv.envs.features import EPISODE_NAMES, OBS_DIM, STATIC_NAMES
    from qenv.envs.spaces import DEFAULT_MENU

    doc = inspect.cleandoc(QuantLLMEnv.__doc__)
    tree = docutils.core.publish_doctree(doc, settings_overrides={"halt_level": 2, "report_level": 2})
    tables = list(tree.findall(docutils.nodes.table))
    assert len(tables) == 3  # actions, observation, menu
    assert f"Box(-10, 10, ({OBS_DIM},), float32)" in doc and OBS_DIM == 45
    rows = [[entry.astext() for entry in row.findall(docutils.nodes.entry)] for row in tables[1].findall(docutils.nodes.row)]
    names = " ".join(row[1] for row in rows[1:])
    assert all(name.removeprefix("w_log").removeprefix("x_log") in names or name.split("_")[0] in names
               for name in STATIC_NAMES + EPISODE_NAMES)
    assert rows[-1][0] == f"{OBS_DIM - 1}" and rows[-1][1] == EPISODE_NAMES[-1]  # the last entry
    menu = [[entry.astext() for entry in row.findall(docutils.nodes.entry)] for row in tables[2].findall(docutils.nodes.row)]
    assert [row[1] for row in menu[1:]] == [rule.label() for rule in DEFAULT_MENU]
    assert ">>> " in doc and "benchmark" not in doc.lower() and "BENCHMARKS" not in doc


@pytest.mark.slow
def test_budget_range_draws_each_episode_a_budget_on_its_grid_and_observes_it():
    """One policy for a range of budgets: each reset draws a budget of ``budget_range``'s grid (both
    ends included), the observation's ``budget_bpw`` entry says which, and ``reset(options=...)``
    may ask for any budget of the grid."""
    from qenv.envs.config import BUDGET_RANGE_STEP, budget_grid
    from qenv.envs.features import EPISODE_NAMES, STATIC_NAMES

    assert budget_grid(2.5, 4.5) == tuple(round(2.5 + i * BUDGET_RANGE_STEP, 6) for i in range(21))
    assert budget_grid(3.0, 3.25)[-1] == 3.25 and budget_grid(3.0, 3.0) == (3.0,)
    env = QuantLLMEnv(model="tiny-llama", budget_range=(2.5, 4.5), action_kind="allocation",
                      observation="relative", **SMALL)
    assert env.budgets == budget_grid(2.5, 4.5)
    column = len(STATIC_NAMES) + EPISODE_NAMES.index("budget_bpw")
    drawn = set()
    for seed in range(12):
        obs, _ = env.reset(seed=seed)
        assert env.budget_bpw in env.budgets and obs[column] == pytest.approx(env.budget_bpw / 16)
        drawn.add(env.budget_bpw)
    assert len(drawn) >= 5  # draws, not one budget
    obs, _ = env.reset(options={"budget_bpw": 4.5})
    assert env.budget_bpw == 4.5 and obs[column] == pytest.approx(4.5 / 16)
    with pytest.raises(QenvError, match="not one of this environment's budgets"):
        env.reset(options={"budget_bpw": 2.55})
