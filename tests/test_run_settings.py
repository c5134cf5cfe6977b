"""A run's settings: train_agent.py resolves one :class:`RunSettings` (the env's one ``EnvConfig``
and the agent's settings), writes it as ``config.json`` and reads it back; run folders written
before (``env_kwargs``, layout version 1) still resume and evaluate as they trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script, run_main

from qenv.cli.runs import RUN_CONFIG_VERSION, env_config_of, env_kwargs_of
from qenv.envs.config import EnvConfig
from qenv.errors import QenvError

train_agent = load_script("train_agent")
eval_agent = load_script("eval_agent")

TINY_PPO = """\
QuantLLM-v0:
  policy: MlpPolicy
  n_steps: 32
  batch_size: 16
  n_epochs: 1
  policy_kwargs: {net_arch: [16]}
"""
SMALL = ["--env-kwargs", "seq_len=64", "--n-tokens", "256"]


def old_layout(config: dict) -> dict:
    """``config`` as train_agent.py wrote it before EnvConfig (version 1): the given env arguments."""
    old = {k: v for k, v in config.items() if k != "env"}
    return {**old, "version": 1, "env_kwargs": env_kwargs_of(config, "config.json")}


def test_config_json_is_the_env_config_plus_the_agents_settings(stories_bin):
    args = train_agent.build_parser().parse_args(["--model", str(stories_bin), "--budget-bpw", "2.5",
                                                  "--env-kwargs", "reward=ppl", "seq_len=64", "--seed", "3"])
    settings = train_agent.resolve_settings(args)
    data = json.loads(json.dumps(settings.to_dict()))
    assert data["version"] == RUN_CONFIG_VERSION and "env_kwargs" not in data
    assert data["env"] == settings.env.to_dict() and EnvConfig.from_dict(data["env"]) == settings.env
    model = str(Path(stories_bin).resolve())
    assert (settings.env.model, settings.env.budget_bpw, settings.env.reward, settings.env.seq_len, settings.seed) \
        == (model, 2.5, "ppl", 64, 3)
    assert train_agent.RunSettings.from_dict(data, Path("config.json")) == settings
    # what the run chose, as the programs merge their flags into it: the settings off their defaults
    chosen = env_kwargs_of(data, "config.json")
    assert {k: chosen[k] for k in ("model", "seq_len", "reward", "budget_bpw")} == \
        {"model": model, "seq_len": 64, "reward": "ppl", "budget_bpw": 2.5}
    assert "n_tokens" not in chosen and EnvConfig.from_kwargs(**chosen) == settings.env


def test_an_old_config_json_reads_as_the_settings_it_trained_with(stories_bin):
    old = {"version": 1, "env_id": "QuantLLM-v0", "agent": "ppo", "seed": 0, "total_timesteps": 64, "n_envs": 1,
           "vec_env": "dummy", "checkpoint_freq": 32, "config_section": {}, "keep_checkpoints": 5,
           "argv": ["--model", str(stories_bin)], "eval_freq": 0,
           "env_kwargs": {"model": [str(stories_bin), "tiny-llama"], "budget_bpw": 3, "n_tokens": 256,
                          "menu": [{"bits": 4}, {"bits": 8}], "render_mode": "ansi"}}
    settings = train_agent.RunSettings.from_dict(old, Path("config.json"))
    assert settings.env == EnvConfig(model=(str(stories_bin), "tiny-llama"), budget_bpw=3.0, n_tokens=256,
                                     menu=[{"bits": 4}, {"bits": 8}])
    assert settings.argv == ("--model", str(stories_bin)) and settings.checkpoint_freq == 32
    assert env_kwargs_of(old, "config.json") == old["env_kwargs"]  # as stored, for the programs' flags


@pytest.mark.parametrize("case, needle", [
    ({"env": {"version": 1, "reward": {"reward": "nope"}}}, "Unknown reward 'nope'"),
    ({"env": [1]}, "lacks or garbles env"),
    ({"env_kwargs": {"budget_bpw": 99}}, "budget_bpw=99 is out of range"),
    ({"env_kwargs": {"colour": "red"}}, "no setting 'colour'"),
    ({"version": 7}, "layout version 7"),
])
def test_a_config_json_with_bad_env_settings_is_one_line(case, needle, tmp_path, capsys):
    base = {"version": 2, "env_id": "QuantLLM-v0", "agent": "ppo", "seed": 0, "total_timesteps": 64, "n_envs": 1,
            "vec_env": "dummy", "checkpoint_freq": 32, "config_section": {}, "keep_checkpoints": 5,
            "env": EnvConfig().to_dict()}
    folder = tmp_path / "run"
    folder.mkdir()
    data = {**{k: v for k, v in base.items() if not ("env_kwargs" in case and k == "env")}, **case}
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(QenvError):
        train_agent.RunSettings.from_dict(data, folder / "config.json")
    before = sorted(p.name for p in folder.iterdir())
    assert run_main(train_agent, ["--resume", folder, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0] and "Fix: " in err[0], err
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.slow
def test_a_run_folder_of_the_old_layout_resumes_and_evaluates_as_it_trained(stories_bin, cache_dir, tmp_path):
    """A v1 config.json (``env_kwargs``) on disk: --resume continues it on the same env, and
    eval_agent.py scores its policy on the settings it trained with (the same numbers as from the
    v2 layout of the same run)."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_PPO)
    logdir = tmp_path / "runs"
    common = ["--model", stories_bin, "--config", cfg, "--logdir", logdir, "--no-progress", "--checkpoint-freq", 32,
              *SMALL]
    assert run_main(train_agent, [*common, "--timesteps", 64, "--name", "new"]) == 0
    new = logdir / "new"
    config = json.loads((new / "config.json").read_text())
    assert config["version"] == 2 and env_config_of(config, "c").n_tokens == 256

    def evaluate(out: str) -> dict:
        code = run_main(eval_agent, ["--policy", new / "model.zip", "--searchers", "none", "--presets", "none",
                                     "--out", tmp_path / out, "--no-progress"])
        assert code == 0
        rows = json.loads((tmp_path / out / "results.json").read_text())["models"][0]["rows"]
        return [{k: v for k, v in row.items() if not k.startswith("wall")} for row in rows]  # all but the timing

    rows_new = evaluate("eval-new")
    # the same run folder as the first layout wrote it: summary.json gone, config.json with env_kwargs
    (new / "config.json").write_text(json.dumps({**old_layout(config), "total_timesteps": 96}))
    (new / "summary.json").unlink()
    assert evaluate("eval-old") == rows_new
    assert run_main(train_agent, ["--resume", new, "--no-progress"]) == 0
    summary = json.loads((new / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["timesteps"] == 96 and summary["sessions"] == 2
    assert EnvConfig.from_dict(summary["settings"]["env"]) == env_config_of(config, "c")


REMOVED = {"deviation_cost": (0.0, 0.01), "replan": ("lagrangian", "greedy"), "ladder": ("menu", "frontier")}


@pytest.mark.parametrize("key", sorted(REMOVED))
def test_a_removed_setting_loads_where_it_was_off_and_is_one_line_where_it_was_on(key, tmp_path, capsys):
    """deviation_cost, replan and ladder moved no loss and were removed: an earlier run's settings
    that hold one at its old default read as if it were absent (in either layout, and on the
    command line); one that turned it on is refused, naming it, before anything is written."""
    off, on = REMOVED[key]
    residual = {"action_kind": "residual", "max_deviations": 6}
    assert EnvConfig.from_kwargs(**residual, **{key: off}) == EnvConfig(**residual)
    v1_env = {k: dict(v) for k, v in EnvConfig(**residual).to_dict().items() if k != "version"}
    v1_env["action"][key] = off  # EnvConfig.to_dict() of the version that had it
    assert EnvConfig.from_dict({"version": 1, **v1_env}) == EnvConfig(**residual)
    with pytest.raises(QenvError, match=f"{key}={on!r} was removed"):
        EnvConfig.from_kwargs(**residual, **{key: on})
    old_run = {"version": 1, "env_id": "QuantLLM-v0", "agent": "maskable_ppo", "seed": 0, "total_timesteps": 64,
               "n_envs": 1, "vec_env": "dummy", "checkpoint_freq": 32, "config_section": {}, "keep_checkpoints": 5,
               "env_kwargs": {**residual, key: off}}
    assert train_agent.RunSettings.from_dict(old_run, Path("config.json")).env == EnvConfig(**residual)
    assert env_kwargs_of(old_run, "config.json") == residual
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**old_run, "env_kwargs": {**residual, key: on}}))
    assert run_main(train_agent, ["--resume", folder, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{key}={on!r} was removed" in err[0] and "Fix: " in err[0], err
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    args = train_agent.build_parser().parse_args(["--env-kwargs", f"{key}={on}", "action_kind=residual"])
    with pytest.raises(QenvError, match=f"--env-kwargs: {key}=.* was removed"):
        train_agent.resolve_settings(args)


def test_the_actions_observation_was_removed():
    """observation="actions" (what each residual shift would do) moved no loss: refused by name."""
    with pytest.raises(QenvError, match="observation='actions' was removed"):
        EnvConfig.from_kwargs(action_kind="residual", observation="actions")
    with pytest.raises(QenvError, match="observation='actions' was removed"):
        env_config_of({"env_kwargs": {"action_kind": "residual", "observation": "actions"}}, "config.json")
