"""Baselines on demand and cached: eval_agent.py --presets picks the human presets, and a preset's metrics
are read back from qenv's cache only under the same model, tokens, calibration, recipe and settings."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STORIES_BIN, load_script, require, run_main

from qenv import Evaluator, load_model, tokens_from_model
from qenv.cache_files import CacheWarning, write_cache_file
from qenv.cli.presets import bracketing_presets
from qenv.eval.preset_cache import cached_metrics, metrics_cache_key, metrics_cache_path
from qenv.quant.presets import LLAMACPP_PRESETS, preset

eval_agent = load_script("eval_agent")
train_agent = load_script("train_agent")


@pytest.fixture(scope="module")
def stories():
    require(STORIES_BIN, "stories260K llama2.c checkpoint")
    return load_model(str(STORIES_BIN))


def _evaluator(lm, cache, seed: int = 0, batch_size: int = 8) -> Evaluator:
    return Evaluator(lm, tokens_from_model(lm.model, 256, 64, seed=seed), batch_size=batch_size, cache_dir=cache)


def test_cached_metrics_match_a_fresh_computation_and_are_read_back(stories, tmp_path) -> None:
    ev = _evaluator(stories, tmp_path)
    recipe = preset("gptq-w3", ev.layers)
    first, hit = cached_metrics(ev, recipe)
    assert not hit and first == ev.evaluate(recipe)  # the same numbers as a fresh evaluation, bit for bit
    again, hit = cached_metrics(_evaluator(stories, tmp_path), recipe)  # a new process's evaluator
    assert hit and again == first
    path = metrics_cache_path(ev, recipe)
    assert path.parent == tmp_path and path.name.startswith("presets-v1-")
    # what the file holds is what is returned: it was read, not recomputed
    vector = torch.tensor([123.0, first.ppl, first.top1, first.bpw, first.model_bytes, first.n_tokens],
                          dtype=torch.float64)
    write_cache_file(path, {"metrics": vector}, metrics_cache_key(ev, recipe))
    assert cached_metrics(ev, recipe)[0].kl == 123.0
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit: the checksum refuses it, and it is measured again
    path.write_bytes(bytes(data))
    with pytest.warns(CacheWarning, match="checksum"):
        assert cached_metrics(ev, recipe) == (first, False)


@pytest.mark.slow  # extended tier: a fresh evaluation per key component
def test_every_key_component_misses(stories, tmp_path) -> None:
    ev = _evaluator(stories, tmp_path)
    recipe = preset("awq-w3", ev.layers)
    base = metrics_cache_path(ev, recipe)
    cached_metrics(ev, recipe)
    other_model = load_model("default")
    held = _evaluator(stories, tmp_path, seed=1)
    shared = _evaluator(stories, tmp_path, seed=1)
    shared.weights = ev.weights  # held-out scoring as eval_agent does: calibrated on ev's tokens
    variants = {
        "model": (_evaluator(other_model, tmp_path), preset("awq-w3", other_model.layers)),
        "tokens": (held, recipe),
        "calibration tokens": (shared, recipe),
        "recipe": (ev, preset("awq-w3-g64", ev.layers)),
        "one layer's rule": (ev, {**recipe, ev.layers[0].name: preset("awq-w4", ev.layers)[ev.layers[0].name]}),
        "batch split": (_evaluator(stories, tmp_path, batch_size=2), recipe),
    }
    paths = {base}
    for what, (evaluator, r) in variants.items():
        path = metrics_cache_path(evaluator, r)
        assert path not in paths, what
        paths.add(path)
        metrics, hit = cached_metrics(evaluator, r)
        assert not hit and metrics == evaluator.evaluate(r), what
    assert metrics_cache_path(_evaluator(stories, False), recipe) is None  # no cache folder: nothing cached


def test_default_presets_bracket_the_budget_and_the_policy(stories, tmp_path) -> None:
    ev = _evaluator(stories, tmp_path)
    budget, policy_bpw = 4.0, 3.7
    default = eval_agent.select_presets(["default"], ev, budget, policy_bpw)
    everything = eval_agent.select_presets(["all"], ev, budget, policy_bpw)
    today = bracketing_presets(ev, budget, policy_bpw) + list(LLAMACPP_PRESETS) + ["fp16"]
    assert set(everything) == set(today) and len(everything) == len(today)
    assert set(default) < set(everything) and "fp16" in default
    size = {name: ev.size(preset(name, ev.layers))[0] for name in everything}
    for family in ("rtn", "gptq", "awq", "llama.cpp", "llama.cpp+imatrix"):
        mine = [n for n in default if eval_agent.family_of(n) == family]
        theirs = [n for n in everything if eval_agent.family_of(n) == family]
        for bpw in (budget, policy_bpw):  # the nearest at or under and at or over, where the family has one
            below = [size[n] for n in theirs if size[n] <= bpw]
            above = [size[n] for n in theirs if size[n] >= bpw]
            assert not below or max(below) in [size[n] for n in mine], (family, bpw)
            assert not above or min(above) in [size[n] for n in mine], (family, bpw)
        if family.startswith("llama.cpp"):  # and the mixes within 1 bpw of either, and no other
            near = {n for n in theirs if min(abs(size[n] - budget), abs(size[n] - policy_bpw)) <= 1.0}
            nearest = set()
            for bpw in (budget, policy_bpw):
                below = [n for n in theirs if size[n] <= bpw]
                above = [n for n in theirs if size[n] >= bpw]
                nearest |= {max(below, key=size.get)} if below else set()
                nearest |= {min(above, key=size.get)} if above else set()
            assert set(mine) == near | nearest, family
    assert eval_agent.select_presets(["q4_k_m", "rtn", "q4_k_m"], ev, budget, policy_bpw) == \
        ["q4_k_m"] + [n for n in bracketing_presets(ev, budget, policy_bpw) if n.startswith("rtn-")]
    assert eval_agent.select_presets(["none"], ev, budget, policy_bpw) == []


def test_unknown_preset_is_one_line_listing_the_valid_names(tmp_path, capsys) -> None:
    code = run_main(eval_agent, ["--policy", tmp_path / "nope.json", "--presets", "q4_k_m,no-such",
                                 "--out", tmp_path / "o"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "no-such" in lines[0] and "Fix: " in lines[0] and "all" in lines[0] and "q4_k_m" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # extended tier: eval_agent.py twice with every default preset
def test_eval_agent_scores_the_default_presets_once(stories_bin, tmp_path, cache_dir, capsys) -> None:
    assert run_main(train_agent, ["--agent", "greedy", "--model", stories_bin, "--budget-bpw", 4.0, "--name", "g",
                                  "--logdir", tmp_path, "--no-progress", "--env-kwargs", "n_tokens=256",
                                  "seq_len=64"]) == 0
    policy = tmp_path / "g" / "model.json"
    rows = []
    for out in ("a", "b"):
        assert run_main(eval_agent, ["--policy", policy, "--searchers", "none", "--out", tmp_path / out]) == 0
        rows.append({r["method"]: r for r in json.loads((tmp_path / out / "results.json").read_text())
                     ["models"][0]["rows"] if r["kind"] == "preset"})
    printed = capsys.readouterr().out
    # the table says what the numbers are (issue 26 item 7): stories260K's .bin is its own full-precision model
    assert printed.count("KL against the full-precision model; bpw counts the 35 quantized linear layers") == 2
    results = json.loads((tmp_path / "a" / "results.json").read_text())["models"][0]
    assert results["reference"] == "the full-precision model" and results["bpw_counts"].startswith("bpw counts the 35")
    first, second = rows
    assert set(first) == set(second) and len(first) < len(LLAMACPP_PRESETS)
    assert all(r["note"] != "cached" for r in first.values()) and all(r["note"] == "cached" for r in second.values())
    assert all(first[n]["kl"] == second[n]["kl"] and first[n]["bpw"] == second[n]["bpw"] for n in first)
