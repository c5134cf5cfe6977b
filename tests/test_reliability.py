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

Issue 13 (round two), the same tables extended, plus:

- One writer per run folder, with real processes: a training process holds its folder (a second
  ``--resume`` or ``--overwrite`` names its PID and touches nothing), three processes racing to create
  the same folder get it once, a lock left by a SIGKILLed process is taken over.
- SIGTERM to a real training process: checkpoint, summary, exit 143. A disk error (a real EFBIG from
  RLIMIT_FSIZE): one line, exit 74, only whole files.
- Resume: after a real SIGINT inside an uncheckpointed rollout every episode is counted once (summary
  and TensorBoard, whose steps never go back); a run without checkpoints is refused.
- A checkpoint is scored on its run's model; the environment refuses NaN actions, unknown model
  indices, mistyped arguments, "human" rendering and sequences longer than the model's context.
- Agent zips: exact pickle names only (torch.fx.GraphModule, torch.jit.ScriptModule, dotted names);
  the algorithm is read from the zip. Output files honour the umask.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
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
    for key, line in (("lr_fast", "learning_rate: fast"), ("n_steps_negative", "n_steps: -1"),
                      ("policy_unknown", "policy: NoSuchPolicy"), ("gamma_list", "gamma: [1, 2]"),
                      ("net_arch_negative", "policy_kwargs: {net_arch: [-3]}")):
        (root / f"{key}.yaml").write_text(f"QuantLLM-v0:\n  {line}\n")
        out[f"yaml_{key}"] = root / f"{key}.yaml"
    # an encoder (bidirectional attention) saved as a transformers folder: loads as a "causal LM"
    from transformers import BertConfig, GPT2Config, GPT2LMHeadModel

    bert = AutoModelForCausalLM.from_config(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=32))
    bert.save_pretrained(root / "bert")
    out["bert"] = root / "bert"
    # weights saved with one intermediate_size, config.json edited to another
    mismatch = root / "intermediate_mismatch"
    shutil.copytree(base, mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    config["intermediate_size"] += 16
    (mismatch / "config.json").write_text(json.dumps(config))
    out["intermediate_mismatch"] = mismatch
    # GPT-2 with a 32-token position table
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)).save_pretrained(
        root / "gpt2_ctx32")
    out["gpt2_ctx32"] = root / "gpt2_ctx32"
    # files that are not UTF-8 text
    story = "Once upon a time, a little girl named Lily found a shiny stone in the garden. " * 40
    (root / "nul.txt").write_bytes(story.encode()[:500] + b"\x00" * 200 + story.encode())
    (root / "latin1.txt").write_bytes(("Caf\xe9 na\xefve r\xe9sum\xe9. " + story).encode("latin-1"))
    (root / "random.bin.txt").write_bytes(np.random.default_rng(0).integers(1, 256, 8192, dtype=np.uint8).tobytes())
    out.update(nul_txt=root / "nul.txt", latin1_txt=root / "latin1.txt", random_txt=root / "random.bin.txt")
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
    # issue 13: tracebacks that became one line
    "weights_do_not_fit_config": (lambda f, s: ["--model", f["intermediate_mismatch"]],
                                  "do not fit its config.json (size mismatch: model.layers.0.mlp.down_proj.weight"),
    "seq_len_above_learned_positions": (lambda f, s: ["--model", f["gpt2_ctx32"]],
                                        "seq_len=64 is longer than the 32-token context of gpt2_ctx32"),
    "seq_len_above_rotary_context": (lambda f, s: ["--model", s, "--env-kwargs", "seq_len=1024", "n_tokens=2048"],
                                     "seq_len=1024 is longer than the 512-token context of stories260K"),
    "logdir_is_a_file": (lambda f, s: ["--model", s, "--logdir", f["short_txt"]], "is a file, not a folder"),
    "logdir_under_a_file": (lambda f, s: ["--model", s, "--logdir", f["short_txt"] / "runs"],
                            "which is a file, not a folder"),
    "cache_dir_not_writable": (lambda f, s: ["--model", s, "--env-kwargs", f"cache_dir={f['short_txt'] / 'cache'}"],
                               "The cache folder"),
    "render_mode_human": (lambda f, s: ["--model", s, "--env-kwargs", "render_mode=human"],
                          "render_mode='human' is not supported"),
    "yaml_learning_rate_not_a_number": (lambda f, s: ["--model", s, "--config", f["yaml_lr_fast"]],
                                        "learning_rate='fast' has the wrong type"),
    "yaml_n_steps_negative": (lambda f, s: ["--model", s, "--config", f["yaml_n_steps_negative"]],
                              "n_steps=-1 is out of range"),
    "yaml_policy_unknown": (lambda f, s: ["--model", s, "--config", f["yaml_policy_unknown"]],
                            "policy='NoSuchPolicy' is not a policy of PPO"),
    "yaml_gamma_a_list": (lambda f, s: ["--model", s, "--config", f["yaml_gamma_list"]], "gamma=[1, 2] has the wrong type"),
    # issue 13: silent acceptance that became a refusal
    "non_causal_model": (lambda f, s: ["--model", f["bert"]], "is not a causal language model"),
    "text_with_nul_bytes": (lambda f, s: ["--model", s, "--data", f["nul_txt"]], "nul.txt is a binary file"),
    "text_latin1": (lambda f, s: ["--model", s, "--data", f["latin1_txt"]], "latin1.txt is not valid utf-8 text"),
    "text_random_bytes": (lambda f, s: ["--model", s, "--data", f["random_txt"]], "random.bin.txt is not valid utf-8"),
    "env_kwarg_bool_not_bool": (lambda f, s: ["--model", s, "--env-kwargs", "include_lm_head=maybe"],
                                "include_lm_head='maybe' must be true or false"),
    "zoo_model_twice": (lambda f, s: ["--model", s, "--model", s], "is given more than once"),
    "env_kwarg_negative_cache": (lambda f, s: ["--model", s, "--env-kwargs", "weight_cache_gib=-1"],
                                 "weight_cache_gib=-1 must be a number of at least 0"),
    "n_envs_above_timesteps": (lambda f, s: ["--model", s, "--n-envs", 1000], "--n-envs 1000 is more than the 64"),
    "flag_and_env_kwarg_disagree": (lambda f, s: ["--model", s, "--budget-bpw", 3.0, "--env-kwargs", "budget_bpw=4.5"],
                                    "--budget-bpw 3.0 and --env-kwargs budget_bpw=4.5 disagree"),
    "seed_negative": (lambda f, s: ["--model", s, "--seed", -1], "--seed=-1 is negative"),
    "timesteps_too_short_for_a_rollout": (lambda f, s: ["--model", s, "--timesteps", 1], "--timesteps 1 is too short"),
    "policy_kwargs_negative_width": (lambda f, s: ["--model", s, "--config", f["yaml_net_arch_negative"]],
                                     "rejected its hyperparameters (Trying to create tensor with negative dimension"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_agent_bad_input(case, files, stories_bin, cache_dir, tmp_path, capsys):
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    extra, needle = TRAIN_CASES[case]
    logdir = tmp_path / "runs"
    argv = ["--logdir", logdir, "--name", "x", "--no-progress", "--timesteps", 64, *SMALL, *extra(files, stories_bin)]
    code = run_main(train_agent, argv)
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
    # issue 13 (with a model that does not exist: the output check must come first, before any work)
    "out_is_a_file": (lambda f, p, t: ["--policy", p, "--model", t / "nope", "--out", f["short_txt"]],
                      "--out {short_txt} is a file"),
    "save_model_under_a_file": (lambda f, p, t: ["--policy", p, "--model", t / "nope", "--save-model",
                                                 f["short_txt"] / "q"], "which is a file"),
    "save_model_not_empty": (lambda f, p, t: ["--policy", p, "--model", t / "nope", "--save-model", f["not_a_model"]],
                             "already exists and is not empty"),
    "held_out_binary": (lambda f, p, t: ["--policy", p, "--model", t / "nope", "--data", f["nul_txt"]],
                        "is a binary file"),
    "ppo_zip_as_dqn": (lambda f, p, t: ["--policy", p, "--agent", "dqn"], "was trained with PPO (ppo), not DQN (dqn)"),
    "ppo_zip_as_a2c": (lambda f, p, t: ["--policy", p, "--agent", "a2c"], "was trained with PPO (ppo), not A2C (a2c)"),
    "flag_and_env_kwarg_disagree": (lambda f, p, t: ["--policy", p, "--budget-bpw", 3, "--env-kwargs", "budget_bpw=4.5"],
                                    "disagree"),
    "policy_folder_without_agent": (lambda f, p, t: ["--policy", f["not_a_model"]], "is a folder without model.zip"),
    "model_given_twice": (lambda f, p, t: ["--policy", p, "--model", "tiny-llama", "--model", "tiny-llama"],
                          "--model tiny-llama is given more than once"),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_eval_agent_bad_input(case, files, policy, tmp_path, capsys):
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    extra, needle = EVAL_CASES[case]
    code = run_main(eval_agent, ["--searchers", "none", "--out", tmp_path / "out", *extra(files, policy, tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, needle.format(**files))
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


# == issue 13: one writer per run, the right model for every checkpoint, no silent nonsense =================
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


#: a run's config.json as train_agent.py writes it (what --resume needs before it looks at checkpoints)
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


# -- the environment's own checks --------------------------------------------------------------------------
ENV_CASES = {
    # case: (env kwargs, what to do with the env, phrase of the QenvError)
    "nan_continuous_action": ({"action_kind": "continuous"},
                              lambda env: env.step(np.array([np.nan, 0, 0, 0], dtype=np.float32)), "not a finite number"),
    "model_index_out_of_range": ({}, lambda env: env.reset(options={"model_index": 5}), "names no model"),
    "model_index_not_an_int": ({}, lambda env: env.reset(options={"model_index": "0"}), "names no model"),
    "bool_kwarg_as_text": ({"include_lm_head": "maybe"}, None, "must be true or false"),
    "negative_weight_cache": ({"weight_cache_gib": -1}, None, "must be a number of at least 0"),
    "negative_shaping_weight": ({"shaping_weight": -2}, None, "shaping_weight=-2 must be a number of at least 0"),
    "render_mode_human": ({"render_mode": "human"}, None, "draws no window"),
    "seq_len_above_context": ({"seq_len": 1024, "n_tokens": 2048}, None, "longer than the 512-token context"),
}


@pytest.mark.parametrize("case", list(ENV_CASES))
def test_env_refuses_bad_arguments_and_actions(case, stories_bin, cache_dir):
    from qenv.cli.envs import make_quant_env

    kwargs, act, needle = ENV_CASES[case]
    base = {"model": str(stories_bin), "n_tokens": 512, "seq_len": 64, **kwargs}
    if act is None:
        with pytest.raises(QenvError, match=re.escape(needle)):
            make_quant_env(**base)
        return
    env = make_quant_env(**base)
    env.reset(seed=0)
    with pytest.raises(QenvError, match=re.escape(needle)):
        act(env)


def test_evaluator_refuses_tokens_longer_than_the_context(stories_evaluator):
    from qenv.eval.evaluator import Evaluator
    from qenv.eval.tokens import TokenSet

    long = TokenSet(torch.ones(1, 600, dtype=torch.long), "test")
    with pytest.raises(QenvError, match="seq_len=600 is longer than the 512-token context"):
        Evaluator(stories_evaluator.loaded, long, cache_dir=False)


def test_episode_length_is_documented_not_a_time_limit(stories_bin, cache_dir):
    """Episodes always terminate after one step per layer; the spec sets no TimeLimit (documented)."""
    from qenv.cli.envs import make_quant_env
    from qenv.envs.quant_llm import QuantLLMEnv

    env = make_quant_env(model=str(stories_bin), n_tokens=512, seq_len=64)
    assert env.spec.max_episode_steps is None and "max_episode_steps" in QuantLLMEnv.__doc__
    env.reset(seed=0)
    n = len(env.unwrapped.task.layers)
    for i in range(n):
        _, _, terminated, truncated, _ = env.step(0)
        assert terminated == (i == n - 1) and not truncated
    assert env.unwrapped.episode_length == n


# -- on-policy rollouts that outgrow the run ---------------------------------------------------------------
def test_rollout_is_fitted_to_the_timesteps_asked_for(capsys):
    assert train_agent.fit_rollout("ppo", {}, n_envs=4, total=64) == {"n_steps": 16}
    assert "n_steps lowered from 2048 to 16" in capsys.readouterr().out
    assert train_agent.fit_rollout("ppo", {}, n_envs=4, total=40) == {"n_steps": 10, "batch_size": 40}
    assert "batch_size lowered from 64 to 40" in capsys.readouterr().out
    assert train_agent.fit_rollout("ppo", {"n_steps": 8}, n_envs=4, total=64) == {"n_steps": 8}
    assert train_agent.fit_rollout("dqn", {}, n_envs=4, total=64) == {}
    with pytest.raises(QenvError, match="--n-envs 65 is more than the 64 timesteps"):
        train_agent.fit_rollout("dqn", {}, n_envs=65, total=64)


def test_the_timesteps_that_really_run_are_said(stories_bin, cache_dir, tmp_path, capsys):
    """DQN collects train_freq (4) steps at a time: asked for 5 timesteps, it runs 8, and says so."""
    code = run_main(train_agent, ["--model", stories_bin, "--agent", "dqn", "--timesteps", 5, "--logdir",
                                  tmp_path / "runs", "--name", "d", "--no-progress", *SMALL])
    assert code == 0
    assert "0 -> 5 timesteps, run to 8 (whole rollouts of 4 timesteps)" in capsys.readouterr().out
    assert json.loads((tmp_path / "runs" / "d" / "summary.json").read_text())["timesteps"] == 8


# -- pickles: exact names only -----------------------------------------------------------------------------
def _global_pickle(module: str, name: str) -> bytes:
    """A protocol-4 pickle that only looks up ``module``/``name`` (SHORT_BINUNICODE x2, STACK_GLOBAL)."""
    enc = [s.encode() for s in (module, name)]
    return b"\x80\x04" + b"".join(b"\x8c" + bytes([len(e)]) + e for e in enc) + b"\x93."


@pytest.mark.parametrize("module,name", [
    ("torch.fx.graph_module", "GraphModule"),
    ("torch.jit._script", "ScriptModule"),
    ("torch.nn.modules.module", "torch.fx.GraphModule"),  # a dotted name through an allowed module
    ("torch.nn.modules.module", "torch.jit.ScriptModule"),
    ("torch.nn.modules.activation", "torch.fx.GraphModule"),
    ("stable_baselines3.common.policies", "ActorCriticPolicy.__init__"),
])
def test_agent_zip_unpickler_takes_exact_names_only(policy, tmp_path, module, name):
    from qenv.agents.sb3 import safe_custom_objects

    assert pickle.loads(_global_pickle(module, name)) is not None  # the reference resolves in plain pickle
    target = tmp_path / "evil.zip"
    with zipfile.ZipFile(policy) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "data":
                payload = json.loads(data)
                payload["policy_class"][":serialized:"] = base64.b64encode(_global_pickle(module, name)).decode()
                data = json.dumps(payload).encode()
            dst.writestr(item, data)
    with pytest.raises(QenvError, match=re.escape(f"needs {module}.{name}")):
        safe_custom_objects(target)
    assert "policy_class" in safe_custom_objects(policy)  # the honest file still loads


def test_algorithm_is_read_from_the_zip(policy, tmp_path):
    from qenv.agents.sb3 import AGENT_ENTRY, agent_name_of_zip

    assert agent_name_of_zip(policy) == "ppo"
    bare = tmp_path / "bare.zip"  # as plain SB3 writes it: told apart by what SB3 stored
    with zipfile.ZipFile(policy) as src, zipfile.ZipFile(bare, "w") as dst:
        for item in src.infolist():
            if item.filename != AGENT_ENTRY:
                dst.writestr(item, src.read(item.filename))
    assert agent_name_of_zip(bare) == "ppo"


# -- file modes --------------------------------------------------------------------------------------------
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


# -- an unwritable --logdir, as root with reduced capabilities ---------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
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


# -- a disk error --------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
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


@pytest.mark.parametrize("agent", ["ppo", "a2c", "dqn", "sac", "td3", "ddpg", "recurrent_ppo"])
def test_every_sb3_agent_is_recognised_in_its_zip(agent, stories_bin, cache_dir, tmp_path):
    """With qenv's entry, and without it (a zip written by SB3 itself), the algorithm is told apart, so
    loading it as another one is refused by name."""
    if agent == "recurrent_ppo":
        pytest.importorskip("sb3_contrib")
    from qenv.agents.registry import load_agent, make_agent
    from qenv.agents.sb3 import agent_name_of_zip
    from qenv.envs.quant_llm import QuantLLMEnv

    kind = "continuous" if agent in ("sac", "td3", "ddpg") else "discrete"
    env = QuantLLMEnv(str(stories_bin), n_tokens=512, seq_len=64, cache_dir=cache_dir, action_kind=kind)
    made = make_agent(agent, env, seed=0, policy_kwargs={"net_arch": [8]},
                      **({"buffer_size": 64} if agent in ("dqn", "sac", "td3", "ddpg") else {}))
    ours = made.save(tmp_path / "ours.zip")
    made.model.save(tmp_path / "sb3.zip")  # SB3's own writer: no qenv entry
    assert agent_name_of_zip(ours) == agent_name_of_zip(tmp_path / "sb3.zip") == agent
    other = "a2c" if agent == "ppo" else "ppo" if kind == "discrete" else ("td3" if agent != "td3" else "sac")
    with pytest.raises(QenvError, match=f"was trained with .* \\({agent}\\), not"):
        load_agent(other, tmp_path / "sb3.zip", env=env)
