"""Shipped policies (``qenv.policies``, ``--policy qenv:transfer``): they load, play on every tiny
architecture, their cards describe their zips, one script rebuilds them, and bad input is one line."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from conftest import extended_beyond, load_script, run_main

import qenv.policies
from qenv.cli.runs import env_kwargs_of
from qenv import QenvError
from qenv.models.tiny import TINY_ARCHITECTURES

REPO = Path(__file__).resolve().parents[1]
SMALL = {"n_tokens": 128, "seq_len": 32, "cache_dir": False}

train_agent = load_script("train_agent")
eval_agent = load_script("eval_agent")


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Fix: " in lines[0], err
    assert needle in lines[0], err


def play(policy: str | Path, arch: str) -> dict:
    """One deterministic rollout of ``policy`` (loaded by qenv.policies.load) on a tiny model."""
    from qenv.envs.episodes import rollout_recipe
    from qenv.envs.quant_llm import QuantLLMEnv

    card = qenv.policies.read_card(policy)
    kwargs = {k: v for k, v in card["config"]["env_kwargs"].items() if k not in ("budget_range", "n_tokens", "seq_len")}
    env = QuantLLMEnv(model=f"tiny-{arch}", **{**kwargs, **SMALL, "budget_bpw": 3.0})
    model = qenv.policies.load(str(policy), env=env)
    recipe, info = rollout_recipe(model, env, deterministic=True)
    assert len(recipe) == len(env.task.layers) and info["bpw"] <= 3.0 + 1e-9
    return info


# -- the shipped policy --------------------------------------------------------------------------------
def test_transfer_is_shipped_and_listed():
    assert "transfer" in qenv.policies.available()
    assert qenv.policies.resolve("qenv:transfer") == qenv.policies.POLICIES_DIR / "transfer.zip"
    card = qenv.policies.read_card("transfer")
    assert card["agent"] == "ppo" and card["config"]["env_kwargs"]["action_kind"] == "allocation"
    assert card["budget_range"][0] < card["budget_range"][1]
    assert (qenv.policies.POLICIES_DIR / "transfer.md").read_text() == qenv.policies.render_card(card)


@pytest.mark.parametrize("arch", extended_beyond(TINY_ARCHITECTURES, ["llama"]))  # the others: --run-slow
def test_qenv_transfer_loads_and_plays_on_every_tiny_architecture(arch):
    play("transfer", arch)


def test_the_card_says_what_the_zip_holds():
    """The card's commit, command and config are those the zip records, and its hyperparameters are
    what SB3 stored in the zip's own data (the policy that is loaded)."""
    card = qenv.policies.check_card_matches_zip("qenv:transfer")
    record = qenv.policies.read_zip_record("qenv:transfer")
    assert record["git_commit"] == card["git_commit"] and record["config"] == card["config"]
    with zipfile.ZipFile(qenv.policies.POLICIES_DIR / "transfer.zip") as archive:
        data = json.loads(archive.read("data"))
    hyper = card["config"]["hyperparams"]
    for key in ("n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda", "ent_coef"):
        assert data[key] == hyper[key], key
    assert data["num_timesteps"] >= card["config"]["total_timesteps"]
    commit = card["git_commit"].removesuffix("+dirty")
    if (REPO / ".git").exists() and shutil.which("git"):
        assert subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"]).returncode == 0


def test_a_card_beside_another_zip_is_refused(tmp_path):
    for suffix in (".zip", ".json"):
        shutil.copy(qenv.policies.POLICIES_DIR / f"transfer{suffix}", tmp_path / f"transfer{suffix}")
    card = json.loads((tmp_path / "transfer.json").read_text())
    card["git_commit"] = "0" * 40
    (tmp_path / "transfer.json").write_text(json.dumps(card))
    with pytest.raises(QenvError, match="does not describe its zip: git_commit differ"):
        qenv.policies.load(str(tmp_path / "transfer.zip"))


# -- bad input: one line ---------------------------------------------------------------------------------
def test_an_unknown_shipped_policy_lists_the_shipped_ones(capsys, tmp_path):
    code = run_main(eval_agent, ["--policy", "qenv:no-such", "--model", "tiny-llama", "--out", tmp_path / "e"])
    assert_one_line_error(code, capsys.readouterr().err, "No shipped policy named qenv:no-such")
    code = run_main(train_agent, ["--init-from", "qenv:no-such", "--model", "tiny-llama", "--logdir", tmp_path])
    assert_one_line_error(code, capsys.readouterr().err, "qenv:transfer")
    assert not (tmp_path / "e").exists() and list(tmp_path.iterdir()) == []


def test_a_model_whose_layers_the_policy_cannot_describe_is_one_line(capsys, tmp_path):
    """With the output head quantized too, the model has a kind of layer the shipped policy never saw."""
    for module, argv in ((eval_agent, ["--policy", "qenv:transfer", "--model", "tiny-llama", "--out", tmp_path / "e",
                                       "--env-kwargs", "include_lm_head=true"]),
                         (train_agent, ["--init-from", "qenv:transfer", "--model", "tiny-llama", "--logdir", tmp_path,
                                        "--env-kwargs", "include_lm_head=true"])):
        code = run_main(module, argv)
        assert_one_line_error(code, capsys.readouterr().err, "cannot describe the layers of tiny-llama")
    from qenv.agents.quantize import main as quantize

    code = quantize(["--model", "tiny-llama", "--policy", "qenv:no-such", "--budget-bpw", "3", "--out", str(tmp_path / "q")])
    assert_one_line_error(code, capsys.readouterr().err, "No shipped policy named qenv:no-such")
    assert list(tmp_path.iterdir()) == []


def test_a_card_from_another_observation_layout_is_refused():
    card = qenv.policies.read_card("transfer")
    from qenv import load_model

    layers = load_model("tiny-llama").layers
    qenv.policies.check_describes(card, layers, "tiny-llama", "qenv:transfer")
    older = {**card, "observation": {**card["observation"], "names": card["observation"]["names"][:-1]}}
    with pytest.raises(QenvError, match="observation entries that this qenv does not compute"):
        qenv.policies.check_describes(older, layers, "tiny-llama", "qenv:transfer")


# -- fine-tuning from it -------------------------------------------------------------------------------
@pytest.mark.slow  # extended tier: a fine-tuning run
def test_init_from_qenv_transfer_fine_tunes_with_the_cards_settings(tmp_path, cache_dir):
    code = run_main(train_agent, ["--init-from", "qenv:transfer", "--model", "tiny-gpt2", "--timesteps", 32,
                                  "--budget-bpw", 3.0, "--logdir", tmp_path, "--name", "ft", "--no-progress",
                                  "--env-kwargs", "n_tokens=128", "seq_len=32"])
    assert code == 0
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    env = env_kwargs_of(summary["settings"], "summary.json")
    assert env["action_kind"] == "allocation" and env["observation"] == "relative" and "budget_range" not in env
    assert summary["init_from"] == str(qenv.policies.POLICIES_DIR / "transfer.zip")


# -- the script that rebuilds it -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory, cache_dir):
    """scripts/train_transfer_policy.py on a two-model zoo with tiny settings, zero-shot on one model."""
    spec = importlib.util.spec_from_file_location("train_transfer_policy", REPO / "scripts" / "train_transfer_policy.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path_factory.mktemp("policy")
    code = run_main(script, ["--models", "tiny-llama", "tiny-qwen2", "--timesteps", 64, "--n-tokens", 128,
                             "--seq-len", 32, "--budget-range", 2.5, 4.0, "--eval-models", "tiny-gpt2",
                             "--eval-budgets", "gptq-w3", "--eval-tokens", 128, "--out", out, "--name", "mini",
                             "--workdir", tmp_path_factory.mktemp("work")])
    assert code == 0
    return out


@pytest.mark.slow  # trains and scores in child processes (train_agent.py, eval_agent.py): ~1 CPU minute
def test_the_script_rebuilds_a_policy_that_loads_and_plays(rebuilt, tmp_path, capsys):
    assert qenv.policies.available(rebuilt) == ["mini"]
    card = qenv.policies.check_card_matches_zip(rebuilt / "mini.zip")
    assert [m["spec"] for m in card["trained_on"]] == ["tiny-llama", "tiny-qwen2"]
    assert all(len(m["fingerprint"]) >= 8 for m in card["trained_on"])
    assert card["budget_range"] == [2.5, 4.0] and card["config"]["env_kwargs"]["budget_range"] == [2.5, 4.0]
    assert "train_transfer_policy.py" in card["command"] and card["git_commit"]
    row = card["zero_shot"]["rows"][0]
    # a preset's name is a budget too (its exact bpw on each model), as eval_agent.py --budget-bpw takes it
    assert row["model"] == "tiny-gpt2" and row["status"] == "zero-shot" and row["budget"] == "gptq-w3"
    assert 3.0 <= row["policy_bpw"] <= 3.26 and row["greedy_kl"] > 0 and row["gptq_frontier_kl"] > 0
    assert row["awq_frontier_kl"] > 0 and "AWQ frontier in" in card["zero_shot"]["verdict"]
    assert "| tiny-gpt2 | gptq-w3 |" in (rebuilt / "mini.md").read_text()
    play(rebuilt / "mini.zip", "falcon")
    # the zip with its card beside it is a --policy too: the card says it was trained on tiny-llama
    code = run_main(eval_agent, ["--policy", rebuilt / "mini.zip", "--model", "tiny-llama", "--budget-bpw", 3.5,
                                 "--searchers", "none", "--presets", "gptq", "--out", tmp_path / "e", "--no-progress",
                                 "--n-tokens", 128])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "e" / "results.json").read_text())
    assert result["models"][0]["status"] == "trained-on" and result["agent"] == "ppo"


@pytest.mark.slow  # extended tier: eval_agent.py and quantize runs
def test_one_command_gives_a_user_a_recipe_and_its_export(tmp_path, monkeypatch, cache_dir, capsys):
    """``eval_agent.py --policy qenv:transfer --model M --budget-bpw 4.0 --export`` (its output under
    ./runs, never in the package's folder) and ``python -m qenv quantize --policy qenv:transfer``."""
    monkeypatch.chdir(tmp_path)
    code = run_main(eval_agent, ["--policy", "qenv:transfer", "--model", "tiny-llama", "--budget-bpw", 4.0, "--export",
                                 "--searchers", "greedy", "--presets", "gptq", "--n-tokens", 128, "--no-progress"])
    assert code == 0, capsys.readouterr().err
    [out] = list((tmp_path / "runs" / "eval-transfer").iterdir())
    result = json.loads((out / "results.json").read_text())
    [model] = result["models"]
    # the shipped policy is trained on the zoo of scripts/train_bench_models.py, which tiny-llama is not in
    assert model["status"] == "zero-shot" and model["policy_recipe"] and (out / "export" / "tiny-llama").is_dir()
    assert sorted(p.name for p in qenv.policies.POLICIES_DIR.iterdir() if p.suffix != ".py" and p.name != "__pycache__") \
        == ["transfer.json", "transfer.md", "transfer.zip"]
    from qenv.agents.quantize import main as quantize

    # (on tiny-gpt2, tiny-qwen2 and tiny-opt its recipes use rules a packed checkpoint cannot run: Conv1D
    # layers, AWQ scales under GQA or outside llama/mistral/qwen2; quantize refuses those in one line)
    code = quantize(["--model", "tiny-llama", "--policy", "qenv:transfer", "--budget-bpw", "4", "--out", str(tmp_path / "q"),
                     "--n-tokens", "128"])
    assert code == 0, capsys.readouterr().err
    assert any((tmp_path / "q").iterdir())
