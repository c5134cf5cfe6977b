"""Reliability, round three (issue 28): files on disk are input, never code, never trusted as they are.

- A run folder's JSON (``summary.json``, ``config.json``) and an agent zip's record name agents of the
  registry only: a plug-in path in them is refused, never imported (a marker file proves the code did
  not run), and never repeated back as advice. A plug-in is taken from the command line alone
  (``--agent``). ``cache_dir`` and ``device`` of a policy's run folder are ignored (said in a note).
- Sizes before allocation: a GGUF declaring a model its tensors cannot hold, an agent zip entry that
  inflates past its cap, a YAML config whose nested aliases resolve to gigabytes: one line, at once.
- Hostile or damaged agent files: a pickle in ``policy.pth``/``pytorch_variables.pth`` (torch's advice
  to pass ``weights_only=False`` is never shown), deeply nested JSON, damaged ``vecnormalize.json``
  and damaged searcher ``model.json``: one line each.
- An ``init_from`` cycle between two runs, a GGUF with ``head_count=7`` or ``context_length=0``.

Every case goes through the programs (``train_agent.main`` / ``eval_agent.main``): exit status 2, one
``error: ... Fix: ...`` line, no run or output folder left behind.
"""

from __future__ import annotations

import base64
import json
import pickle
import re
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from qenv.errors import QenvError
from conftest import extended_beyond, load_script, run_main
from reliability_helpers import Payload, assert_one_line_error, craft_policy, policy  # noqa: F401 - `policy` is a fixture

train_agent = load_script("train_agent")
eval_agent = load_script("eval_agent")
SMALL = ["--env-kwargs", "n_tokens=512", "seq_len=64"]
PLUGIN_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('executed')\n\nclass Agent:\n    pass\n"


def plugin(folder: Path, marker: Path, stem: str = "evil") -> Path:
    """A plug-in file that creates ``marker`` when it is imported."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.py"
    path.write_text(PLUGIN_CODE.format(marker=str(marker)))
    return path


def copy_run(policy: Path, folder: Path, zip_record: str | None = None, **files: object) -> Path:
    """A copy of ``policy``'s run folder; ``files`` replace its JSON files (name -> object or text),
    ``zip_record`` the agent recorded in the zip (``qenv_agent.json``)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.zip"
    with zipfile.ZipFile(policy) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "qenv_agent.json" and zip_record is not None:
                data = json.dumps({"agent": zip_record, "algorithm": "PPO"}).encode()
            dst.writestr(item, data)
    shutil.copy(policy.parent / "config.json", folder / "config.json")
    for name, content in files.items():
        (folder / name.replace("_json", ".json")).write_text(content if isinstance(content, str) else
                                                              json.dumps(content))
    return target


def replace_entry(zip_path: Path, name: str, data: bytes) -> Path:
    """Rewrite ``zip_path`` with entry ``name`` holding ``data`` (compressed, as SB3 writes them)."""
    items = {}
    with zipfile.ZipFile(zip_path) as src:
        for item in src.infolist():
            items[item.filename] = src.read(item.filename)
    items[name] = data
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for key, value in items.items():
            dst.writestr(key, value)
    return zip_path


def pickled_pth(marker: Path) -> bytes:
    """A torch file holding a tensor and an object whose unpickling would create ``marker``."""
    import io

    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "payload": Payload(marker)}, buf)
    return buf.getvalue()


def not_echoed(line: str) -> None:
    """The refusal names no plug-in path from a file, as a fact or as advice."""
    assert "evil" not in line and ".py:" not in line, line


# -- 1. a run folder or a zip never names code to run --------------------------------------------------
def _summary(agent: str, policy: Path) -> dict:
    config = json.loads((policy.parent / "config.json").read_text())
    return {"agent": agent, "status": "complete", "settings": {**config, "agent": agent}}


#: case -> (how to build the policy from (policy, tmp_path, marker), extra argv, phrase of the error line)
EVAL_RUN_CASES = {
    "summary_names_a_file_relative_to_the_cwd": (
        lambda p, t, m: (plugin(t, m), copy_run(p, t / "run", summary_json=_summary("evil.py:Agent", p)))[1],
        [], "names a plug-in by import path"),
    "summary_names_an_absolute_file": (
        lambda p, t, m: copy_run(p, t / "run", summary_json=_summary(f"{plugin(t / 'lib', m)}:Agent", p)),
        [], "names a plug-in by import path"),
    "summary_names_a_module": (
        lambda p, t, m: (plugin(t / "lib", m, "evilmod"), sys.path.insert(0, str(t / "lib")),
                         copy_run(p, t / "run", summary_json=_summary("evilmod:Agent", p)))[2],
        [], "names a plug-in by import path"),
    "config_names_a_file": (
        lambda p, t, m: (plugin(t, m), copy_run(p, t / "run", config_json={
            **json.loads((p.parent / "config.json").read_text()), "agent": "evil.py:Agent"}))[1],
        [], "names a plug-in by import path"),
    "summary_names_an_unknown_agent": (
        lambda p, t, m: copy_run(p, t / "run", summary_json=_summary("evil_agent", p)),
        [], "names an agent that is not registered here"),
    "zip_record_names_a_file": (
        lambda p, t, m: copy_run(p, t / "run", zip_record=f"{plugin(t, m)}:Agent", config_json={
            k: v for k, v in json.loads((p.parent / "config.json").read_text()).items() if k != "agent"}),
        [], "names an agent that is not registered here"),
    "zip_record_names_a_file_loaded_as_ppo": (
        lambda p, t, m: copy_run(p, t / "run", zip_record=f"{plugin(t, m)}:Agent"),
        ["--agent", "ppo"], "records another agent, which is not a registered one"),
}


@pytest.mark.parametrize("case", list(EVAL_RUN_CASES))
def test_eval_agent_takes_no_code_from_a_run_folder(case, policy, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # a case may add a folder to it
    build, argv, needle = EVAL_RUN_CASES[case]
    marker = tmp_path / "MARKER"
    evil = build(policy, tmp_path, marker)
    code = run_main(eval_agent, ["--policy", evil, "--searchers", "none", "--out", tmp_path / "out", *argv])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, needle)
    not_echoed(err)
    assert not marker.exists(), "the run folder's plug-in was imported"
    assert not (tmp_path / "out").exists()


def test_a_plugin_from_the_command_line_is_still_imported(policy, tmp_path, capsys):  # noqa: F811
    """The user's own --agent is trusted (the control for the cases above): the plug-in is imported."""
    marker = tmp_path / "MARKER"
    evil = copy_run(policy, tmp_path / "run", summary_json=_summary("ppo", policy))
    code = run_main(eval_agent, ["--policy", evil, "--agent", f"{plugin(tmp_path, marker)}:Agent",
                                 "--searchers", "none", "--out", tmp_path / "out"])
    assert code == 2 and marker.exists()  # imported; then its lack of load() ends the run
    assert "its factory has no load()" in capsys.readouterr().err


RUN_CONFIG = {"version": 1, "env_id": "QuantLLM-v0", "agent": "ppo", "seed": 0, "total_timesteps": 64, "n_envs": 1,
              "vec_env": "dummy", "checkpoint_freq": 64, "env_kwargs": {}, "config_section": {}, "keep_checkpoints": 5}


@pytest.mark.parametrize("case", ["file", "module", "given_on_the_command_line"])
def test_resume_takes_a_plugin_from_the_command_line_only(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path / "lib"), *sys.path])
    marker = tmp_path / "MARKER"
    plugin(tmp_path, marker)
    plugin(tmp_path / "lib", marker, "evilmod")
    agent = "evilmod:Agent" if case == "module" else "evil.py:Agent"
    folder = tmp_path / "runs" / "x"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**RUN_CONFIG, "agent": agent}))
    argv = ["--resume", folder, "--no-progress"]
    if case == "given_on_the_command_line":  # the user vouches for it: imported, then no checkpoint to resume
        code = run_main(train_agent, [*argv, "--agent", agent])
        assert_one_line_error(code, capsys.readouterr().err, "has no checkpoints to resume from")
        assert marker.exists()
        return
    code = run_main(train_agent, argv)
    err = capsys.readouterr().err
    assert_one_line_error(code, err, "names a plug-in by import path")
    not_echoed(err)
    assert not marker.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]


def test_resume_caches_where_qenv_cache_dir_says(cache_dir, tmp_path, capsys):
    """A resumed run's config.json with a cache_dir of its own: $QENV_CACHE_DIR wins, said in a note."""
    folder = tmp_path / "runs" / "x"
    folder.mkdir(parents=True)
    foreign = tmp_path / "foreign-cache"
    (folder / "config.json").write_text(json.dumps({**RUN_CONFIG, "env_kwargs": {"cache_dir": str(foreign)}}))
    code = run_main(train_agent, ["--resume", folder, "--no-progress"])
    out, err = capsys.readouterr()
    assert_one_line_error(code, err, "has no complete checkpoint to resume from")
    assert f"note: using $QENV_CACHE_DIR={cache_dir}, not the cache_dir={foreign}" in out
    (folder / "config.json").write_text(json.dumps({**RUN_CONFIG, "agent": " "}))
    assert_one_line_error(run_main(train_agent, ["--resume", folder, "--no-progress"]), capsys.readouterr().err,
                          "names no agent")


def test_init_from_a_zip_recording_a_plugin_is_not_echoed(policy, stories_bin, tmp_path, capsys):  # noqa: F811
    evil = copy_run(policy, tmp_path / "run", zip_record=f"{plugin(tmp_path, tmp_path / 'MARKER')}:Agent")
    code = run_main(train_agent, ["--model", stories_bin, "--init-from", evil, "--logdir", tmp_path / "runs",
                                  "--name", "x", "--no-progress", "--timesteps", 64, *SMALL])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, "but by an agent that is not registered")
    not_echoed(err)
    assert not (tmp_path / "runs" / "x").exists() and not (tmp_path / "MARKER").exists()


def test_init_from_a_run_with_a_deeply_nested_config_is_one_line(policy, stories_bin, tmp_path, capsys):  # noqa: F811
    """The run folder of an --init-from policy is read for its observation kind: a config.json nested
    too deeply to parse is passed over (no RecursionError), and the next check speaks."""
    start = copy_run(policy, tmp_path / "run", config_json="[" * 200_000 + "]" * 200_000)
    code = run_main(train_agent, ["--model", stories_bin, "--init-from", start, "--logdir", tmp_path / "runs",
                                  "--name", "x", "--no-progress", "--timesteps", 64, "--env-kwargs", "n_tokens=512",
                                  "seq_len=64", "action_kind=continuous"])
    assert_one_line_error(code, capsys.readouterr().err, "but action_kind='continuous' gives")
    assert not (tmp_path / "runs" / "x").exists()


def test_a_policys_run_folder_chooses_no_cache_folder_or_device(policy, cache_dir, tmp_path, capsys):  # noqa: F811
    """A copied run with cache_dir and device set: both are ignored, with a note (the cache goes to
    $QENV_CACHE_DIR, the model to the default device). ``--agent dqn`` ends the run once the
    environment is built (after its cache files are written), before any evaluation."""
    foreign = tmp_path / "foreign-cache"
    config = json.loads((policy.parent / "config.json").read_text())
    config["env_kwargs"].update(cache_dir=str(foreign), device="cuda:7", data=str(tmp_path / "elsewhere.txt"))
    evil = copy_run(policy, tmp_path / "run", config_json=config)
    code = run_main(eval_agent, ["--policy", evil, "--agent", "dqn", "--searchers", "none", "--out", tmp_path / "out"])
    out, err = capsys.readouterr()
    assert_one_line_error(code, err, "was trained with PPO (ppo), not DQN (dqn)")  # not "no CUDA GPU"
    assert f"ignoring cache_dir={foreign}, device=cuda:7 from the run folder" in out
    assert "elsewhere.txt is not a file here: calibrating on tokens sampled from the model" in out
    assert not foreign.exists()
    assert any(cache_dir.iterdir())


# -- 2. sizes before allocation ----------------------------------------------------------------------
def patched_gguf(src: Path, target: Path, **values: int) -> Path:
    """A copy of ``src`` with some of its integer metadata changed in place (same tensors)."""
    from gguf import GGUFReader

    shutil.copy(src, target)
    target.chmod(0o644)
    reader = GGUFReader(str(target), "r+")
    for key, value in values.items():
        field = reader.fields[f"llama.{key}"]
        field.parts[field.data[0]][0] = value
    del reader
    return target


GGUF_CASES = {
    # case: (metadata changed, phrase of the error line)
    "declares_16_blocks_of_2048x8192": ({"block_count": 16, "embedding_length": 2048, "feed_forward_length": 8192},
                                        "declares a model of 813,762,560 parameters"),
    "declares_200_blocks_of_16384x65536": ({"block_count": 200, "embedding_length": 16384,
                                            "feed_forward_length": 65536}, "but its tensors hold 292,800"),
    "head_count_not_dividing_the_width": ({"attention.head_count": 7},
                                          "not a multiple of the number of attention heads (7)"),
    "context_length_zero": ({"context_length": 0}, "declares context_length=0"),
}


@pytest.fixture(scope="module")
def stories_gguf() -> Path:
    from conftest import DATA_DIR, require

    path = DATA_DIR / "stories260K" / "stories260K.gguf"
    require(path, "stories260K.gguf")
    return path


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_a_gguf_that_cannot_hold_its_model_is_one_line(case, stories_gguf, cache_dir, tmp_path, capsys):
    values, needle = GGUF_CASES[case]
    model = patched_gguf(stories_gguf, tmp_path / f"{case}.gguf", **values)
    code = run_main(train_agent, ["--model", model, "--logdir", tmp_path / "runs", "--name", "x", "--no-progress",
                                  "--timesteps", 64, *SMALL])
    assert_one_line_error(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "runs" / "x").exists()


@pytest.mark.parametrize("case", ["16_blocks_of_2048x8192", "200_blocks_of_16384x65536"])
def test_a_model_folder_whose_config_outgrows_its_weights_is_one_line(case, cache_dir, tmp_path, capsys):
    """The same check for a transformers folder (safetensors headers against a meta-device build),
    before transformers would allocate the declared model and fill in what the file lacks."""
    from qenv.models.loading import load_model

    folder = tmp_path / "model"
    load_model("tiny-llama").model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    blocks, width, ffn = (int(x) for x in case.replace("_blocks_of_", "x").split("x"))
    config.update(num_hidden_layers=blocks, hidden_size=width, intermediate_size=ffn, num_attention_heads=width // 64,
                  num_key_value_heads=width // 64, head_dim=64)
    (folder / "config.json").write_text(json.dumps(config))
    capsys.readouterr()  # save_pretrained's progress bar
    code = run_main(train_agent, ["--model", folder, "--logdir", tmp_path / "runs", "--name", "x", "--no-progress",
                                  "--timesteps", 64, *SMALL])
    assert_one_line_error(code, capsys.readouterr().err, "but its tensors hold 106,816; it is not built")
    assert not (tmp_path / "runs" / "x").exists()


def test_the_size_check_passes_an_intact_gguf(stories_gguf):
    """The control: the file's own metadata describes its tensors."""
    from qenv.models.loading import load_model

    assert load_model(stories_gguf).context_length == 2048


def test_a_zip_entry_that_inflates_past_its_cap_is_not_read(policy, tmp_path, capsys):  # noqa: F811
    from qenv.agents.sb3 import MAX_DATA_BYTES

    evil = copy_run(policy, tmp_path / "run")
    replace_entry(evil, "data", b" " * (MAX_DATA_BYTES + 1))  # JSON whitespace: valid, if read whole
    assert evil.stat().st_size < MAX_DATA_BYTES // 100
    code = run_main(eval_agent, ["--policy", evil, "--searchers", "none", "--out", tmp_path / "out"])
    assert_one_line_error(code, capsys.readouterr().err, "would inflate to 16 MiB (entry 'data')")
    assert not (tmp_path / "out").exists()


def nested_aliases(levels: int) -> str:
    """A YAML config whose ``policy_kwargs`` hold ``10 ** levels`` strings once aliases are expanded."""
    lines = ["QuantLLM-v0:", "  policy_kwargs:", "    a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for n in range(1, levels):
        lines.append(f"    a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


YAML_CASES = {
    "nested_aliases_under_policy_kwargs": (nested_aliases(7), "once its aliases (*name) are expanded"),
    "nested_brackets": ("QuantLLM-v0:\n  policy_kwargs: {net_arch: " + "[" * 5_000 + "]" * 5_000 + "}\n",
                        "nests too deeply to read"),
}


@pytest.mark.parametrize("case", extended_beyond(list(YAML_CASES), ["nested_aliases_under_policy_kwargs"]))
def test_a_yaml_config_that_resolves_to_gigabytes_is_one_line(case, stories_bin, tmp_path, capsys):
    text, needle = YAML_CASES[case]
    config = tmp_path / "config.yaml"
    config.write_text(text)
    assert config.stat().st_size < 2**17  # small files
    code = run_main(train_agent, ["--model", stories_bin, "--config", config, "--logdir", tmp_path / "runs",
                                  "--name", "x", "--no-progress", "--timesteps", 64, *SMALL])
    assert_one_line_error(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "runs" / "x").exists()


def test_resolved_size_counts_each_alias_where_it_is_used():
    """Shared objects (loaded aliases) count at every use; a self-reference counts past the limit."""
    import yaml

    from qenv.cli.config import resolved_size

    loop: list = []
    loop.append(loop)
    assert resolved_size(loop, limit=1000) == 1001
    assert resolved_size({"a": ["xy", 3]}) == 8  # dict 1, "a" 1+1, list 1, "xy" 1+2, 3 1
    shared = [1]
    assert resolved_size([shared, shared, {"k": shared}]) == 10
    assert resolved_size(yaml.safe_load(nested_aliases(7)), limit=10**9) > 10**7  # 10**7 strings "x"


# -- 3. hostile or damaged agent files ------------------------------------------------------------------
def vecnormalize(size: int, **change: object) -> str:
    """VecNormalize statistics as train_agent.py writes them (a ``None`` in ``change`` drops the key)."""
    state = {"norm_obs": True, "norm_reward": False, "mean": [0.0] * size, "var": [1.0] * size, "count": 10.0,
             "clip_obs": 10.0, "clip_reward": 10.0, "epsilon": 1e-8, "gamma": 0.99}
    state.update(change)
    return json.dumps({k: v for k, v in state.items() if v is not None})


AGENT_FILE_CASES = {
    # case: (how to damage the copied run folder (folder, marker, observation size), phrase of the error line)
    "pickle_in_policy_pth": (lambda f, m, n: replace_entry(f / "model.zip", "policy.pth", pickled_pth(m)),
                             "holds pickled Python objects among its tensors"),
    "pickle_in_pytorch_variables_pth": (
        lambda f, m, n: replace_entry(f / "model.zip", "pytorch_variables.pth", pickled_pth(m)),
        "holds pickled Python objects among its tensors"),
    "deeply_nested_data_json": (
        lambda f, m, n: replace_entry(f / "model.zip", "data", b"[" * 200_000 + b"]" * 200_000),
        "its 'data' entry is not readable JSON (its JSON nests too deeply)"),
    "deeply_nested_summary_json": (lambda f, m, n: (f / "summary.json").write_text("[" * 200_000 + "]" * 200_000),
                                   "is not valid JSON (it nests too deeply)"),
    "summary_train_models_not_a_list": (lambda f, m, n: (f / "summary.json").write_text(json.dumps(
        {"agent": "ppo", "train_models": "stories260K"})), "env_kwargs or train_models of the wrong shape"),
    "config_env_kwargs_a_string": (lambda f, m, n: (f / "config.json").write_text(json.dumps(
        {"agent": "ppo", "env_kwargs": "n_tokens=512"})), "env_kwargs or train_models of the wrong shape"),
    "vecnormalize_wrong_length": (
        lambda f, m, n: (f / "vecnormalize.json").write_text(vecnormalize(n, mean=[0.0] * 3, var=[1.0] * 3)),
        "mean has 3 entries and var 3, not"),
    "vecnormalize_negative_variance": (
        lambda f, m, n: (f / "vecnormalize.json").write_text(vecnormalize(n, var=[-1.0] * n)),
        "var holds a negative variance (-1)"),
    "vecnormalize_a_string": (lambda f, m, n: (f / "vecnormalize.json").write_text(json.dumps("mean var count")),
                              "are damaged (not a JSON object)"),
    "vecnormalize_missing_key": (lambda f, m, n: (f / "vecnormalize.json").write_text(vecnormalize(n, count=None)),
                                 "are damaged (no count)"),
}


@pytest.fixture(scope="module")
def observation_size(policy) -> int:  # noqa: F811
    from qenv.agents.sb3 import safe_custom_objects

    return int(safe_custom_objects(policy)["observation_space"].shape[0])


@pytest.mark.parametrize("case", list(AGENT_FILE_CASES))
def test_a_hostile_or_damaged_agent_file_is_one_line(case, policy, observation_size, tmp_path, capsys):  # noqa: F811
    damage, needle = AGENT_FILE_CASES[case]
    marker = tmp_path / "MARKER"
    evil = copy_run(policy, tmp_path / "run")
    damage(evil.parent, marker, observation_size)
    code = run_main(eval_agent, ["--policy", evil, "--searchers", "none", "--out", tmp_path / "out"])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, needle)
    assert "weights_only" not in err  # torch's advice would run the payload
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def searcher_run(stories_bin, cache_dir, tmp_path_factory) -> Path:
    """A real uniform searcher's model.json in a run folder."""
    from qenv.agents.registry import make_agent
    from qenv.envs.quant_llm import QuantLLMEnv

    folder = tmp_path_factory.mktemp("searcher-run")
    env = QuantLLMEnv(str(stories_bin), n_tokens=512, seq_len=64, cache_dir=cache_dir)
    agent = make_agent("uniform", env, seed=0)
    agent.search(env)
    agent.save(folder / "model.json")
    (folder / "config.json").write_text(json.dumps({
        "agent": "uniform", "env_kwargs": {"model": str(stories_bin), "n_tokens": 512, "seq_len": 64}}))
    return folder / "model.json"


SEARCHER_CASES = {
    "unknown_hyperparameter": (lambda d: d["hyperparams"].update(temperature=3), "unknown key(s) ['temperature']"),
    "string_seed": (lambda d: d.update(seed="zero"), "seed='zero' is not a whole number"),
    "no_layers": (lambda d: d.pop("layers"), "it lists no layers"),
    "a_pool_from_the_file": (lambda d: d["hyperparams"].update(pool={"workers": 2}), "hyperparams names a pool"),
    "actions_of_another_length": (lambda d: d.update(actions=d["actions"][:1]), "one action per layer"),
}


@pytest.mark.parametrize("case", list(SEARCHER_CASES))
def test_a_damaged_searcher_file_is_one_line(case, searcher_run, tmp_path, capsys):
    damage, needle = SEARCHER_CASES[case]
    folder = tmp_path / "run"
    shutil.copytree(searcher_run.parent, folder)
    data = json.loads((folder / "model.json").read_text())
    damage(data)
    (folder / "model.json").write_text(json.dumps(data))
    code = run_main(eval_agent, ["--policy", folder / "model.json", "--searchers", "none", "--out", tmp_path / "out"])
    assert_one_line_error(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "out").exists()


# -- 17. an init_from cycle ----------------------------------------------------------------------------
def test_an_init_from_cycle_ends(policy, stories_bin, tmp_path, capsys):  # noqa: F811
    """A; B fine-tuned from A; A replaced (--overwrite) by a run fine-tuned from B: each run's
    summary names the other's policy. eval_agent reads each run once and evaluates."""
    a, b = tmp_path / "A", tmp_path / "B"
    for folder, other in ((a, b), (b, a)):
        copy_run(policy, folder, summary_json={**_summary("ppo", policy), "init_from": str(other / "model.zip"),
                                               "train_models": [{"spec": str(stories_bin)}]})
    run = eval_agent.read_run(a / "model.zip")
    assert run["pretrain_models"] == [{"spec": str(stories_bin)}]  # B's, read once; A's not again
    code = run_main(eval_agent, ["--policy", a / "model.zip", "--searchers", "none", "--out", tmp_path / "out"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "results.json").read_text())["models"][0]["status"] == "fine-tuned"


# -- agent zips (issue 6 and 13): pickled code is refused, exact pickle names only, the algorithm from the zip --
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
