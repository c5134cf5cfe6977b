"""The zoo of small trained models (issue 25 item 1): ``scripts/train_bench_models.py``'s ``ZOO`` and
``HELD_OUT`` lists and ``build_zoo``, the builder the transfer-policy script calls.

The lists are checked for what the issue asks (the layouts, kept apart from the held-out models);
``build_zoo`` is run for real on the shared corpora with a few steps: it writes folders that
``qenv.load_model`` reads, reuses them when the settings match, retrains when they do not, and is
seeded (two builds give the same weights).
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from conftest import DATA_DIR, REPO, require

SCRIPT = REPO / "scripts" / "train_bench_models.py"


@pytest.fixture(scope="module")
def zoo_script():
    sys.path.insert(0, str(REPO / "scripts"))  # the script imports train_default_model beside it
    spec = importlib.util.spec_from_file_location("train_bench_models_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_zoo_spans_the_layouts_and_is_kept_apart_from_held_out(zoo_script):
    from qenv.models.layers import discover_layers

    zoo, held = zoo_script.ZOO, zoo_script.HELD_OUT
    zoo_types = {m.model_type for m in zoo}
    assert {"gpt2", "llama", "qwen2", "mistral"} <= zoo_types and len(zoo_types - {"gpt2", "llama", "qwen2", "mistral"}) >= 2
    assert not {m.name for m in zoo} & {m.name for m in held}
    assert len({m.seed for m in zoo + held}) == len(zoo + held), "every model has its own seed"
    assert {m.corpus for m in zoo + held} <= set(zoo_script.CORPORA)
    assert {m.model_type for m in held} - zoo_types, "a held-out layout the zoo lacks"
    for model in held:  # never the same model as a zoo entry: another shape or layout
        assert all((model.model_type, model.config) != (z.model_type, z.config) for z in zoo), model.name
    kinds_seen = set()
    for entry in zoo + held:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(entry.seed)
            model = entry.build(2048, zoo_script.ZOO_MAX_POSITIONS)
        layers = discover_layers(model)
        assert layers and all(info.kind != "other" for info in layers), entry.name
        kinds_seen |= {info.kind for info in layers}
        assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 5e6, entry.name  # small: minutes on a CPU
    assert {"qkv", "q", "k", "v", "gate_up", "gate", "fc_in"} <= kinds_seen, "fused and separate projections"
    assert zoo_script.zoo_names(None) == [m.name for m in zoo]  # the default is the training zoo only
    assert zoo_script.zoo_names(["held-out", "zoo-gpt2"]) == [m.name for m in held] + ["zoo-gpt2"]


def test_build_zoo_trains_reuses_and_is_seeded(zoo_script, tmp_path):
    """Two layouts (GPT-2 Conv1D on WikiText-2, Qwen2 on TinyStories), a few CPU steps each."""
    require(DATA_DIR / "wikitext-2" / "train.txt", "WikiText-2")
    require(DATA_DIR / "tinystories", "TinyStories")
    from qenv import load_model

    small = dict(batch=2, seq_len=16, max_eval_tokens=64, max_train_chars=4000)
    names = ["zoo-gpt2", "zoo-qwen2"]
    folders = zoo_script.build_zoo(names, tmp_path / "a", steps=2, **small)
    assert [f.name for f in folders] == names
    for folder in folders:
        stats = json.loads((folder / "train_stats.json").read_text())
        assert stats["steps"] == 2 and stats["n_params"] > 0 and stats["valid_loss"] > 0
        assert stats["corpus"] == zoo_script.ZOO_BY_NAME[folder.name].corpus
        loaded = load_model(folder)
        assert loaded.tokenizer is not None and loaded.context_length == zoo_script.ZOO_MAX_POSITIONS
        assert loaded.model.config.model_type == zoo_script.ZOO_BY_NAME[folder.name].model_type
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")], "temporary folder left behind"

    weights = folders[0] / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert zoo_script.build_zoo(names[:1], tmp_path / "a", steps=2, **small) == folders[:1]
    assert weights.stat().st_mtime_ns == written, "same settings: the cached model is reused"

    again = zoo_script.build_zoo(names[:1], tmp_path / "b", steps=2, **small)
    assert again[0].joinpath("model.safetensors").read_bytes() == weights.read_bytes(), "seeded: same weights"

    zoo_script.build_zoo(names[:1], tmp_path / "a", steps=3, **small)
    assert json.loads((folders[0] / "train_stats.json").read_text())["steps"] == 3, "other settings: retrained"


def test_zoo_bad_input_is_one_line(zoo_script, tmp_path, capsys):
    with pytest.raises(zoo_script.tdm.UserError, match="unknown zoo model 'zoo-nope'"):
        zoo_script.build_zoo(["zoo-nope"], tmp_path)
    assert zoo_script.main(["--zoo", "zoo-nope", "--out-dir", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown zoo model 'zoo-nope'") and err.count("\n") == 1
    assert zoo_script.main(["--zoo", "zoo-gpt2", "--out-dir", str(tmp_path / "z"),
                            "--data-root", str(tmp_path / "no-data")]) == 2
    assert "data file not found" in capsys.readouterr().err
    assert not (tmp_path / "z").exists(), "nothing written on bad input"
