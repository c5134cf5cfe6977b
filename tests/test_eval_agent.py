"""eval_agent.py end to end on a tiny trained policy: tables, files, unseen-model gain, exports."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import load_script, run_main

REPO = Path(__file__).resolve().parents[1]
TINY_PPO = """\
QuantLLM-v0:
  n_timesteps: 64
  policy: MlpPolicy
  n_steps: 64
  batch_size: 32
  n_epochs: 2
  policy_kwargs: {net_arch: [32, 32]}
"""
from qenv.quant.presets import LLAMACPP_PRESETS  # noqa: E402

PRESETS_AT_3 = {"rtn-w2", "gptq-w2", "awq-w2", "rtn-w3", "gptq-w3", "awq-w3", "fp16"} | set(LLAMACPP_PRESETS)
SEARCHERS = {"uniform", "llamacpp", "greedy", "random", "evolution"}


train_agent = load_script("train_agent")
eval_agent = load_script("eval_agent")


@pytest.fixture(scope="module")
def policy(stories_bin, cache_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY_PPO)
    code = run_main(train_agent, ["--model", stories_bin, "--config", cfg, "--logdir", root, "--name", "p",
                                  "--no-progress", "--env-kwargs", "n_tokens=512", "seq_len=64"])
    assert code == 0
    return root / "p" / "model.zip"


@pytest.fixture(scope="module")
def evaluated(policy, stories_bin, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    saved = out.parent / "saved"
    capture = tmp_path_factory.mktemp("log") / "stdout.txt"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = run_main(eval_agent, ["--policy", policy, "--model", stories_bin, "--model", "tiny-llama",
                                     "--search-evals", 2, "--presets", "all", "--out", out, "--export",
                                     "--save-model", saved])
    capture.write_text(buf.getvalue())
    assert code == 0, buf.getvalue()
    return {"out": out, "stdout": buf.getvalue(), "saved": saved}


def test_tables_printed_per_model(evaluated):
    text = evaluated["stdout"]
    assert text.count("method ") == 2  # one table header per model
    assert "stories260K (trained-on model), budget 3 bpw" in text
    assert "tiny-llama (unseen model)" in text
    for name in PRESETS_AT_3 | SEARCHERS | {"policy (ppo)"}:
        assert name in text, name
    # rows over the budget are marked
    marked = [line for line in text.splitlines() if line.startswith("* ")]
    assert any("rtn-w3" in line for line in marked) and any("fp16" in line for line in marked)
    assert not any(line.startswith("* ") and "awq-w2" in line for line in text.splitlines())


def test_unseen_model_gain_line(evaluated):
    """The summary leads with comparisons at the policy's own size; the best preset at or under the budget
    (usually smaller) follows for reference and is never called a win."""
    text = evaluated["stdout"].splitlines()
    lines = [line for line in text if line.startswith("unseen model tiny-llama")]
    assert len(lines) == 1
    lead = lines[0]
    results = json.loads((evaluated["out"] / "results.json").read_text())
    tiny = next(m for m in results["models"] if m["model"] == "tiny-llama")
    comps = tiny["comparisons"]
    policy = next(r for r in tiny["rows"] if r["kind"] == "policy")
    greedy = next(r for r in tiny["rows"] if r["method"] == "greedy")
    assert f"at its own {policy['bpw']:.3f} bpw" in lead and "greedy KL" in lead and "the best start (" in lead
    assert comps["greedy"]["kl_ratio"] == pytest.approx(greedy["kl"] / policy["kl"])
    for comp in comps.values():  # "worse" exactly where the policy's KL is higher
        assert (comp["verdict"] == "policy worse") == (comp["kl"] < policy["kl"])
        if comp["verdict"] == "policy worse":
            assert comp["what"] in lead.split(": policy worse than ")[1]
    starts = [r for r in tiny["rows"] if not r["over_budget"] and (r["method"] in ("greedy", "uniform") or (
        r["kind"] == "preset" and r["method"].split("-w")[0] in ("rtn", "gptq", "awq")))]
    assert comps["best_start"]["kl"] == min(r["kl"] for r in starts)
    # then the secondary line: the best preset at or under the budget, both sizes named, never a win
    ref = text[text.index(lead) + 2]
    assert ref.startswith("  for reference (not an equal-size comparison): the best preset at or under 3 bpw")
    gain = tiny["gain"]
    assert tiny["seen"] is False
    assert gain["kl_ratio"] == pytest.approx(gain["preset_kl"] / gain["policy_kl"])
    fair = [r for r in tiny["rows"] if r["kind"] == "preset" and not r["over_budget"]]
    assert gain["preset_kl"] == min(r["kl"] for r in fair)
    assert f"KL ratio preset/policy {gain['kl_ratio']:.3g}x" in ref and "ppl" in ref
    assert f"({gain['best_preset']} @ {gain['preset_bpw']:.3f} bpw" in ref
    assert "better" not in ref and "win" not in ref.replace("not an equal-size", "")
    at_own = [t for t in text if t.startswith("  at the policy's own ")]
    assert len(at_own) == 2 and all("rtn" in t and "llama.cpp" in t for t in at_own)


def gain_bpw(evaluated, model: str) -> float:
    results = json.loads((evaluated["out"] / "results.json").read_text())
    return next(m for m in results["models"] if m["model"] == model)["gain"]["preset_bpw"]


def test_family_frontiers_at_the_policys_bpw(evaluated):
    """Each family's frontier is interpolated between its two presets that bracket the policy's bpw."""
    import math

    results = json.loads((evaluated["out"] / "results.json").read_text())
    for model in results["models"]:
        policy = next(r for r in model["rows"] if r["kind"] == "policy")
        fronts = model["gain"]["frontiers_at_policy_bpw"]
        point = fronts["rtn"]
        if point is None:
            continue
        rows = {r["method"]: r for r in model["rows"]}
        lo_name, hi_name = (part.split(" @ ")[0] for part in point["between"].split(" and "))
        lo, hi = rows[lo_name], rows[hi_name]
        assert lo["bpw"] <= policy["bpw"] + 1e-9 <= hi["bpw"] + 2e-9
        t = 0.0 if hi["bpw"] == lo["bpw"] else (policy["bpw"] - lo["bpw"]) / (hi["bpw"] - lo["bpw"])
        assert point["kl"] == pytest.approx(math.exp((1 - t) * math.log(lo["kl"]) + t * math.log(hi["kl"])))


def test_results_files(evaluated, stories_bin):
    out = evaluated["out"]
    results = json.loads((out / "results.json").read_text())
    assert [m["model"] for m in results["models"]] == ["stories260K", "tiny-llama"]
    assert results["budget_bpw"] == 3.0 and results["agent"] == "ppo"
    stories = results["models"][0]
    assert stories["seen"] is True
    methods = {r["method"] for r in stories["rows"]}
    assert methods == PRESETS_AT_3 | SEARCHERS | {"policy (ppo)"}
    bpws = [r["bpw"] for r in stories["rows"]]
    assert bpws == sorted(bpws)
    for r in stories["rows"]:
        assert r["over_budget"] == (r["bpw"] > 3.0 + 1e-9)
        assert r["wall_s"] >= 0
    policy_row = next(r for r in stories["rows"] if r["kind"] == "policy")
    assert not policy_row["over_budget"]
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == sum(len(m["rows"]) for m in results["models"])
    assert {r["model"] for r in rows} == {"stories260K", "tiny-llama"}
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_numbers_come_from_the_evaluator(evaluated, stories_bin):
    """A preset's row equals a fresh evaluator's score of that preset on the same tokens."""
    import gymnasium as gym

    from qenv.quant.presets import preset

    results = json.loads((evaluated["out"] / "results.json").read_text())
    stories = results["models"][0]
    env = gym.make("QuantLLM-v0", model=str(stories_bin), n_tokens=512, seq_len=64)
    task = env.unwrapped.task
    for name in ("rtn-w2", "q4_k_m"):
        metrics = task.evaluator.evaluate(preset(name, task.layers))
        got = next(r for r in stories["rows"] if r["method"] == name)
        assert got["kl"] == pytest.approx(metrics.kl, rel=1e-6)
        assert got["bpw"] == pytest.approx(metrics.bpw, rel=1e-12)
        assert got["ppl"] == pytest.approx(metrics.ppl, rel=1e-6)


def test_export_and_saved_model_written(evaluated):
    from transformers import AutoConfig

    from qenv.quant.rules import Recipe

    out = evaluated["out"]
    results = json.loads((out / "results.json").read_text())
    for model in results["models"]:
        folder = Path(model["export"])
        assert Recipe.load(folder / "recipe.json") == Recipe.from_dict(model["policy_recipe"])
        assert (folder / "llamacpp-tensor-types.txt").is_file()
        # the default menu's RTN/AWQ rules are neither GPTQModel- nor llama.cpp-runnable as measured: said why
        skipped = (folder / "skipped.txt").read_text() if (folder / "skipped.txt").is_file() else ""
        assert (folder / "gptqmodel-quantize-config.json").is_file() or "gptqmodel-quantize-config.json:" in skipped
        assert (folder / "model.gguf").is_file() or "model.gguf:" in skipped
        saved = Path(model["saved_model"])
        config = AutoConfig.from_pretrained(saved)
        assert Recipe.from_dict(config.qenv_recipe["rules"]) == Recipe.from_dict(model["policy_recipe"])
    assert {p.name for p in evaluated["saved"].iterdir()} == {"stories260K", "tiny-llama"}


@pytest.mark.slow  # extended tier: another eval_agent.py run
def test_held_out_text_is_scored(policy, stories_bin, tmp_path, capsys):
    data = REPO.parent / "shared" / "data" / "tinystories" / "TinyStories-valid-first1000.txt"
    if not data.is_file():
        pytest.skip(f"real data missing: {data}")
    code = run_main(eval_agent, ["--policy", policy, "--data", data, "--n-tokens", 512, "--searchers", "none",
                                 "--presets", "all", "--out", tmp_path / "o"])
    out = capsys.readouterr().out
    assert code == 0
    assert "held-out text (512 tokens of TinyStories-valid-first1000.txt)" in out
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    rows = {r["method"]: r for r in results["models"][0]["rows"]}
    assert set(rows) == PRESETS_AT_3 | {"policy (ppo)"}
    assert rows["fp16"]["kl"] == 0 and rows["fp16"]["ppl"] > 1
    # a different token set than the calibration one: the uniform 2-bit KL differs from training's env
    train_summary = json.loads((policy.parent / "summary.json").read_text())
    assert rows["rtn-w2"]["kl"] != pytest.approx(train_summary["final"]["stories260K"]["reference"]["kl"])


@pytest.mark.slow  # extended tier: another eval_agent.py run
def test_seen_follows_the_weights_not_the_file(policy, stories_bin, tmp_path, capsys):
    """issue 25: the policy trained on stories260K.bin has seen stories260K.gguf (the same weights, its
    head untied): the result is a trained-on one, never a zero-shot one."""
    gguf = stories_bin.with_suffix(".gguf")
    if not gguf.is_file():
        pytest.skip(f"real data missing: {gguf}")
    code = run_main(eval_agent, ["--policy", policy, "--model", gguf, "--searchers", "none", "--presets", "none",
                                 "--n-tokens", 256, "--out", tmp_path / "o"])
    assert code == 0, capsys.readouterr().err
    assert "stories260K (trained-on model)" in capsys.readouterr().out
    result = json.loads((tmp_path / "o" / "results.json").read_text())["models"][0]
    trained = json.loads((policy.parent / "summary.json").read_text())["train_models"][0]
    assert result["spec"].endswith("stories260K.gguf") and trained["spec"].endswith("stories260K.bin")
    assert (result["seen"], result["status"], result["fingerprint"]) == (True, "trained-on", trained["fingerprint"])


@pytest.mark.parametrize("case", ["missing_policy", "bad_searcher", "bad_evals", "bad_presets"])
def test_bad_input_is_one_line(case, policy, tmp_path, capsys):
    argv = {"missing_policy": ["--policy", tmp_path / "nope.zip"],
            "bad_presets": ["--policy", policy, "--presets", "no-such"],
            "bad_searcher": ["--policy", policy, "--searchers", "greedy,astrology"],
            "bad_evals": ["--policy", policy, "--search-evals", 0]}[case]
    code = run_main(eval_agent, argv + ["--out", tmp_path / "o"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Fix: " in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()
