"""Reliability (issues 6 and 13): runs killed halfway, one writer per run, resume, determinism.

- A ``SubprocVecEnv`` worker killed with SIGKILL is a clear error on the next step, not a hang.
- Atomic files: a process killed inside ``atomic_path`` leaves only a ``.*.tmp`` file, which a
  ``--resume`` removes (the SIGKILL-then-resume run itself is ``test_train_agent.py``'s
  ``test_resume_after_sigkill_reaches_the_same_total``, which also checks every file is whole).
- Determinism: the same seed gives the same recipes and metrics in two fresh processes, for the
  environment, every searcher and a short PPO run.
- One writer per run folder, with real processes: a training process holds its folder (a second
  ``--resume`` or ``--overwrite`` names its PID and touches nothing), three processes racing to create
  the same folder get it once, a lock left by a SIGKILLed process is taken over. SIGTERM to a real
  training process: checkpoint, summary, exit 143.
- Resume: after a real SIGINT inside an uncheckpointed rollout every episode is counted once (summary
  and TensorBoard, whose steps never go back); a run without checkpoints is refused.
- A checkpoint is scored on its run's model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from qenv.errors import QenvError
from conftest import load_script, run_main
from reliability_helpers import (REPO, assert_one_line_error, child_env, policy, tiny_ppo,  # noqa: F401 - fixtures
                                 train_argv, wait_for)


train_agent = load_script("train_agent")
eval_agent = load_script("eval_agent")


@pytest.mark.timeout(300)
@pytest.mark.slow  # extended tier: a SubprocVecEnv training with a worker killed
def test_dead_subproc_worker_is_a_clear_error_not_a_hang(stories_bin, cache_dir):
    from qenv.cli.envs import make_vec

    kwargs = {"model": str(stories_bin), "n_tokens": 512, "seq_len": 64, "cache_dir": str(cache_dir)}
    vec = make_vec(kwargs, n_envs=2, seed=0, vec_env="subproc")
    try:
        vec.reset()
        victim = vec.processes[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=60)
        assert victim.exitcode == -signal.SIGKILL
        outcome: dict[str, BaseException] = {}

        def step() -> None:
            try:
                vec.step(np.zeros(2, dtype=np.int64))
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertions below
                outcome["error"] = exc

        worker = threading.Thread(target=step, daemon=True)
        worker.start()
        worker.join(timeout=120)  # a hang guard, not a timing assertion
        assert not worker.is_alive(), "step() hung on a dead worker"
        error = outcome.get("error")
        assert isinstance(error, QenvError), repr(error)
        assert "vector-env worker process died" in error.problem and "worker 1" in error.problem
        assert "SIGKILL" in error.problem and "--resume" in error.fix
    finally:
        vec.close()  # closing around the dead worker works too
    assert all(not p.is_alive() for p in vec.processes)


def test_a_process_killed_mid_write_leaves_only_a_temp_file_that_resume_removes(tmp_path):
    from qenv.io import RunLock, remove_stale_temp_files

    target = tmp_path / "run" / "summary.json"
    script = ("import os, signal, sys\nfrom qenv.io import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n"
              "    tmp.write_text('{\"status\": \"runn')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not target.exists()  # no reader sees the half-written file
    left = sorted(p.name for p in target.parent.iterdir())
    assert len(left) == 1 and left[0].startswith(".summary.json.") and left[0].endswith(".tmp"), left
    with pytest.raises(RuntimeError, match="needs the run lock"):  # never without the folder's lock
        remove_stale_temp_files(tmp_path, RunLock(tmp_path))
    with RunLock(tmp_path).acquire() as lock:
        assert remove_stale_temp_files(tmp_path, lock) == [target.parent / left[0]]
    assert list(target.parent.iterdir()) == []


DETERMINISM_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from qenv.agents.base import rollout_recipe
from qenv.agents.registry import make_agent
from qenv.envs.quant_llm import QuantLLMEnv

env = QuantLLMEnv(sys.argv[1], n_tokens=512, seq_len=64, batch_size=4, cache_dir=sys.argv[2], seed=0)
keys = ("kl", "ppl", "top1", "bpw", "model_bytes")
out = {}
env.action_space.seed(3)
obs, _ = env.reset(seed=3)
done, total = False, 0.0
while not done:
    obs, reward, done, _, info = env.step(env.action_space.sample())
    total += reward
out["env"] = {"recipe": info["recipe"], "reward": total, **{k: info[k] for k in keys}}
n = len(env.task.layers)
starts = len(make_agent("random", env).start_candidates())  # the best start's evaluations: the same for any seed
for name in ("uniform", "llamacpp", "greedy", "random", "evolution"):
    agent = make_agent(name, env, seed=5).learn((starts + 4 if name == "random" else 4) * n)
    out[name] = {"recipe": agent.best_recipe.to_dict(), "history": agent.history,
                 **{k: agent.best_info[k] for k in keys}}
    if name == "random":  # it starts at the best start (the same for any seed); its own proposals follow
        out[name]["proposed"] = [list(k) for k in agent._seen]
other = make_agent("random", env, seed=6).learn((starts + 4) * n)
out["random_seed6"] = {"recipe": other.best_recipe.to_dict(), "proposed": [list(k) for k in other._seen]}
ppo = make_agent("ppo", env, seed=5, n_steps=n, batch_size=n, n_epochs=2, policy_kwargs={"net_arch": [16, 16]})
ppo.learn(2 * n)
recipe, info = rollout_recipe(ppo, env)
weights = float(sum(p.detach().double().sum() for p in ppo.model.policy.parameters()))
out["ppo"] = {"recipe": recipe.to_dict(), "policy_weight_sum": weights, **{k: info[k] for k in keys}}
print(json.dumps(out, sort_keys=True))
"""


@pytest.mark.timeout(300)
@pytest.mark.slow  # extended tier: every searcher and PPO in two fresh processes
def test_same_seed_same_recipes_and_metrics_in_fresh_processes(stories_bin, tmp_path):
    """Two processes (different hash seeds; one computes everything, one finds a cache written by a
    run with another batch size): the environment, every searcher and a short PPO run give
    identical recipes, metrics and policy weights."""
    from qenv.envs.quant_llm import QuantLLMEnv

    warm = tmp_path / "warm-cache"
    QuantLLMEnv(str(stories_bin), n_tokens=512, seq_len=64, batch_size=8, cache_dir=warm, seed=0)
    runs = []
    for hash_seed, cache in (("1", tmp_path / "cold-cache"), ("2", warm)):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        runs.append(subprocess.Popen([sys.executable, "-c", DETERMINISM_SCRIPT, str(stories_bin), str(cache)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path))
    results = []
    for proc in runs:
        out, err = proc.communicate(timeout=280)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    first, second = results
    assert set(first) == {"env", "uniform", "llamacpp", "greedy", "random", "evolution", "random_seed6", "ppo"}
    for name in first:
        assert first[name] == second[name], name
    assert first["random_seed6"]["proposed"] != first["random"]["proposed"]  # the seed is what decides


@pytest.mark.timeout(420)
def test_second_writer_is_refused_and_sigterm_saves_like_ctrl_c(stories_bin, cache_dir, tiny_ppo, tmp_path, capsys):
    """A real training process holds its run folder: --resume and --overwrite from another process are
    refused naming its PID, and nothing of it is touched. SIGTERM then checkpoints, writes the summary
    and exits with 143, like Ctrl-C with 130."""
    from qenv.callbacks import latest_checkpoint

    logdir = tmp_path / "runs"
    folder = logdir / "busy"
    proc = subprocess.Popen([sys.executable, str(REPO / "train_agent.py"),
                             *train_argv(stories_bin, tiny_ppo, logdir, "busy", 100_000)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(cache_dir),
                            cwd=tmp_path)
    try:
        wait_for(lambda: bool(list((folder / "checkpoints").glob("step_*.json"))), proc)
        assert (folder / ".lock").read_text().strip() == str(proc.pid)
        # the writer's own temporary files come and go (write, then rename): only whole files count
        before = sorted(p.name for p in folder.iterdir() if not p.name.endswith(".tmp"))
        for argv in (["--resume", folder, "--no-progress"],
                     train_argv(stories_bin, tiny_ppo, logdir, "busy", 64) + ["--overwrite"]):
            code = run_main(train_agent, argv)
            assert_one_line_error(code, capsys.readouterr().err, f"is in use: process {proc.pid} is writing to it")
            assert proc.poll() is None and (folder / "config.json").is_file()
            assert set(before) <= {p.name for p in folder.iterdir()}  # nothing removed
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated (SIGTERM)" in out and "--resume" in out
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stopped_by"] == "SIGTERM"
    step, _, state = latest_checkpoint(folder / "checkpoints")
    assert step == summary["timesteps"] and step % 64 == 0 and json.loads(state.read_text())["num_timesteps"] == step
    assert not (folder / ".lock").exists()  # released on the way out


LOCK_SCRIPT = """
import sys, time
from pathlib import Path
from qenv.cli.common import new_run_dir
from qenv.errors import QenvError
start = Path(sys.argv[2])
while not start.exists():
    time.sleep(0.001)
try:
    folder, lock = new_run_dir(sys.argv[1], "same")
except QenvError as exc:
    print("refused", exc.problem, flush=True)
    sys.exit(0)
(folder / "config.json").write_text("{}")
print("created", flush=True)
time.sleep(3)
lock.release()
"""


@pytest.mark.timeout(300)
# extended tier: three processes (one writer per run stays in the default tier:
# test_second_writer_is_refused_and_sigterm_saves_like_ctrl_c)
@pytest.mark.slow
def test_racing_processes_create_a_run_folder_once(tmp_path):
    """Three processes start the same new run folder at the same instant: exactly one gets it."""
    logdir, start = tmp_path / "runs", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", LOCK_SCRIPT, str(logdir), str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
             for _ in range(3)]
    import time

    time.sleep(2.0)  # let them import and wait at the start line
    start.write_text("go")
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    said = [o.strip() for o, _ in outs]
    assert sum(s == "created" for s in said) == 1, said
    for line in said:
        assert line == "created" or ("is in use: process" in line or "already exists" in line), said
    assert sorted(p.name for p in (logdir / "same").iterdir()) == ["config.json"]


# extended tier: a killed process (a dead writer's lock is taken over in test_train_agent's --resume after SIGKILL)
@pytest.mark.slow
def test_a_stale_lock_of_a_killed_process_is_recovered(tmp_path):
    from qenv.io import RunLock

    script = ("import os, signal, sys\nfrom qenv.io import RunLock\nRunLock(sys.argv[1]).acquire()\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / ".lock").is_file()  # left behind, with the dead process's PID
    dead = int((tmp_path / ".lock").read_text())
    with RunLock(tmp_path).acquire() as lock:
        assert lock.recovered_from == dead
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(QenvError, match=f"is in use: process {os.getpid()}"):
            RunLock(tmp_path).acquire()  # a second holder, even in the same process
    assert not (tmp_path / ".lock").exists()


def tb_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted((folder / "tb").iterdir())
    assert len(runs) == 1, runs
    acc = EventAccumulator(str(runs[0]), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.timeout(420)
@pytest.mark.slow  # extended tier: two training sessions
def test_resume_after_ctrl_c_counts_every_episode_once(stories_bin, cache_dir, tiny_ppo, tmp_path, capsys, monkeypatch):
    """Ctrl-C (a real SIGINT) once an episode has ended inside a rollout that is not checkpointed: the run
    is rewound to the rollout's start, and after --resume every episode is counted once, in the
    summary and in TensorBoard (whose steps never go back: the interrupted session's later events
    are purged)."""
    from qenv import callbacks

    original = callbacks.QuantEpisodeCallback.record
    fired = []

    def record(self, info, reward, timestep):
        original(self, info, reward, timestep)
        done = [int(p.stem.split("_")[1]) for p in (folder / "checkpoints").glob("step_*.json")]
        if done and not fired and timestep > max(done):
            fired.append(timestep)
            os.kill(os.getpid(), signal.SIGINT)

    folder = tmp_path / "runs" / "r"
    monkeypatch.setattr(callbacks.QuantEpisodeCallback, "record", record)
    code = run_main(train_agent, train_argv(stories_bin, tiny_ppo, tmp_path / "runs", "r", 384))
    assert code == 130 and fired, capsys.readouterr().err
    first = json.loads((folder / "summary.json").read_text())
    assert first["timesteps"] < fired[0] <= first["interrupted_at"]  # an episode ended after the checkpoint
    monkeypatch.setattr(callbacks.QuantEpisodeCallback, "record", original)
    assert run_main(train_agent, ["--resume", folder, "--no-progress"]) == 0
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["sessions"] == 2
    episodes = tb_scalars(folder, "episode/reward")
    steps = [s for s, _ in episodes]
    assert steps == sorted(set(steps)), steps  # no step twice, never backwards
    assert len(episodes) == summary["episodes"]
    assert abs(summary["episodes"] - 384 / 35) <= 2  # about one episode per 35 layers, not more


def test_a_resumed_session_starts_its_event_file_in_a_later_second(tmp_path):
    """TensorBoard orders event files by name (creation second, host, PID): a resumed session that
    started in the same second as the one it continues could be read first, losing its purge."""
    import time

    from qenv.callbacks import wait_past_event_files

    now = int(time.time())
    (tmp_path / "run_1").mkdir()
    (tmp_path / "run_1" / f"events.out.tfevents.{now}.host.99999.0").write_bytes(b"")
    wait_past_event_files(tmp_path)
    assert int(time.time()) > now


RUN_CONFIG = {"env_id": "QuantLLM-v0", "agent": "ppo", "seed": 0, "total_timesteps": 999, "n_envs": 1,
              "vec_env": "dummy", "checkpoint_freq": 64, "env_kwargs": {}, "config_section": {}, "keep_checkpoints": 5,
              "argv": ["--name", "gone", "--timesteps", "999"]}


def test_resume_without_checkpoints_is_refused(tmp_path, capsys):
    folder = tmp_path / "runs" / "gone"
    folder.mkdir(parents=True)
    config = RUN_CONFIG
    (folder / "config.json").write_text(json.dumps(config))
    code = run_main(train_agent, ["--resume", folder, "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, "has no complete checkpoint to resume from")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]  # nothing written, lock released
    # a config.json edited by hand is refused by name
    (folder / "config.json").write_text(json.dumps({**config, "n_envs": "two", "agent": None}))
    code = run_main(train_agent, ["--resume", folder, "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, "lacks or garbles agent, n_envs")


@pytest.mark.slow  # extended tier: an evaluation of a checkpoint
def test_a_checkpoint_is_scored_on_its_runs_model(policy, stories_bin, tmp_path, capsys):
    """--policy <run>/checkpoints/step_N.zip: the run's settings are read from the folder above."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(policy.parent / "config.json", run / "config.json")
    ckpt = run / "checkpoints" / "step_0000000064.zip"
    shutil.copy(policy, ckpt)
    assert run_main(eval_agent, ["--policy", ckpt, "--searchers", "none", "--out", tmp_path / "out"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["run"] == str(run)
    assert [m["spec"] for m in results["models"]] == [str(stories_bin)] and results["models"][0]["seen"]
    assert "stories260K" in capsys.readouterr().out
    # a run folder stands for its final agent
    assert run_main(eval_agent, ["--policy", policy.parent, "--searchers", "none", "--out", tmp_path / "out2"]) == 0
    assert json.loads((tmp_path / "out2" / "results.json").read_text())["policy"] == str(policy)
