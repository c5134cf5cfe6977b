"""Reliability (issue 6): bad input through the programs.

``train_agent.main`` / ``eval_agent.main`` in this process, and one real subprocess: exit status 2,
one ``error: ... Fix: ...`` line naming the problem, no traceback, no run folder or output folder left
behind. Cases already covered elsewhere are not repeated here: malformed YAML, unknown config keys and
env kwargs, unknown agent, a budget below the cheapest rules, an existing run folder
(``test_train_agent.py``); a model with no linear layers (``test_loading.test_model_without_linear_layers``);
a missing policy (``test_eval_agent.py``); an existing ``--save-model`` folder (``test_export.py``).
On-policy rollouts that outgrow the run are fitted to it, and the timesteps that really run are said.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qenv.errors import QenvError
from conftest import load_script, run_main
from reliability_helpers import REPO, SMALL, Payload, assert_one_line_error, craft_policy, policy  # noqa: F401 - `policy` is a fixture


train_agent = load_script("train_agent")
eval_agent = load_script("eval_agent")


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


def garbage_policy(policy: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(policy.parent / "config.json", target.parent / "config.json")
    target.write_text("not a zip file")
    return target


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


# extended tier: eval_agent.py in a child process (the same refusal in-process stays in the default tier:
# test_eval_agent_bad_input[policy_with_pickled_code])
@pytest.mark.slow
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


def test_rollout_is_fitted_to_the_timesteps_asked_for(capsys):
    assert train_agent.fit_rollout("ppo", {}, n_envs=4, total=64) == {"n_steps": 16}
    assert "n_steps lowered from 2048 to 16" in capsys.readouterr().out
    assert train_agent.fit_rollout("ppo", {}, n_envs=4, total=40) == {"n_steps": 10, "batch_size": 40}
    assert "batch_size lowered from 64 to 40" in capsys.readouterr().out
    assert train_agent.fit_rollout("ppo", {"n_steps": 8}, n_envs=4, total=64) == {"n_steps": 8}
    assert train_agent.fit_rollout("dqn", {}, n_envs=4, total=64) == {}
    with pytest.raises(QenvError, match="--n-envs 65 is more than the 64 timesteps"):
        train_agent.fit_rollout("dqn", {}, n_envs=65, total=64)


@pytest.mark.slow  # extended tier: a training run (the fitting: test_rollout_is_fitted_to_the_timesteps_asked_for)
def test_the_timesteps_that_really_run_are_said(stories_bin, cache_dir, tmp_path, capsys):
    """DQN collects train_freq (4) steps at a time: asked for 5 timesteps, it runs 8, and says so."""
    code = run_main(train_agent, ["--model", stories_bin, "--agent", "dqn", "--timesteps", 5, "--logdir",
                                  tmp_path / "runs", "--name", "d", "--no-progress", *SMALL])
    assert code == 0
    assert "0 -> 5 timesteps, run to 8 (whole rollouts of 4 timesteps)" in capsys.readouterr().out
    assert json.loads((tmp_path / "runs" / "d" / "summary.json").read_text())["timesteps"] == 8
