"""Reliability (issue 28, round three): data loss and outputs.

Through the programs (``train_agent.main`` / ``eval_agent.main`` / ``python -m qenv`` in this
process, real subprocesses for signals): every refusal is exit status 2 and one ``error: ... Fix:``
line, comes before any work (the eval cases name a model that does not exist: a later check would
give another error), and leaves every file that was there byte-identical, links and their targets
included.

- ``--overwrite`` empties only a run of train_agent.py (its config.json or summary.json names
  env_id, agent and total_timesteps), never a symbolic link's target, a folder of photos or a model
  folder; nor a run folder that holds the ``--init-from`` policy it is about to read.
- ``cache --clear`` deletes qenv's exact file names only.
- eval_agent.py's outputs: never the policy's run folder (or a folder holding it), never another run
  folder, never a non-empty folder it did not write; two evaluations started in the same second get
  two folders; ``--overwrite`` replaces an earlier evaluation's files and nothing else.
- Names: a component longer than NAME_MAX is refused up front; a name with a trailing newline is not
  a plain name; ``--timesteps -5`` says what is wrong with the timesteps.
- SIGHUP (a closed terminal) checkpoints like SIGTERM; ``--resume`` after the model file changed
  is refused, and the recorded fingerprints stay as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINYSTORIES, load_script, require, run_main
from reliability_helpers import (SMALL, TINY_PPO, assert_one_line_error, child_env, stories_evaluator,  # noqa: F401
                                 tiny_ppo, train_argv, wait_for)  # stories_evaluator, tiny_ppo: fixtures

REPO = Path(__file__).resolve().parents[1]
train_agent = load_script("train_agent")
eval_agent = load_script("eval_agent")


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file (its bytes) and link (its target) under ``root``, by relative path."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                out[rel] = path.read_bytes()
    return out


def user_folder(path: Path) -> Path:
    """A folder of someone's own files (never written by qenv)."""
    path.mkdir(parents=True)
    (path / "holiday.jpg").write_bytes(bytes(range(256)) * 4)
    (path / "notes.txt").write_text("mine\n")
    (path / "pareto.png").write_bytes(b"\x89PNG my own plot")
    return path


RUN_CONFIG = {"version": 1, "env_id": "QuantLLM-v0", "agent": "ppo", "seed": 0, "total_timesteps": 64, "n_envs": 1,
              "vec_env": "dummy", "checkpoint_freq": 64, "env_kwargs": {}, "config_section": {}, "keep_checkpoints": 5}


def run_folder(path: Path, **extra) -> Path:
    """A folder holding what marks a run of train_agent.py (its config.json)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**RUN_CONFIG, **extra}))
    (path / "summary.json").write_text(json.dumps({"status": "complete", **RUN_CONFIG}))
    return path


@pytest.fixture(scope="module")
def policy_zip(stories_bin, cache_dir, tmp_path_factory) -> Path:
    """A real (untrained) PPO agent on stories260K, with the spaces of ``SMALL``'s environment."""
    from qenv.agents.registry import make_agent
    from qenv.envs.quant_llm import QuantLLMEnv

    folder = tmp_path_factory.mktemp("policy")
    env = QuantLLMEnv(str(stories_bin), n_tokens=512, seq_len=64, cache_dir=cache_dir)
    make_agent("ppo", env, seed=0, n_steps=64, batch_size=32, policy_kwargs={"net_arch": [16]}).save(
        folder / "model.zip")
    return folder / "model.zip"


# -- train_agent.py: --overwrite, names, timesteps -----------------------------------------------------------
def _symlinked(t: Path, overwrite: bool):
    thesis = user_folder(t / "thesis")
    (t / "runs").mkdir()
    (t / "runs" / "x").symlink_to(thesis)
    return ["--logdir", t / "runs", "--name", "x", *(["--overwrite"] if overwrite else [])]


def _symlinked_to_a_run(t: Path):
    run_folder(t / "elsewhere" / "old")
    (t / "runs").mkdir()
    (t / "runs" / "x").symlink_to(t / "elsewhere" / "old")
    return ["--logdir", t / "runs", "--name", "x", "--overwrite"]


def _photos(t: Path, overwrite: bool):
    user_folder(t / "photos")
    return ["--logdir", t, "--name", "photos", *(["--overwrite"] if overwrite else [])]


def _model_folder(t: Path):
    folder = t / "models" / "tiny"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    return ["--logdir", t / "models", "--name", "tiny", "--overwrite"]


def _init_from_inside(t: Path, policy: Path):
    folder = run_folder(t / "runs" / "x")
    shutil.copy(policy, folder / "model.zip")
    return ["--logdir", t / "runs", "--name", "x", "--overwrite", "--init-from", folder / "model.zip"]


TRAIN_REFUSALS = {
    # case: (setup(tmp_path, policy) -> argv, phrase of the error line)
    "overwrite_symlink_to_a_thesis": (lambda t, p: _symlinked(t, True), "is a symbolic link"),
    "symlink_without_overwrite": (lambda t, p: _symlinked(t, False), "is a symbolic link"),
    "overwrite_symlink_to_a_run": (lambda t, p: _symlinked_to_a_run(t), "is a symbolic link"),
    "overwrite_folder_of_photos": (lambda t, p: _photos(t, True), "is not a run of train_agent.py"),
    "folder_of_photos_without_overwrite": (lambda t, p: _photos(t, False), "is not a run of train_agent.py"),
    "overwrite_a_model_folder": (lambda t, p: _model_folder(t), "is not a run of train_agent.py"),
    "overwrite_the_init_from_run": (_init_from_inside, "is inside the run folder"),
    "name_of_256_bytes": (lambda t, p: ["--logdir", t / "runs", "--name", "n" * 256], "is a name of 256 bytes"),
    "name_with_a_trailing_newline": (lambda t, p: ["--logdir", t / "runs", "--name", "x\n"],
                                     "is not a plain folder name"),
    "logdir_component_too_long": (lambda t, p: ["--logdir", t / ("d" * 300) / "runs", "--name", "x"],
                                  "is a name of 300 bytes"),
    "timesteps_negative": (lambda t, p: ["--logdir", t / "runs", "--name", "x", "--timesteps", -5],
                           "--timesteps=-5 must be positive"),
}


@pytest.mark.parametrize("case", list(TRAIN_REFUSALS))
def test_train_agent_refuses_before_touching_anything(case, stories_bin, policy_zip, cache_dir, tmp_path, capsys):
    setup, needle = TRAIN_REFUSALS[case]
    argv = setup(tmp_path, policy_zip)
    before = snapshot(tmp_path)
    code = run_main(train_agent, ["--model", stories_bin, "--no-progress", "--timesteps", 64, *SMALL, *argv])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, needle)
    assert "--eval-freq" not in err  # (timesteps_negative) the flag that was not given is not blamed
    assert snapshot(tmp_path) == before  # nothing written, nothing deleted, links and their targets whole
    assert not list(tmp_path.rglob(".lock"))


def test_overwrite_replaces_a_run_and_an_empty_folder_is_reused(stories_bin, cache_dir, tmp_path):
    """What --overwrite is for still works: a run folder (and only its contents) is replaced; an empty
    folder needs no --overwrite."""
    from qenv.cli.common import new_run_dir

    old = run_folder(tmp_path / "runs" / "x")
    (old / "checkpoints").mkdir()
    (old / "checkpoints" / "step_0000000064.zip").write_bytes(b"old")
    folder, lock = new_run_dir(tmp_path / "runs", "x", overwrite=True)
    with lock:
        assert folder == old and sorted(p.name for p in folder.iterdir()) == [".lock"]
    (tmp_path / "runs" / "empty").mkdir()
    folder, lock = new_run_dir(tmp_path / "runs", "empty")
    lock.release()
    assert folder.is_dir() and not any(folder.iterdir())


# -- python -m qenv cache --clear ---------------------------------------------------------------------------
USER_FILES = ["reference-letter.docx", "tokens-backup.txt", "errors-2024.log", "features-wishlist.md",
              "reference-v2-draft.safetensors", ".tokens-backup.txt.abcdefgh.tmp", "features-v2-0123456789abcdef.npy.bak"]
KEY = "0123456789abcdef"
QENV_FILES = [f"reference-v3-{KEY}-{KEY}{KEY}.safetensors", f"reference-v2-{KEY}-89abcdef-{KEY}-b8x8-n01234567.safetensors",
              f"tokens-{KEY}-s0-n512-l64-n01234567.safetensors", f"features-v3-{KEY}.safetensors",
              f"errors-v2-{KEY}.safetensors", f"features-v2-{KEY}.npy", f".errors-v2-{KEY}.safetensors.x1_y2z3a.tmp"]


@pytest.mark.parametrize("name", USER_FILES)
def test_cache_clear_leaves_files_that_only_begin_like_qenvs(name, tmp_path, monkeypatch, capsys):
    from qenv.__main__ import main

    monkeypatch.setenv("QENV_CACHE_DIR", str(tmp_path))
    for qenv_name in QENV_FILES:
        (tmp_path / qenv_name).write_bytes(b"cached")
    (tmp_path / name).write_bytes(b"the user's own " + name.encode())
    assert main(["cache", "--clear"]) == 0
    assert f"removed {len(QENV_FILES)} file(s)" in capsys.readouterr().out
    assert snapshot(tmp_path) == {name: b"the user's own " + name.encode()}


# -- eval_agent.py's outputs ----------------------------------------------------------------------------------
@pytest.fixture()
def policy_run(policy_zip, tmp_path) -> Path:
    """The policy in a run folder of train_agent.py, ``<tmp>/runs/p``."""
    folder = run_folder(tmp_path / "runs" / "p", env_kwargs={"n_tokens": 512, "seq_len": 64})
    shutil.copy(policy_zip, folder / "model.zip")
    return folder


def _linked_out(t: Path) -> Path:
    (t / "link").symlink_to(user_folder(t / "photos"))
    return t / "link"


def _saved_model_lookalike(t: Path) -> Path:
    folder = user_folder(t / "mine")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


EVAL_REFUSALS = {
    # case: (argv after --policy (setup(tmp_path, run folder) -> argv), phrase of the error line)
    "out_is_the_policys_run": (lambda t, r: ["--out", r], "is the run folder"),
    "out_is_the_policys_run_overwrite": (lambda t, r: ["--out", r, "--overwrite"], "is the run folder"),
    "out_holds_the_policys_run": (lambda t, r: ["--out", r.parent, "--overwrite"], "holds the run folder"),
    "save_model_is_the_policys_run": (lambda t, r: ["--save-model", r, "--overwrite"],
                                      "--save-model {run} is the run folder"),
    "save_model_holds_the_policys_run": (lambda t, r: ["--save-model", t, "--overwrite"], "holds the run folder"),
    "out_is_another_run": (lambda t, r: ["--out", run_folder(t / "runs" / "other"), "--overwrite"],
                           "is a run folder of train_agent.py"),
    "out_not_empty": (lambda t, r: ["--out", user_folder(t / "photos")], "is not an output folder of eval_agent.py"),
    "out_not_empty_overwrite": (lambda t, r: ["--out", user_folder(t / "photos"), "--overwrite"],
                                "is not an output folder of eval_agent.py"),
    "out_a_symlink": (lambda t, r: ["--out", _linked_out(t), "--overwrite"], "is a symbolic link"),
    "out_component_of_300_bytes": (lambda t, r: ["--out", t / ("o" * 300) / "e"], "is a name of 300 bytes"),
    "save_model_of_250_bytes": (lambda t, r: ["--save-model", t / ("s" * 250)], "kept for temporary names"),
    "save_model_not_a_saved_model": (lambda t, r: ["--save-model", _saved_model_lookalike(t), "--overwrite"],
                                     "is not a model saved by eval_agent.py"),
}


@pytest.mark.parametrize("case", list(EVAL_REFUSALS))
def test_eval_agent_refuses_outputs_before_any_work(case, policy_run, tmp_path, capsys):
    setup, needle = EVAL_REFUSALS[case]
    argv = setup(tmp_path, policy_run)
    before = snapshot(tmp_path)
    code = run_main(eval_agent, ["--policy", policy_run / "model.zip", "--model", tmp_path / "no-such-model",
                                 "--searchers", "none", *argv])
    assert_one_line_error(code, capsys.readouterr().err, needle.format(run=policy_run))
    assert snapshot(tmp_path) == before


@pytest.mark.timeout(900)
@pytest.mark.slow  # extended tier: several eval_agent.py runs
def test_evaluations_never_share_or_replace_a_folder(policy_run, cache_dir, tmp_path, monkeypatch, capsys):
    """Two evaluations started in the same second get eval-<time> and eval-<time>-2 (each whole); the
    same explicit --out again is refused; --overwrite replaces that evaluation's own files and keeps
    the user's note beside them."""
    import time

    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    argv = ["--policy", policy_run / "model.zip", "--searchers", "none", "--n-tokens", 256]
    assert run_main(eval_agent, argv) == 0
    first = policy_run / "eval-20260101-000000"
    kept = snapshot(first)
    assert {"results.json", "results.csv", "pareto.png"} <= set(kept)
    assert run_main(eval_agent, argv + ["--budget-bpw", 4.0]) == 0
    second = policy_run / "eval-20260101-000000-2"
    assert snapshot(first) == kept  # the first evaluation's results are not lost
    assert json.loads((second / "results.json").read_text())["budget_bpw"] == 4.0
    capsys.readouterr()
    (first / "my-notes.txt").write_text("keep me")
    kept = snapshot(policy_run)
    code = run_main(eval_agent, argv + ["--out", first, "--budget-bpw", 4.0])
    assert_one_line_error(code, capsys.readouterr().err, "already exists")
    assert snapshot(policy_run) == kept
    assert run_main(eval_agent, argv + ["--out", first, "--budget-bpw", 4.0, "--overwrite"]) == 0
    assert json.loads((first / "results.json").read_text())["budget_bpw"] == 4.0
    assert (first / "my-notes.txt").read_text() == "keep me" and not (first / ".lock").exists()


# -- SIGHUP, and --resume after the model changed ---------------------------------------------------------------
@pytest.fixture(scope="module")
def hung_up_run(stories_bin, cache_dir, tmp_path_factory) -> dict[str, object]:
    """A real training process on a copy of stories260K, calibrated on a copy of TinyStories text, sent
    SIGHUP (what a closed terminal sends) after its first checkpoint."""
    require(TINYSTORIES, "TinyStories text")
    root = tmp_path_factory.mktemp("hup")
    model = root / "model" / "stories260K.bin"
    model.parent.mkdir()
    shutil.copy(stories_bin, model)
    shutil.copy(stories_bin.parent / "tok512.model", model.parent / "tok512.model")
    text = root / "calibration.txt"
    shutil.copy(TINYSTORIES, text)
    config = root / "tiny_ppo.yaml"
    config.write_text(TINY_PPO)
    folder = root / "runs" / "hup"
    proc = subprocess.Popen([sys.executable, str(REPO / "train_agent.py"), "--model", str(model), "--config",
                             str(config), "--timesteps", "100000", "--checkpoint-freq", "64", "--logdir",
                             str(root / "runs"), "--name", "hup", "--no-progress", "--data", str(text),
                             *map(str, SMALL)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(cache_dir),
                            cwd=root)
    try:
        wait_for(lambda: bool(list((folder / "checkpoints").glob("step_*.json"))), proc)
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"folder": folder, "model": model, "text": text, "code": proc.returncode, "out": out, "err": err}


@pytest.mark.timeout(420)
@pytest.mark.slow  # extended tier: a training process hung up (the default tier's saving signal: SIGTERM)
def test_sighup_saves_a_checkpoint_and_the_summary_like_sigterm(hung_up_run):
    from qenv.callbacks import latest_checkpoint

    folder = hung_up_run["folder"]
    assert hung_up_run["code"] == 129, hung_up_run["err"]
    assert "Traceback" not in hung_up_run["err"] and "terminated (SIGHUP)" in hung_up_run["out"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stopped_by"] == "SIGHUP"
    step, _, state = latest_checkpoint(folder / "checkpoints")
    assert step == summary["timesteps"] and step % 64 == 0
    prints = json.loads(state.read_text())["fingerprints"]
    assert prints[0]["model_fingerprint"] == summary["train_models"][0]["fingerprint"] and prints[0]["tokens_fingerprint"]
    assert not (folder / ".lock").exists()


@pytest.mark.timeout(420)
@pytest.mark.slow  # extended tier: a training process under a closed terminal
def test_sighup_from_a_closed_terminal_still_saves(stories_bin, cache_dir, tmp_path):
    """The terminal is really gone (its pseudo-terminal's other end closed: every write to it fails
    with EIO): the checkpoint and summary are still written, and the exit status is SIGHUP's."""
    import pty

    from qenv.callbacks import latest_checkpoint

    config = tmp_path / "tiny_ppo.yaml"
    config.write_text(TINY_PPO)
    folder = tmp_path / "runs" / "tty"
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(REPO / "train_agent.py"), "--model", str(stories_bin), "--config",
                             str(config), "--timesteps", "100000", "--checkpoint-freq", "64", "--logdir",
                             str(tmp_path / "runs"), "--name", "tty", "--no-progress", *map(str, SMALL)],
                            stdin=slave, stdout=slave, stderr=slave, env=child_env(cache_dir), cwd=tmp_path)
    os.close(slave)
    try:
        wait_for(lambda: bool(list((folder / "checkpoints").glob("step_*.json"))), proc)
        os.close(master)  # the terminal window closes ...
        proc.send_signal(signal.SIGHUP)  # ... and its process group is sent SIGHUP
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 129
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stopped_by"] == "SIGHUP"
    assert latest_checkpoint(folder / "checkpoints")[0] == summary["timesteps"]


def _drop_fingerprints(folder: Path) -> None:
    """A checkpoint written before fingerprints were kept: the summary's model fingerprint is compared."""
    for state in (folder / "checkpoints").glob("step_*.json"):
        data = json.loads(state.read_text())
        data.pop("fingerprints")
        state.write_text(json.dumps(data))


def _scaled_weights(data: bytes) -> bytes:
    weights = np.frombuffer(data, dtype=np.float32).copy()
    weights[7:] *= 1.01  # the same file, other weights (the 28-byte header is 7 int32 and kept)
    return weights.tobytes()


RESUME_CHANGES = {
    # case: (which file changes, how, drop the checkpoint's fingerprints?, phrase of the error line)
    "model_file_changed": ("model", _scaled_weights, False, "the model {model} changed since the checkpoint"),
    "model_changed_older_checkpoint": ("model", _scaled_weights, True, "the model {model} changed since the checkpoint"),
    "calibration_text_changed": ("text", lambda data: b"A fox sang all night. " + data, False,
                                 "the calibration tokens of {model} changed since the checkpoint"),
}


@pytest.mark.timeout(420)
@pytest.mark.parametrize("case", list(RESUME_CHANGES))
@pytest.mark.slow  # extended tier: needs the hung-up training process
def test_resume_after_the_model_or_its_text_changed_is_refused(case, hung_up_run, tmp_path, capsys):
    which, change, drop, needle = RESUME_CHANGES[case]
    folder = tmp_path / "hup"
    shutil.copytree(hung_up_run["folder"], folder)
    if drop:
        _drop_fingerprints(folder)
    path: Path = hung_up_run[which]
    original = path.read_bytes()
    before = snapshot(folder)
    try:
        path.write_bytes(change(original))
        code = run_main(train_agent, ["--resume", folder, "--no-progress"])
    finally:
        path.write_bytes(original)
    assert_one_line_error(code, capsys.readouterr().err, needle.format(model=hung_up_run["model"]))
    assert snapshot(folder) == before  # the recorded fingerprints are not rewritten, nothing else either


def test_an_out_folder_in_use_by_another_evaluation_is_refused(policy_run, tmp_path, capsys):
    """--out is locked for the evaluation's life, as a run folder is: a second evaluation into the same
    folder is refused before any work, naming the holder."""
    from qenv.io import RunLock

    out = tmp_path / "shared-out"
    out.mkdir()
    with RunLock(out).acquire():  # another evaluation, writing there now
        code = run_main(eval_agent, ["--policy", policy_run / "model.zip", "--model", tmp_path / "no-such-model",
                                     "--searchers", "none", "--out", out])
        assert_one_line_error(code, capsys.readouterr().err, f"output folder {out} is in use: process {os.getpid()}")
    assert not any(out.iterdir())


# -- file modes, an unwritable --logdir, a disk error (issue 13) ------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_honour_the_umask(umask, stories_evaluator, tmp_path):
    from qenv.export import export_all, save_quantized_model
    from qenv.io import write_json_atomic
    from qenv.quant.presets import preset

    old = os.umask(umask)
    try:
        ev = stories_evaluator
        recipe = preset("rtn-w4", ev.layers)
        write_json_atomic(tmp_path / "a" / "x.json", {"a": 1})
        paths = export_all(tmp_path / "export", ev.layers, recipe)
        saved = save_quantized_model(ev, recipe, tmp_path / "model")
    finally:
        os.umask(old)
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "a" / "x.json") == file_mode
    for kind, path in paths.items():
        assert mode(path) == (dir_mode if kind == "llamacpp_command" else file_mode), kind
    assert mode(saved) == dir_mode
    assert all(mode(p) == file_mode for p in saved.iterdir() if p.is_file())


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
@pytest.mark.slow  # extended tier: a training process as another user
def test_unwritable_logdir_is_one_line_even_for_root(stories_bin, cache_dir, tmp_path):
    """Root ignores chmod; without CAP_DAC_OVERRIDE it does not, as any user would be refused."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    caps = "-dac_override,-dac_read_search"
    proc = subprocess.run(["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", sys.executable,
                           str(REPO / "train_agent.py"), "--model", str(stories_bin), "--logdir", str(locked / "runs"),
                           "--no-progress", *map(str, SMALL)],
                          capture_output=True, text=True, cwd=tmp_path, env=child_env(cache_dir), timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr, f"--logdir {locked / 'runs'} cannot be written")
    assert list(locked.iterdir()) == []
    # a run folder that cannot be written to cannot be resumed (its lock cannot even be taken)
    run = tmp_path / "readonly-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(RUN_CONFIG))
    run.chmod(0o555)
    proc = subprocess.run(["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", sys.executable,
                           str(REPO / "train_agent.py"), "--resume", str(run), "--no-progress"],
                          capture_output=True, text=True, cwd=tmp_path, env=child_env(cache_dir), timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr, f"run folder {run} cannot be locked for writing")
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


@pytest.mark.timeout(300)
@pytest.mark.slow  # extended tier: a training process on a full disk
def test_a_disk_error_is_one_line_and_leaves_only_whole_files(stories_bin, cache_dir, tiny_ppo, tmp_path):
    """A real write failure: the process may not write files over 36 kB (RLIMIT_FSIZE, EFBIG), so the
    first checkpoint's agent zip (about 41 kB) fails halfway. One line, exit status 74, and every file
    in the run folder is whole (nothing half-written, no temporary file left)."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (36_000, 36_000))

    logdir = tmp_path / "runs"
    proc = subprocess.run([sys.executable, str(REPO / "train_agent.py"),
                           *train_argv(stories_bin, tiny_ppo, logdir, "full", 256), "--env-kwargs", "cache_dir=false"],
                          capture_output=True, text=True, env=child_env(cache_dir), cwd=tmp_path, timeout=280,
                          preexec_fn=limit)
    ckpt = logdir / "full" / "checkpoints" / "step_0000000064.zip"
    assert_one_line_error(proc.returncode if proc.returncode != 74 else 2, proc.stderr,
                          f"Writing {ckpt} failed: File too large")
    assert proc.returncode == 74 and "--resume" in proc.stderr
    for path in (logdir / "full").rglob("*"):
        assert not path.name.endswith(".tmp"), path
        if path.suffix == ".json":
            json.loads(path.read_text())
    assert not ckpt.exists() and not (logdir / "full" / ".lock").exists()
