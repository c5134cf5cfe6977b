"""train_agent.py end to end on stories260K: outputs, TensorBoard events, errors, Ctrl-C, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import load_script, run_main
from qenv.envs.config import EnvConfig

REPO = Path(__file__).resolve().parents[1]
SMALL_ENV = ["--env-kwargs", "n_tokens=512", "seq_len=64", "--n-tokens", "512"]
TINY_PPO = """\
QuantLLM-v0:
  n_timesteps: 256
  policy: MlpPolicy
  n_steps: 64
  batch_size: 32
  n_epochs: 2
  learning_rate: lin_1e-3
  policy_kwargs: {net_arch: [32, 32], activation_fn: tanh}
  env_kwargs: {budget_bpw: 3.0}
"""


train_agent = load_script("train_agent")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny_ppo.yaml"
    path.write_text(TINY_PPO)
    return path


@pytest.fixture(scope="module")
def trained(stories_bin, cache_dir, tiny_config, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("runs")
    code = run_main(train_agent, ["--model", stories_bin, "--config", tiny_config, "--logdir", logdir, "--name", "t",
                                  "--checkpoint-freq", 64, "--no-progress", *SMALL_ENV])
    assert code == 0
    return logdir / "t"


def subprocess_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["QENV_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Fix: " in lines[0]
    assert needle in lines[0]
    assert "Traceback" not in err


# -- outputs ------------------------------------------------------------------------------------------
def test_run_folder_outputs(trained):
    from qenv.quant.rules import Recipe

    for name in ("model.zip", "best_recipe.json", "summary.json", "config.json", "pareto.png"):
        assert (trained / name).is_file(), name
    assert list((trained / "checkpoints").glob("step_*.zip"))
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["timesteps"] == summary["total_timesteps"] == 256  # n_timesteps from the config
    assert summary["agent"] == "ppo" and summary["wall_time_s"] > 0
    assert summary["episodes"] >= 256 // 35 - 1
    assert summary["train_models"][0]["name"] == "stories260K"
    final = summary["final"]["stories260K"]
    for key in ("reward", "kl", "ppl", "top1", "bpw", "model_mb"):
        assert isinstance(final[key], float)
    assert final["bpw"] <= 3.0 + 1e-9
    assert final["reference"]["kl"] > 0 and "uniform RTN" in final["reference"]["description"]
    assert isinstance(summary["reward_before"]["stories260K"]["reward"], float)
    best = json.loads((trained / "best_recipe.json").read_text())
    recipe = Recipe.load(trained / "best_recipe.json")
    assert len(recipe) == 35 and best["reward"] == summary["best_reward"]
    assert set(best["metrics"]) >= {"kl", "ppl", "top1", "bpw", "model_mb", "reference_kl"}
    assert (trained / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_recipe_metrics_come_from_the_evaluator(trained, stories_bin):
    """The KL logged for the best episode is what the evaluator gives that recipe (plain path)."""
    import gymnasium as gym

    from qenv.quant.rules import Recipe

    best = json.loads((trained / "best_recipe.json").read_text())
    env = gym.make("QuantLLM-v0", model=str(stories_bin), n_tokens=512, seq_len=64)
    metrics = env.unwrapped.task.evaluator.evaluate(Recipe.load(trained / "best_recipe.json"))
    assert metrics.kl == pytest.approx(best["metrics"]["kl"], rel=1e-4)
    assert metrics.bpw == pytest.approx(best["metrics"]["bpw"], rel=1e-12)


def test_tensorboard_events(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = [p for p in (trained / "tb").iterdir() if p.is_dir()]
    assert len(folders) == 1
    acc = EventAccumulator(str(folders[0]), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("episode/reward", "episode/kl", "episode/perplexity", "episode/bpw", "episode/model_mb",
                "episode/clamped_actions", "episode/top1", "rollout/ep_rew_mean", "train/loss"):
        assert tag in tags["scalars"], tag
    summary = json.loads((trained / "summary.json").read_text())
    rewards = acc.Scalars("episode/reward")
    assert len(rewards) == summary["episodes"]
    assert max(e.value for e in rewards) == pytest.approx(summary["best_reward"], rel=1e-6)
    assert all(e.value <= 3.0 + 1e-6 for e in acc.Scalars("episode/bpw"))
    assert "recipe/bits_per_layer" in tags["histograms"]
    hist = acc.Histograms("recipe/bits_per_layer")[-1].histogram_value
    assert hist.num == 35 and 2 <= hist.min <= hist.max <= 16
    assert "pareto/kl_vs_bpw" in tags["images"]
    image = acc.Images("pareto/kl_vs_bpw")[-1]
    assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and image.width > 100
    text_tags = [t for t in tags["tensors"] if t.startswith("recipe/best")]
    assert text_tags
    text = acc.Tensors(text_tags[0])[-1].tensor_proto.string_val[0].decode()
    assert "best reward" in text and "model.layers.0.self_attn.q_proj" in text
    hparams = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    values = start.session_start_info.hparams
    assert values["agent"].string_value == "ppo"
    assert values["agent/n_steps"].number_value == 64


def test_default_config_is_read_and_flags_override_it(tmp_path):
    args = train_agent.build_parser().parse_args(["--env", "QuantLLM-v0", "--budget-bpw", "2.5",
                                                  "--env-kwargs", "reward=ppl", "seq_len=64"])
    settings = train_agent.resolve_settings(args)
    assert Path(settings.config_file).name == "ppo.yaml"
    assert settings.config_section["policy"] == "MlpPolicy"
    assert settings.total_timesteps == settings.config_section["n_timesteps"]
    assert settings.env.budget_bpw == 2.5 and settings.env.reward == "ppl"
    assert settings.env.seq_len == 64 and settings.agent == "ppo"
    hyper = train_agent.agent_hyperparams(settings)
    assert hyper["n_steps"] == settings.config_section["n_steps"] and "n_timesteps" not in hyper


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_agent.build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--env", "--agent", "--config", "--model", "--budget-bpw", "--timesteps", "--n-envs", "--vec-env",
                 "--seed", "--device", "--logdir", "--name", "--resume", "--env-kwargs", "--data", "--n-tokens",
                 "--overwrite", "--checkpoint-freq", "--eval-freq"):
        assert flag in out, flag
    assert "default: ppo" in out and "default: runs" in out


def test_help_lists_every_registered_agent_and_model_spec(capsys):
    """--agent's help is built from the registry (maskable_ppo was missing from a hand-written list):
    every registered name is in it, one registered now included; --model's names .gguf and smollm2-135m."""
    from qenv.agents.registry import AGENTS, available_agents, register_agent

    register_agent("help_probe_agent", "qenv.agents.searchers:GreedySearch", description="listed by --help")
    try:
        parser = train_agent.build_parser()
        help_text = " ".join(parser.format_help().split())
    finally:
        AGENTS.pop("help_probe_agent")
    listed = help_text.split("registered agent name (", 1)[1].split(")", 1)[0].split(", ")
    assert set(available_agents()) | {"help_probe_agent"} <= set(listed)
    assert {"maskable_ppo", "recurrent_ppo", "greedy", "evolution"} <= set(listed)
    model_help = next(a.help for a in parser._actions if "--model" in a.option_strings)
    assert ".gguf" in model_help and "smollm2-135m" in model_help and " ".join(model_help.split()) in help_text


# -- errors --------------------------------------------------------------------------------------------
def test_existing_run_folder_is_not_overwritten(trained, stories_bin, tiny_config, capsys):
    before = (trained / "summary.json").read_text()
    code = run_main(train_agent, ["--model", stories_bin, "--config", tiny_config, "--logdir", trained.parent,
                                  "--name", trained.name, "--no-progress", *SMALL_ENV])
    assert_one_line_error(code, capsys.readouterr().err, "already exists")
    assert (trained / "summary.json").read_text() == before


@pytest.mark.parametrize("case", ["malformed", "unknown_key", "unknown_env_kwarg", "no_section", "unknown_agent",
                                  "bad_env_kwargs", "bad_int", "unknown_flag", "bad_budget", "negative_eval_freq",
                                  "eval_freq_searcher", "eval_freq_past_the_run"])
def test_bad_input_is_one_line(case, tmp_path, stories_bin, cache_dir, capsys):
    cfg = tmp_path / "c.yaml"
    argv = ["--model", stories_bin, "--logdir", tmp_path / "runs", "--name", "x", "--no-progress", *SMALL_ENV,
            "--config", cfg]
    cfg.write_text(TINY_PPO)
    needle = {"malformed": "not valid YAML", "unknown_key": "unknown key(s) ['n_stepz']",
              "unknown_env_kwarg": "unknown environment argument(s) ['budget']", "no_section": "no section",
              "unknown_agent": "Unknown agent 'nosuchagent'", "bad_env_kwargs": "not key=value",
              "bad_int": "invalid int value", "unknown_flag": "unrecognized arguments",
              "bad_budget": "is below the", "negative_eval_freq": "--eval-freq=-5 is negative",
              "eval_freq_searcher": "--eval-freq applies to Stable-Baselines3 agents",
              "eval_freq_past_the_run": "--eval-freq=512 is more than the run's 256 timesteps"}[case]
    if case == "malformed":
        cfg.write_text("QuantLLM-v0:\n  n_steps: [64\n  policy: MlpPolicy\n")
    elif case == "unknown_key":
        cfg.write_text(TINY_PPO.replace("n_steps:", "n_stepz:"))
    elif case == "unknown_env_kwarg":
        cfg.write_text(TINY_PPO.replace("budget_bpw:", "budget:"))
    elif case == "no_section":
        cfg.write_text("CartPole-v1:\n  n_steps: 64\n")
    elif case == "unknown_agent":
        argv += ["--agent", "nosuchagent"]
    elif case == "bad_env_kwargs":
        argv += ["--env-kwargs", "seq_len"]
    elif case == "bad_int":
        argv += ["--timesteps", "many"]
    elif case == "unknown_flag":
        argv += ["--learning-rate", "3"]
    elif case == "bad_budget":
        argv += ["--budget-bpw", "0.5"]
    elif case == "negative_eval_freq":
        argv += ["--eval-freq", "-5"]
    elif case == "eval_freq_searcher":
        argv = ["--agent", "greedy", "--eval-freq", "64", *argv[:-2]]
    elif case == "eval_freq_past_the_run":
        argv += ["--eval-freq", "512"]
    code = run_main(train_agent, argv)
    assert_one_line_error(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "runs" / "x").exists()  # no half-made run folder


def test_cli_error_exit_code_without_traceback(tmp_path, cache_dir):
    proc = subprocess.run([sys.executable, str(REPO / "train_agent.py"), "--agent", "pkg_that_is_not.here:Agent",
                           "--logdir", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                          env=subprocess_env(cache_dir), timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr, "Could not import module 'pkg_that_is_not.here'")
    assert proc.stdout == ""


# -- interruption and resume ----------------------------------------------------------------------------
def start_training(tmp_path: Path, stories_bin: Path, cache_dir: Path, tiny_config: Path, name: str,
                   total: int) -> tuple[subprocess.Popen, Path]:
    logdir = tmp_path / "runs"
    cmd = [sys.executable, str(REPO / "train_agent.py"), "--model", str(stories_bin), "--config", str(tiny_config),
           "--timesteps", str(total), "--checkpoint-freq", "64", "--logdir", str(logdir), "--name", name,
           "--no-progress", *SMALL_ENV]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(cache_dir), cwd=tmp_path)
    return proc, logdir / name


def wait_for_checkpoint(proc: subprocess.Popen, folder: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list((folder / "checkpoints").glob("step_*.json")):
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training ended before its first checkpoint:\n{out}\n{err}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


def assert_no_partial_files(folder: Path) -> None:
    """Every file a reader may open is whole: JSON parses, zips pass their CRC check, PNGs end; the
    only other files are TensorBoard event logs and '.*.tmp' files that were never renamed into place."""
    import zipfile

    for path in folder.rglob("*"):
        if not path.is_file() or (path.name.startswith(".") and path.name.endswith(".tmp")) or path.name == ".lock":
            continue  # .lock: the run lock a killed process leaves (recovered by the next writer)
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                assert archive.testzip() is None, path
        elif path.suffix == ".png":
            data = path.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND", path
        else:
            assert path.name.startswith("events.out.tfevents."), path


def test_resume_after_sigkill_reaches_the_same_total(tmp_path, stories_bin, cache_dir, tiny_config):
    from qenv.callbacks import latest_checkpoint

    total = 512
    proc, folder = start_training(tmp_path, stories_bin, cache_dir, tiny_config, "killed", total)
    wait_for_checkpoint(proc, folder)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    step, _, _ = latest_checkpoint(folder / "checkpoints")
    assert 0 < step < total
    assert not (folder / "model.zip").exists()
    assert (folder / ".lock").read_text().strip() == str(proc.pid)  # the dead writer's lock: stale, taken over
    assert_no_partial_files(folder)
    # a kill inside a write leaves the temporary file (atomic_path never renamed it); --resume removes it
    stale = folder / "checkpoints" / ".step_9999999999.zip.x1y2z3.tmp"
    stale.write_bytes(b"PK\x03\x04 half a zip")
    code = run_main(train_agent, ["--resume", folder, "--no-progress"])
    assert code == 0
    assert not stale.exists() and not (folder / ".lock").exists()
    assert_no_partial_files(folder)
    # what the killed session logged after its checkpoint was purged: TensorBoard's steps never go back
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tb" / "run_1"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("episode/reward")]
    assert steps == sorted(set(steps)), steps
    assert not [p for p in folder.rglob(".*.tmp")]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["timesteps"] == summary["total_timesteps"] == total
    assert summary["sessions"] == 2
    assert (folder / "model.zip").is_file()
    from stable_baselines3 import PPO

    assert PPO.load(folder / "model.zip").num_timesteps == total
    # the episode history continued from the checkpoint
    assert summary["episodes"] >= total // 35 - 2
    # resuming a complete run does nothing
    assert run_main(train_agent, ["--resume", folder, "--no-progress"]) == 0


@pytest.mark.slow  # extended tier: a saving signal in the default tier is test_reliability_runs' SIGTERM
def test_ctrl_c_saves_checkpoint_and_summary(tmp_path, stories_bin, cache_dir, tiny_config, capsys):
    """A real SIGINT to this process once the first checkpoint exists (what Ctrl-C sends)."""
    from qenv.callbacks import latest_checkpoint

    folder = tmp_path / "runs" / "interrupted"
    sent = threading.Event()

    def interrupt_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if list((folder / "checkpoints").glob("step_*.json")):
                os.kill(os.getpid(), signal.SIGINT)
                sent.set()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=interrupt_after_first_checkpoint, daemon=True)
    watcher.start()
    code = run_main(train_agent, ["--model", stories_bin, "--config", tiny_config, "--timesteps", 4096,
                                  "--checkpoint-freq", 64, "--logdir", tmp_path / "runs", "--name", "interrupted",
                                  "--no-progress", *SMALL_ENV])
    watcher.join()
    out, err = capsys.readouterr()
    assert sent.is_set()
    assert code == 130, err
    assert "Traceback" not in err and "Traceback" not in out
    assert "--resume" in out
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    step, _, state = latest_checkpoint(folder / "checkpoints")
    assert step == summary["timesteps"] and step % 64 == 0  # rewound to a whole rollout
    assert 0 < step < 4096 and summary["interrupted_at"] >= step
    assert json.loads(state.read_text())["num_timesteps"] == step
    assert (folder / "best_recipe.json").is_file() and (folder / "pareto.png").is_file()


@pytest.mark.slow  # extended tier: a second training run
def test_llamacpp_mix_is_recorded_and_an_over_budget_best_says_so(tmp_path, cache_dir, capsys):
    """The llamacpp agent scores its mix without stepping the env (its rules are not actions): the
    episode still reaches the tracker and best_recipe.json, and a mix above the budget (the default
    model's smallest llama.cpp mix is 4.5 bpw: every row falls back) is printed as over the budget."""
    code = run_main(train_agent, ["--agent", "llamacpp", "--budget-bpw", "3", "--logdir", tmp_path, "--name", "ll",
                                  "--no-progress", "--env-kwargs", "n_tokens=256", "seq_len=64"])
    assert code == 0
    out = capsys.readouterr().out
    best = json.loads((tmp_path / "ll" / "best_recipe.json").read_text())
    assert best["metrics"]["bpw"] == pytest.approx(4.5) and best["episode"] == 1
    assert "4.5 bpw; over the 3 bpw budget" in out
    summary = json.loads((tmp_path / "ll" / "summary.json").read_text())
    assert summary["episodes"] == 1 and summary["timesteps"] == 42


@pytest.mark.slow  # extended tier: two more training runs
def test_eval_freq_keeps_the_best_evaluated_policy_across_a_resume(tmp_path, stories_bin, cache_dir, tiny_config):
    """--eval-freq (rl-zoo3's flag): the deterministic policy is evaluated at the first rollout
    start at or after every N timesteps and at the end; best_model.zip is the best mean reward's
    policy (its own deterministic rollout scores exactly that), evaluations.npz holds every one,
    and a resumed run goes on from the evaluations of the checkpoint it resumes."""
    import numpy as np
    from stable_baselines3 import PPO

    from qenv.cli.envs import make_quant_env
    from qenv.envs.episodes import rollout_recipe

    folder = tmp_path / "runs" / "ev"
    code = run_main(train_agent, ["--model", stories_bin, "--config", tiny_config, "--timesteps", 128,
                                  "--eval-freq", 64, "--checkpoint-freq", 64, "--logdir", tmp_path / "runs",
                                  "--name", "ev", "--no-progress", *SMALL_ENV])
    assert code == 0
    first = np.load(folder / "evaluations.npz")
    assert first["timesteps"].tolist() == [64, 128] and first["results"].shape == (2, 1)
    # the checkpoint at 64 (the one resumed below) holds that step's evaluation and best model
    state = json.loads((folder / "checkpoints" / "step_0000000064.json").read_text())
    assert [e["timesteps"] for e in state["evaluations"]["records"]] == [64]
    assert (folder / "checkpoints" / "step_0000000064.best_model.zip").is_file()
    # a second session of the same run (as --resume continues one): extend it to 256 timesteps
    config = json.loads((folder / "config.json").read_text())
    config["total_timesteps"] = 256
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.zip").unlink()
    assert run_main(train_agent, ["--resume", folder, "--no-progress"]) == 0
    ev = np.load(folder / "evaluations.npz")
    assert ev["timesteps"].tolist() == [64, 128, 192, 256]
    # the checkpoint's evaluation (64) is carried over; 128 is evaluated again after training 64 -> 128 anew,
    # under the linear learning-rate schedule of the longer run (256), so it need not repeat the first session's
    assert ev["results"][:1].tolist() == first["results"][:1].tolist()
    summary = json.loads((folder / "summary.json").read_text())
    best = summary["best_eval"]
    assert best["evaluations"] == 4 and best["mean_reward"] == pytest.approx(float(ev["results"].max()))
    assert best["timesteps"] == int(ev["timesteps"][int(np.argmax(ev["results"][:, 0]))])
    env = make_quant_env(config=EnvConfig.from_dict(config["env"]))
    _, info = rollout_recipe(PPO.load(folder / "best_model.zip"), env, deterministic=True)
    assert info["episode_return"] == pytest.approx(best["mean_reward"], abs=1e-9)
    assert info["kl"] == pytest.approx(best["kl"][0], rel=1e-9)
    env.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tb" / "run_1"), size_guidance={"scalars": 0})
    acc.Reload()
    assert "eval/mean_reward" in acc.Tags()["scalars"]


@pytest.mark.slow  # extended tier: another training run
def test_eval_freq_best_model_keeps_the_normalisation_it_acted_with(tmp_path, stories_bin, cache_dir):
    """Behind VecNormalize the statistics move on after the best evaluation: best_model.zip gets its
    own (best_model.vecnormalize.json), which eval_agent.py and zero_shot_vs_greedy.py read for it
    (qenv.cli.common.normalizer_path), so its rollout scores what summary.json's best_eval says."""
    from qenv.agents.sb3 import NormalizedAgent
    from qenv.cli.common import normalizer_path
    from qenv.cli.envs import make_quant_env
    from qenv.envs.episodes import rollout_recipe
    from qenv.io import read_json
    from stable_baselines3 import PPO

    cfg = tmp_path / "n.yaml"
    cfg.write_text(TINY_PPO.replace("  env_kwargs:", "  normalize: {norm_obs: true, norm_reward: false}\n  env_kwargs:"))
    folder = tmp_path / "runs" / "nb"
    code = run_main(train_agent, ["--model", stories_bin, "--config", cfg, "--timesteps", 256, "--eval-freq", 64,
                                  "--logdir", tmp_path / "runs", "--name", "nb", "--no-progress", *SMALL_ENV])
    assert code == 0
    best = json.loads((folder / "summary.json").read_text())["best_eval"]
    assert normalizer_path(folder / "best_model.zip") == folder / "best_model.vecnormalize.json"
    assert normalizer_path(folder / "model.zip") == folder / "vecnormalize.json"
    # the best evaluation came before the end here, so the two sets of statistics differ
    assert best["timesteps"] < 256
    assert (folder / "best_model.vecnormalize.json").read_text() != (folder / "vecnormalize.json").read_text()
    config = json.loads((folder / "config.json").read_text())
    env = make_quant_env(config=EnvConfig.from_dict(config["env"]))
    agent = NormalizedAgent(PPO.load(folder / "best_model.zip"), read_json(normalizer_path(folder / "best_model.zip"),
                                                                           "stats", "retrain"))
    _, info = rollout_recipe(agent, env, deterministic=True)
    env.close()
    assert info["episode_return"] == pytest.approx(best["mean_reward"], abs=1e-9)
