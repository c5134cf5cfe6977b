"""Reliability (issue 6): models and files nobody tried, runs killed halfway, seeds, unsafe files.

- Bad input, through the programs (``train_agent.main`` / ``eval_agent.main`` in this process, and
  one real subprocess): exit status 2, one ``error: ... Fix: ...`` line naming the problem, no
  traceback, no run folder or output folder left behind. Cases already covered elsewhere are not
  repeated here: malformed YAML, unknown config keys and env kwargs, unknown agent, a budget below
  the cheapest rules, an existing run folder (``test_train_agent.py``); a model with no linear
  layers (``test_loading.test_model_without_linear_layers``); a missing policy
  (``test_eval_agent.py``); an existing ``--save-model`` folder (``test_export.py``).
- NaN/inf: a saved model folder with a NaN weight names the parameter; NaN/inf logits name the
  first module that produced them. Out of memory (raised by a real forward hook, since a real
  OOM cannot be produced on purpose on this machine) becomes advice to use a smaller batch.
- Safe loading: remote code is not run, pickled objects in ``pytorch_model.bin`` or in an SB3
  agent zip are refused and not run (a payload that would create a marker file if executed).
- A ``SubprocVecEnv`` worker killed with SIGKILL is a clear error on the next step, not a hang.
- Atomic files: a process killed inside ``atomic_path`` leaves only a ``.*.tmp`` file, which a
  ``--resume`` removes (the SIGKILL-then-resume run itself is ``test_train_agent.py``'s
  ``test_resume_after_sigkill_reaches_the_same_total``, which also checks every file is whole).
- Determinism: the same seed gives the same recipes and metrics in two fresh processes, for the
  environment, every searcher and a short PPO run.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from qenv.errors import QenvError
from conftest import load_script, run_main

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--env-kwargs", "n_tokens=512", "seq_len=64"]


train_agent = load_script("train_agent")
eval_agent = load_script("eval_agent")


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


# -- fixtures: real files of every kind a user might point qenv at ---------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory, stories_bin) -> dict[str, Path]:
    """Broken and hostile inputs, built from real models and real files."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, RwkvConfig

    from qenv.models.loading import load_model

    root = tmp_path_factory.mktemp("inputs")
    out: dict[str, Path] = {"root": root}
    raw = stories_bin.read_bytes()
    tok = stories_bin.parent / "tok512.model"
    for name, data, with_tok in (("truncated", raw[: len(raw) // 2], True), ("bad_header", b"\xff" * 28 + raw[28:], True),
                                 ("no_tokenizer", raw, False)):
        folder = root / name
        folder.mkdir()
        (folder / "model.bin").write_bytes(data)
        if with_tok:
            shutil.copy(tok, folder / tok.name)
        out[name] = folder / "model.bin"
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "notes.txt").write_text("hello")
    out["not_a_model"] = root / "not_a_model"
    (root / "empty.txt").write_text("\n  \n")
    out["empty_txt"] = root / "empty.txt"
    (root / "short.txt").write_text("Once upon a time there was a cat.")
    out["short_txt"] = root / "short.txt"

    tiny = load_model("tiny-llama")
    base = root / "tiny"
    tiny.model.save_pretrained(base)
    # a NaN planted in one weight of a saved model folder
    nan = root / "nan_weight"
    shutil.copytree(base, nan)
    weights = load_file(nan / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(weights, nan / "model.safetensors", metadata={"format": "pt"})
    out["nan_weight"] = nan
    # safetensors cut short (an interrupted download)
    damaged = root / "damaged"
    shutil.copytree(base, damaged)
    data = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(data[: len(data) // 2])
    out["damaged"] = damaged
    # weights as a pickle that holds code besides tensors
    pickled = root / "pickled"
    shutil.copytree(base, pickled)
    (pickled / "model.safetensors").unlink()
    state = dict(tiny.model.state_dict())
    state["payload"] = Payload(root / "MARKER_pickled_weights")
    torch.save(state, pickled / "pytorch_model.bin")
    out["pickled"] = pickled
    out["marker_pickled"] = root / "MARKER_pickled_weights"
    # a config whose auto_map points at custom code that creates a marker when imported
    remote = root / "remote_code"
    remote.mkdir()
    marker = root / "MARKER_remote_code"
    (remote / "config.json").write_text(json.dumps({
        "model_type": "evil_llama", "architectures": ["EvilForCausalLM"], "vocab_size": 32, "hidden_size": 8,
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    code = (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('executed')\n"
            "from transformers import PretrainedConfig\n\n\nclass EvilConfig(PretrainedConfig):\n"
            "    model_type = 'evil_llama'\n")
    (remote / "configuration_evil.py").write_text(code)
    (remote / "modeling_evil.py").write_text(code)
    out["remote_code"] = remote
    out["marker_remote"] = marker
    # a real transformers causal LM whose blocks cannot be run one at a time (RWKV's carry a state)
    rwkv = AutoModelForCausalLM.from_config(RwkvConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                       attention_hidden_size=16, intermediate_size=32,
                                                       context_length=128))
    rwkv.save_pretrained(root / "rwkv")
    out["rwkv"] = root / "rwkv"
    cfg = root / "top_key.yaml"
    cfg.write_text("QuantLLM-v0:\n  n_steps: 64\nn_timesteps: 100\n")
    out["yaml_top_key"] = cfg
    return out


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


def garbage_policy(policy: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(policy.parent / "config.json", target.parent / "config.json")
    target.write_text("not a zip file")
    return target


# -- bad input through the programs: one line, exit 2, nothing left behind ---------------------------------
TRAIN_CASES = {
    # case: (argv after the model/logdir/name flags, phrase the error line must hold)
    "model_missing": (lambda f, s: ["--model", f["root"] / "no-such-model"], "was not found"),
    "model_folder_not_a_model": (lambda f, s: ["--model", f["not_a_model"]], "has no config.json"),
    "model_text_file": (lambda f, s: ["--model", f["empty_txt"]], "neither a model folder"),
    "model_weights_damaged": (lambda f, s: ["--model", f["damaged"]], "safetensors weights"),
    "unsupported_architecture": (lambda f, s: ["--model", f["rwkv"]], "Architecture RwkvForCausalLM is not supported"),
    "llama2c_truncated": (lambda f, s: ["--model", f["truncated"]], "is truncated"),
    "llama2c_bad_header": (lambda f, s: ["--model", f["bad_header"]], "bad header"),
    "tokenizer_missing": (lambda f, s: ["--model", f["no_tokenizer"]], "tokenizer not found"),
    "text_empty": (lambda f, s: ["--model", s, "--data", f["empty_txt"]], "are empty"),
    "text_too_short": (lambda f, s: ["--model", s, "--data", f["short_txt"]], "fewer than the 512 asked for"),
    "budget_above_16": (lambda f, s: ["--model", s, "--budget-bpw", 17], "out of range"),
    "menu_empty": (lambda f, s: ["--model", s, "--env-kwargs", "menu=[]"], "menu is empty"),
    "menu_not_a_list": (lambda f, s: ["--model", s, "--env-kwargs", "menu=w4"], "must be a list of rules"),
    "menu_unknown_field": (lambda f, s: ["--model", s, "--env-kwargs", "menu=[{bitz: 4}]"], "Unknown rule field"),
    "menu_bad_bits": (lambda f, s: ["--model", s, "--env-kwargs", "menu=[{bits: 7}]"], "bits=7"),
    "env_kwarg_wrong_type": (lambda f, s: ["--model", s, "--env-kwargs", "n_tokens=lots"], "n_tokens='lots' must be"),
    "yaml_unknown_top_key": (lambda f, s: ["--model", s, "--config", f["yaml_top_key"]], "unknown top-level key"),
    "agent_action_space_mismatch": (lambda f, s: ["--model", s, "--agent", "dqn", "--env-kwargs",
                                                  "action_kind=continuous"], "does not support the 'continuous'"),
    "nan_weight": (lambda f, s: ["--model", f["nan_weight"]],
                   "Weight model.layers.1.mlp.down_proj.weight holds 1 NaN/inf"),
    "cuda_without_gpu": (lambda f, s: ["--model", s, "--device", "cuda"], "no CUDA GPU"),
    "remote_code": (lambda f, s: ["--model", f["remote_code"]], "needs custom code"),
    "pickled_weights": (lambda f, s: ["--model", f["pickled"]], "pickled Python objects"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_agent_bad_input(case, files, stories_bin, cache_dir, tmp_path, capsys):
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    extra, needle = TRAIN_CASES[case]
    logdir = tmp_path / "runs"
    code = run_main(train_agent, ["--logdir", logdir, "--name", "x", "--no-progress", "--timesteps", 64, *SMALL,
                                  *extra(files, stories_bin)])
    assert_one_line_error(code, capsys.readouterr().err, needle)
    assert not (logdir / "x").exists()  # no half-made run folder
    assert not files["marker_remote"].exists() and not files["marker_pickled"].exists()  # nothing was executed


def test_a_crash_before_training_leaves_no_run_folder(stories_bin, cache_dir, tmp_path):
    """Not a user error (a plug-in agent that crashes while it is built): the traceback is the
    plug-in author's to see, but no half-made run folder stays behind."""
    plugin = tmp_path / "crashing_agent.py"
    plugin.write_text("class Agent:\n    def __init__(self, env, seed=0):\n"
                      "        raise ZeroDivisionError('a bug in the plug-in')\n")
    with pytest.raises(ZeroDivisionError, match="a bug in the plug-in"):
        run_main(train_agent, ["--model", stories_bin, "--agent", f"{plugin}:Agent", "--logdir", tmp_path / "runs",
                               "--name", "x", "--no-progress", "--timesteps", 64, *SMALL])
    assert not (tmp_path / "runs" / "x").exists()


def test_resume_of_a_run_that_does_not_exist(tmp_path, capsys):
    code = run_main(train_agent, ["--resume", tmp_path / "runs" / "ghost", "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, "is not a run folder")
    assert not (tmp_path / "runs").exists()


EVAL_CASES = {
    "cuda_without_gpu": (lambda f, p, t: ["--policy", p, "--device", "cuda"], "no CUDA GPU"),
    "policy_for_another_action_space": (lambda f, p, t: ["--policy", p, "--env-kwargs", "action_kind=continuous"],
                                        "Action spaces do not match"),
    "policy_not_a_zip": (lambda f, p, t: ["--policy", garbage_policy(p, t / "run" / "model.zip")],
                         "not a readable Stable-Baselines3 agent file"),
    "policy_with_pickled_code": (lambda f, p, t: ["--policy", craft_policy(p, t / "run" / "model.zip", t / "MARKER")],
                                 "could run arbitrary code"),
    "model_with_nan_weight": (lambda f, p, t: ["--policy", p, "--model", f["nan_weight"]], "holds 1 NaN/inf"),
    "held_out_text_too_short": (lambda f, p, t: ["--policy", p, "--data", f["short_txt"]], "fewer than the"),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_eval_agent_bad_input(case, files, policy, tmp_path, capsys):
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    extra, needle = EVAL_CASES[case]
    code = run_main(eval_agent, [*extra(files, policy, tmp_path), "--searchers", "none", "--out", tmp_path / "out"])
    assert_one_line_error(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "out").exists()  # no output folder or file
    assert not (tmp_path / "MARKER").exists()


def test_eval_agent_refuses_a_hostile_policy_as_a_process(policy, tmp_path, cache_dir):
    """The real program, as a user runs it: exit status 2, one stderr line, the payload never ran."""
    marker = tmp_path / "MARKER"
    evil = craft_policy(policy, tmp_path / "run" / "model.zip", marker)
    env = {**os.environ, "QENV_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "eval_agent.py"), "--policy", str(evil),
                           "--searchers", "none", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr, "could run arbitrary code")
    assert not marker.exists() and not (tmp_path / "out").exists()


# -- safe loading ------------------------------------------------------------------------------------------
def test_sb3_agent_zip_with_pickled_code_is_refused_not_run(policy, tmp_path, stories_bin, cache_dir):
    from stable_baselines3.common.save_util import load_from_zip_file

    from qenv.agents.registry import load_agent
    from qenv.envs.quant_llm import QuantLLMEnv

    # the payload is live: SB3's own loader runs it
    live = tmp_path / "MARKER_live"
    load_from_zip_file(craft_policy(policy, tmp_path / "live" / "model.zip", live))
    assert live.exists()
    # qenv's loader refuses it before anything is unpickled
    marker = tmp_path / "MARKER"
    evil = craft_policy(policy, tmp_path / "evil" / "model.zip", marker)
    env = QuantLLMEnv(str(stories_bin), n_tokens=512, seq_len=64, cache_dir=cache_dir)
    with pytest.raises(QenvError, match=r"'policy_class' that needs builtins\.exec.*arbitrary code"):
        load_agent("ppo", evil, env=env)
    assert not marker.exists()
    # and an honest file still loads, through the same allow-list
    assert load_agent("ppo", policy, env=env).model.policy is not None


# -- NaN / inf and out of memory ----------------------------------------------------------------------------
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


def test_nan_or_inf_logits_name_the_first_module(stories_evaluator):
    from qenv.quant.presets import preset

    ev = stories_evaluator
    weight = ev.model.get_submodule("model.layers.2.self_attn.v_proj").weight
    with torch.no_grad():
        weight[0, 0] = float("inf")
    for evaluate in (lambda: ev.evaluate({}), lambda: ev.evaluate_blockwise({})):
        with pytest.raises(QenvError, match=r"NaN or inf values, first in module model\.layers\.2\.self_attn\.v_proj"):
            evaluate()
    with pytest.raises(QenvError, match=r"model\.layers\.2\.self_attn\.v_proj holds NaN or inf"):
        ev.evaluate(preset("rtn-w4", ev.layers))  # quantizing it is refused, naming it too
    norm = ev.model.get_submodule("model.layers.0.post_attention_layernorm").weight
    with torch.no_grad():
        weight[0, 0] = 0.0
        norm[3] = float("nan")  # earlier in the forward pass than v_proj of block 2
    with pytest.raises(QenvError, match=r"first in module model\.layers\.0\.post_attention_layernorm"):
        ev.evaluate_blockwise({})


def _oom(*args):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("module", ["model.embed_tokens", "model.layers.1.mlp", "lm_head"])
def test_out_of_memory_suggests_a_smaller_batch(stories_evaluator, module):
    """A real forward hook on a real module raises the OOM that a GPU would (the evaluator's and the
    streaming path's every stage: embeddings, a block, the head)."""
    from qenv.eval.evaluator import Evaluator

    ev = stories_evaluator
    handle = ev.model.get_submodule(module).register_forward_hook(_oom)
    try:
        for evaluate in (lambda: ev.evaluate({}), lambda: ev.evaluate_blockwise({}),
                         lambda: Evaluator(ev.loaded, ev.tokens, batch_size=2, cache_dir=False).reference):
            with pytest.raises(QenvError, match="Out of memory while running batches of 2 sequences") as err:
                evaluate()
            assert "smaller batch_size" in err.value.fix
    finally:
        handle.remove()


def test_out_of_memory_while_sampling_calibration_tokens(stories_evaluator):
    from qenv.envs.quant_llm import QuantLLMEnv

    loaded = stories_evaluator.loaded
    handle = loaded.model.get_submodule("model.layers.0.mlp").register_forward_hook(_oom)
    try:
        with pytest.raises(QenvError, match="Out of memory") as err:
            QuantLLMEnv(loaded, n_tokens=128, seq_len=64, batch_size=4, cache_dir=False, seed=12345)
        assert "smaller batch_size" in err.value.fix
    finally:
        handle.remove()


# -- a dead SubprocVecEnv worker ----------------------------------------------------------------------------
@pytest.mark.timeout(300)
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


# -- atomic files under SIGKILL -----------------------------------------------------------------------------
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


# -- determinism --------------------------------------------------------------------------------------------
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
for name in ("uniform", "llamacpp", "greedy", "random", "evolution"):
    agent = make_agent(name, env, seed=5).learn(4 * n)
    out[name] = {"recipe": agent.best_recipe.to_dict(), "history": agent.history,
                 **{k: agent.best_info[k] for k in keys}}
other = make_agent("random", env, seed=6).learn(4 * n)
out["random_seed6"] = {"recipe": other.best_recipe.to_dict()}
ppo = make_agent("ppo", env, seed=5, n_steps=n, batch_size=n, n_epochs=2, policy_kwargs={"net_arch": [16, 16]})
ppo.learn(2 * n)
recipe, info = rollout_recipe(ppo, env)
weights = float(sum(p.detach().double().sum() for p in ppo.model.policy.parameters()))
out["ppo"] = {"recipe": recipe.to_dict(), "policy_weight_sum": weights, **{k: info[k] for k in keys}}
print(json.dumps(out, sort_keys=True))
"""


@pytest.mark.timeout(300)
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
    assert first["random_seed6"]["recipe"] != first["random"]["recipe"]  # the seed is what decides
