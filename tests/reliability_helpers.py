"""Helpers and fixtures the reliability test modules share (issues 6, 13, 28): the one-line error
check, a pickle payload that must never run, an untrained PPO run on stories260K, a stories260K
evaluator, a tiny PPO config, and waiting on real child processes. Imported, not collected."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


SMALL = ["--env-kwargs", "n_tokens=512", "seq_len=64"]


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and " Fix: " in lines[0], lines[0]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err


class Payload:
    """Unpickling this runs code that creates ``marker``: it must never be unpickled by qenv."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('executed')",)


def craft_policy(policy: Path, target: Path, marker: Path) -> Path:
    """``policy`` with its pickled ``policy_class`` replaced by a payload that creates ``marker``
    (with the run's config.json beside it, so the same small environment is used)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(policy.parent / "config.json", target.parent / "config.json")
    with zipfile.ZipFile(policy) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "data":
                payload = json.loads(data)
                payload["policy_class"][":serialized:"] = base64.b64encode(pickle.dumps(Payload(marker))).decode()
                data = json.dumps(payload).encode()
            dst.writestr(item, data)
    return target


@pytest.fixture(scope="module")
def policy(stories_bin, cache_dir, tmp_path_factory) -> Path:
    """A real (untrained) PPO agent on stories260K saved as a run folder's model.zip."""
    from qenv.agents.registry import make_agent
    from qenv.envs.quant_llm import QuantLLMEnv

    folder = tmp_path_factory.mktemp("run")
    env = QuantLLMEnv(str(stories_bin), n_tokens=512, seq_len=64, cache_dir=cache_dir)
    agent = make_agent("ppo", env, seed=0, n_steps=64, batch_size=32, policy_kwargs={"net_arch": [16]})
    agent.save(folder / "model.zip")
    (folder / "config.json").write_text(json.dumps({
        "agent": "ppo", "env_kwargs": {"model": str(stories_bin), "n_tokens": 512, "seq_len": 64}}))
    return folder / "model.zip"


@pytest.fixture()
def stories_evaluator(stories_bin):
    """A fresh stories260K model (weights are planted into) and an evaluator with its reference."""
    from qenv.eval.evaluator import Evaluator
    from qenv.eval.tokens import tokens_from_model
    from qenv.models.loading import load_model

    loaded = load_model(stories_bin)
    tokens = tokens_from_model(loaded.model, 256, 64, seed=0, bos_token_id=1)
    ev = Evaluator(loaded, tokens, batch_size=2, cache_dir=False)
    ev.reference  # noqa: B018 - the full-precision reference, before anything breaks
    ev.stream()  # and the one-time streaming check: what breaks later is met by the stream itself
    return ev


TINY_PPO = """\
QuantLLM-v0:
  policy: MlpPolicy
  n_steps: 64
  batch_size: 32
  n_epochs: 2
  policy_kwargs: {net_arch: [16]}
"""


@pytest.fixture(scope="module")
def tiny_ppo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg13") / "tiny_ppo.yaml"
    path.write_text(TINY_PPO)
    return path


def train_argv(stories_bin: Path, config: Path, logdir: Path, name: str, total: int) -> list[str]:
    return ["--model", str(stories_bin), "--config", str(config), "--timesteps", str(total), "--checkpoint-freq", "64",
            "--logdir", str(logdir), "--name", name, "--no-progress", *map(str, SMALL)]


def child_env(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "QENV_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO)}


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 240.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended first (status {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.02)
    if proc is not None:
        proc.kill()
    pytest.fail("timed out")
