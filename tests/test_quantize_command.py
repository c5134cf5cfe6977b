"""``python -m qenv quantize``: a model to a recipe, a comparison table and a deployable file.

The packed checkpoint (compressed-tensors pack-quantized) loads in transformers with the logits qenv
scored; the gguf menu's .gguf loads in llama.cpp (in a subprocess, repacking off) with them too; a
recipe a runtime cannot run is one line naming the layers and rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import extended_beyond
from qenv.errors import QenvError
from qenv.quant.quantizer import LayerCalibration, quantize_codes, quantize_matrix
from qenv.quant.rules import KEEP, Recipe, Rule

pytest.importorskip("compressed_tensors")

COMMON = ["--n-tokens", "128", "--seq-len", "64", "--threads", "1"]
#: every kind of rule the packed format holds: bits 2..8, groups and rows, (a)symmetric, GPTQ, clipping
PACKABLE = [Rule(bits=2, group_size=32), Rule(bits=3, group_size=64, rounding="gptq"),
            Rule(bits=4, group_size=-1, symmetric=True), Rule(bits=5, group_size=32, mse_clip=True),
            Rule(bits=8, group_size=64, symmetric=True, rounding="gptq"), KEEP, Rule(bits=6, group_size=32, clip=0.9)]


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QENV_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "qenv-cache"))


def quantize(*argv: str) -> int:
    from qenv.agents.quantize import main

    return main([*argv, *COMMON])


def tiny_task(model: str = "tiny-llama"):
    import gymnasium as gym

    env = gym.make("QuantLLM-v0", model=model, n_tokens=128, seq_len=64)
    return env.unwrapped.task


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# -- the integer codes behind the quantizer's images ------------------------------------------------------
@pytest.mark.parametrize("rule", [r for r in PACKABLE if not r.keeps] + [
    Rule(bits=4, group_size=32, act_scale=0.5, mse_clip=True), Rule(bits=3, group_size=64, act_scale=0.5, rounding="gptq")],
    ids=lambda r: r.label())
def test_codes_dequantize_to_the_quantizers_image(rule: Rule) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 128, generator=gen)
    x = torch.randn(512, 128, generator=gen)
    calib = LayerCalibration(act_rms=x.square().mean(0).sqrt(), hessian=x.t() @ x / x.shape[0])
    codes = quantize_codes(weight, rule, calib)
    assert codes.codes.min() >= 0 and codes.codes.max() <= 2**rule.bits - 1
    assert codes.scale.shape == codes.zero.shape == (48, 128 // codes.group)
    assert torch.equal(codes.dequantize(), quantize_matrix(weight, rule, calib))


def test_codes_refuse_rules_that_are_not_codes() -> None:
    for rule in (Rule(bits=3, outlier_fraction=0.005), Rule(gguf="Q4_K"), KEEP):
        with pytest.raises(QenvError, match="integer codes"):
            quantize_codes(torch.randn(8, 64), rule, LayerCalibration(act_rms=torch.ones(64)))


# -- the packed checkpoint ------------------------------------------------------------------------------
def test_mixed_recipe_packs_exactly(tmp_path) -> None:
    from safetensors import safe_open

    from qenv.export_packed import packed_kl, write_packed_checkpoint

    task = tiny_task()
    recipe = Recipe({info.name: PACKABLE[i % len(PACKABLE)] for i, info in enumerate(task.layers)})
    folder = write_packed_checkpoint(task.evaluator, recipe, tmp_path / "packed", {"note": "test"})
    config = json.loads((folder / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    assert len(quant["config_groups"]) == len(PACKABLE) - 1  # one scheme per distinct rule, layers by name
    targets = {t for g in quant["config_groups"].values() for t in g["targets"]}
    assert targets == {n for n, r in recipe.items() if not r.keeps}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.self_attn.q_proj.weight_packed")
        scale = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
        embedding = f.get_tensor("model.embed_tokens.weight")
    assert scale.dtype == torch.float16 and embedding.dtype == torch.float32  # qenv's scales are fp16 values
    assert packed.dtype == torch.int32 and packed.shape == (64, 64 * 2 // 32)  # 2-bit codes, 16 per int32
    assert "model.layers.0.self_attn.q_proj.weight" not in keys and "model.layers.0.mlp.up_proj.weight" in keys
    # transformers' model is exactly the one qenv scored ...
    assert packed_kl(folder, task.evaluator, recipe, max_batches=None) <= 1e-7
    # ... which is not the full-precision model: against the reference it has the scored KL
    from qenv.export_packed import load_packed_checkpoint

    model = load_packed_checkpoint(folder)
    ref = task.evaluator.reference.logprobs[0]
    with torch.inference_mode():
        lp = torch.log_softmax(model(input_ids=task.evaluator.batches[0], use_cache=False).logits.float(), -1)
    lp = lp[:, :-1]  # the reference scores each position's next token
    kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
    assert kl > 1e-6 and kl == pytest.approx(task.evaluator.evaluate(recipe, max_batches=1).kl, rel=1e-2)


def test_packed_checkpoint_refuses_what_it_cannot_hold(tmp_path) -> None:
    from qenv.export_packed import write_packed_checkpoint

    task = tiny_task()
    names = [info.name for info in task.layers]
    recipe = Recipe({names[0]: Rule(bits=4, group_size=32, act_scale=0.5), names[1]: Rule(bits=3, outlier_fraction=0.005),
                     names[2]: Rule(bits=4, group_size=32)})
    with pytest.raises(QenvError) as err:
        write_packed_checkpoint(task.evaluator, recipe, tmp_path / "packed")
    message = str(err.value)
    assert names[0] in message and "AWQ" in message and names[1] in message and "outliers" in message
    assert names[2] not in message and not (tmp_path / "packed").exists()
    gpt2 = tiny_task("tiny-gpt2")
    first = gpt2.layers[0].name
    with pytest.raises(QenvError, match="Conv1D"):
        write_packed_checkpoint(gpt2.evaluator, Recipe({first: Rule(bits=4, group_size=32)}), tmp_path / "g")


# -- the command end to end -----------------------------------------------------------------------------
def test_quantize_writes_a_packed_checkpoint_transformers_loads(tmp_path, capsys) -> None:
    from qenv.export_packed import packed_kl

    out = tmp_path / "out"
    assert quantize("--model", "tiny-llama", "--budget-bpw", "4.0", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "greedy" in printed and "rtn-w4" in printed and "fp16" in printed and "KL" in printed
    # progress in a log (not a terminal under pytest): whole lines, a stage or a tenth each, a bounded number
    assert "\r" not in printed and "loading model tiny-llama: done in " in printed
    assert "search greedy: done, " in printed and "presets: done, " in printed and "memory: " in printed
    assert len(printed.splitlines()) <= 60, printed
    recipe = Recipe.load(out / "recipe.json")
    results = json.loads((out / "results.json").read_text())
    assert results["runtime"] == "transformers" and results["check"]["kl_to_scored"] <= 1e-3
    # the table says what its numbers are: the reference, which tensors bpw counts, the file's real size
    assert "KL against the full-precision model; bpw counts the 14 quantized linear layers (the embedding and " \
        "lm_head excluded)" in printed and "reference: " not in printed
    assert results["check"]["file_bytes"] == sum(p.stat().st_size for p in (out / "model").glob("*.safetensors")) > 0
    assert f"model/*.safetensors: {results['check']['file_bytes'] / 1e6:.4f} MB on disk" in printed
    assert [r["bpw"] <= 4.0 for r in results["rows"] if r["method"] == "greedy"] == [True]
    assert (out / "comparison.csv").read_text().startswith("method,kind,bpw")
    assert all(rule.act_scale == 0 and rule.outlier_fraction == 0 for rule in recipe.values())
    task = tiny_task()  # the same settings: qenv's evaluation of the written recipe
    assert packed_kl(out / "model", task.evaluator, recipe, max_batches=None) <= 1e-3


def test_a_second_quantize_reads_the_presets_from_the_cache(tmp_path, capsys) -> None:
    """Issue 26: the comparison's presets are cached on disk as eval_agent.py's are, so a warm run does
    not score them again; the numbers read back are the ones scored (bit for bit), marked "cached".
    (The module's cache folder: the first run is warm already when another test scored these.)"""
    runs = []
    for name in ("cold", "warm"):
        assert quantize("--model", "tiny-llama", "--budget-bpw", "4.0", "--search-evals", "2",
                        "--out", str(tmp_path / name)) == 0
        capsys.readouterr()
        runs.append(json.loads((tmp_path / name / "results.json").read_text())["rows"])
    cold, warm = ({r["method"]: r for r in rows if r["kind"] == "preset"} for rows in runs)
    assert cold and cold.keys() == warm.keys()
    assert all(r["note"] == "cached" for r in warm.values())
    for name, row in cold.items():
        assert [row[k] for k in ("bpw", "model_mb", "kl", "ppl", "top1")] == \
            [warm[name][k] for k in ("bpw", "model_mb", "kl", "ppl", "top1")]


_LLAMA_CPP_LOGPROBS = r"""
import sys, numpy as np, llama_cpp
path, ids_file, out_file = sys.argv[1:]
ids = np.load(ids_file)
llm = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=ids.shape[1], n_batch=ids.shape[1],
                      n_ubatch=ids.shape[1], n_threads=1, verbose=False, use_extra_bufts=False,
                      type_k=0, type_v=0)
rows = []
for row in ids:
    llm.reset()
    llm.eval(row.tolist())
    rows.append(np.array(llm.scores[: ids.shape[1]], dtype=np.float32))
np.save(out_file, np.stack(rows))
"""


@pytest.mark.slow
def test_quantize_on_the_gguf_menu_writes_a_gguf_llama_cpp_runs(stories_bin, tmp_path) -> None:
    pytest.importorskip("llama_cpp")
    out = tmp_path / "out"
    assert quantize("--model", str(stories_bin), "--budget-bpw", "8.5", "--menu", "gguf", "--out", str(out)) == 0
    recipe = Recipe.load(out / "recipe.json")
    assert recipe and all(rule.gguf is not None for rule in recipe.values())
    assert not (out / "model").exists()
    import gymnasium as gym

    task = gym.make("QuantLLM-v0", model=str(stories_bin), n_tokens=128, seq_len=64, menu="gguf",
                    budget_bpw=8.5, prebuild=False).unwrapped.task
    ev = task.evaluator
    ids = ev.batches[0][:2]
    np.save(tmp_path / "ids.npy", ids.numpy())
    # a crash in llama.cpp fails this test only
    run = subprocess.run([sys.executable, "-c", _LLAMA_CPP_LOGPROBS, str(out / "model.gguf"), str(tmp_path / "ids.npy"),
                          str(tmp_path / "logits.npy")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = torch.log_softmax(torch.from_numpy(np.load(tmp_path / "logits.npy")), -1)
    with torch.inference_mode(), ev.weights.applied(recipe):
        ours = torch.log_softmax(ev.model(input_ids=ids, use_cache=False).logits.float(), -1)
    kl = float((ours.exp() * (ours - theirs)).sum(-1).mean())
    assert kl <= 1e-3, kl


# -- bad input: one line, exit 2 --------------------------------------------------------------------------
def test_a_runtime_that_cannot_run_the_recipe_is_one_line(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert quantize("--model", "tiny-llama", "--budget-bpw", "4.0", "--runtime", "gguf", "--out", str(out)) == 2
    line = one_line_error(capsys)
    assert "llama.cpp cannot run" in line and "model.layers.0." in line and "w" in line and "Fix:" in line
    assert not (out / "model.gguf").exists() and not (out / "recipe.json").exists()
    assert quantize("--model", "tiny-llama", "--budget-bpw", "6.0", "--menu", "gguf", "--runtime", "transformers",
                    "--out", str(out)) == 2
    line = one_line_error(capsys)
    assert "packed checkpoint" in line and "model.layers.0." in line and "llama.cpp type" in line
    assert quantize("--model", "tiny-llama", "--budget-bpw", "6.0", "--menu", "gguf", "--out", str(out)) == 2
    assert "has no tokenizer, which a .gguf must carry" in one_line_error(capsys)
    assert not out.exists()
    assert quantize("--model", "tiny-gpt2", "--budget-bpw", "4.0", "--out", str(out)) == 2
    line = one_line_error(capsys)
    assert "Conv1D" in line and "transformer.h.0." in line


@pytest.mark.parametrize("argv, expected", [
    (["--budget-bpw", "four"], "not a number"),
    (["--budget-bpw", "no-such-preset"], "nor a known preset. Fix: pass a number such as 4.0, or one of "),
    (["--budget-bpw", "40"], "out of range"),
    (["--budget-bpw", "4", "--policy", "no/such/model.zip"], "does not exist"),
    (["--budget-bpw", "4", "--search-evals", "0"], "at least 1"),
    (["--budget-bpw", "4", "--data", "no-such.txt"], "does not exist"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, argv, expected) -> None:
    assert quantize("--model", "tiny-llama", "--out", str(tmp_path / "o"), *argv) == 2
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_a_non_empty_out_folder_is_refused(tmp_path, capsys) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert quantize("--model", "tiny-llama", "--budget-bpw", "4", "--out", str(tmp_path)) == 2
    assert "not empty" in one_line_error(capsys)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    # --overwrite replaces only an earlier output of this command (claim_output_dir, as the other programs)
    assert quantize("--model", "tiny-llama", "--budget-bpw", "4", "--out", str(tmp_path), "--overwrite") == 2
    assert "is not an output folder of python -m qenv quantize" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_overwrite_replaces_an_earlier_quantization_only(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert quantize("--model", "tiny-llama", "--budget-bpw", "8.5", "--search-evals", "1", "--out", str(out)) == 0
    first = json.loads((out / "results.json").read_text())
    assert quantize("--model", "tiny-llama", "--budget-bpw", "8.5", "--out", str(out)) == 2
    line = one_line_error(capsys)
    assert "already exists" in line and "pass --overwrite to replace that quantization" in line
    (out / "notes.txt").write_text("mine")  # the user's file in it survives the overwrite
    assert quantize("--model", "tiny-llama", "--budget-bpw", "6.0", "--search-evals", "1", "--out", str(out),
                    "--overwrite") == 0
    second = json.loads((out / "results.json").read_text())
    assert first["budget_bpw"] == 8.5 and second["budget_bpw"] == 6.0 and (out / "notes.txt").read_text() == "mine"
    assert (out / "model").is_dir() and Recipe.load(out / "recipe.json")


def test_a_search_the_gguf_runtime_cannot_run_is_refused_before_it_runs(tmp_path, capsys) -> None:
    assert quantize("--model", "tiny-llama", "--budget-bpw", "4.0", "--runtime", "gguf", "--menu", "default",
                    "--out", str(tmp_path / "o")) == 2
    line = one_line_error(capsys)
    assert "llama.cpp cannot run any rule of this menu" in line and "model.layers.0." in line and "w4g" in line
    assert "greedy" not in capsys.readouterr().out and not (tmp_path / "o").exists()  # before the search


def test_python_m_qenv_dispatches_to_the_installed_command() -> None:
    run = subprocess.run([sys.executable, "-m", "qenv", "quantize", "--model", "tiny-llama", "--budget-bpw", "x",
                          "--out", "unused"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().startswith("error: --budget-bpw='x' is not a number")
    from qenv.__main__ import build_parser

    assert "quantize" in build_parser().format_help()


# -- a saved agent as --policy: its run's menu and settings ------------------------------------------------
def saved_searcher(folder: Path, menu: list[dict]) -> Path:
    """A run folder of a uniform searcher on ``menu`` (its config.json and model.json, as train_agent.py writes)."""
    from qenv.agents.registry import make_agent
    from qenv.cli.envs import make_quant_env

    settings = {"menu": menu, "n_tokens": 128, "seq_len": 64, "budget_bpw": 8.5}
    env = make_quant_env(model="tiny-llama", **settings)
    searcher = make_agent("uniform", env)
    searcher.search(env, total_timesteps=4 * len(env.unwrapped.task.layers))
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"agent": "uniform", "env_kwargs": {"model": "tiny-llama",
                                                                                         **settings}}))
    return searcher.save(folder / "model.json")


@pytest.mark.slow  # extended tier: another quantize run (a policy's rollout)
def test_a_policy_writes_its_rollout(tmp_path, capsys) -> None:
    policy = saved_searcher(tmp_path / "run", [{"bits": 4, "group_size": 32}, {"bits": 8, "group_size": 32}])
    out = tmp_path / "out"
    assert quantize("--model", "tiny-llama", "--budget-bpw", "8.5", "--policy", str(policy), "--out", str(out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "policy (uniform)" and results["check"]["kl_to_scored"] <= 1e-3
    assert Recipe.load(out / "recipe.json") == Recipe.from_dict(json.loads(policy.read_text()))


def test_a_policy_recipe_the_runtime_cannot_run_is_one_line(tmp_path, capsys) -> None:
    awq = [{"bits": 4, "group_size": 32, "act_scale": 0.5}, {"bits": 8, "group_size": 32, "act_scale": 0.5}]
    policy = saved_searcher(tmp_path / "run", awq)
    out = tmp_path / "out"
    assert quantize("--model", "tiny-llama", "--budget-bpw", "8.5", "--policy", str(policy), "--out", str(out)) == 2
    line = one_line_error(capsys)
    # q/k/v, gate/up and down fold their scales; o_proj's cannot (tiny-llama's value heads are shared: GQA)
    assert "model.layers.0.self_attn.o_proj" in line and "-awq0.5" in line and "GQA" in line
    assert "q_proj" not in line and "down_proj" not in line
    assert not out.exists()


def test_codes_that_do_not_give_back_the_scored_weights_are_refused() -> None:
    from qenv.export_packed import layer_codes

    task = tiny_task()
    info = task.layers[0]
    rule = Rule(bits=4, group_size=32)
    weights = task.evaluator.weights
    assert torch.equal(layer_codes(task.evaluator, info, rule).dequantize(), weights.weight_for(info.name, rule))
    weights._cache[(info.name, rule)] = weights.weight_for(info.name, rule) * 1.001  # not what the codes give
    with pytest.raises(QenvError, match="do not give back the weights qenv scored"):
        layer_codes(task.evaluator, info, rule)
    del weights._cache[(info.name, rule)]


def test_a_stale_install_without_the_command_is_one_line(monkeypatch, capsys) -> None:
    import qenv.__main__ as cli

    monkeypatch.setattr(cli, "installed_commands", lambda: {})
    assert cli.main(["quantize", "--model", "tiny-llama"]) == 2
    line = one_line_error(capsys)
    assert "not installed" in line and "pip install -e ." in line


def test_a_model_the_packed_runtime_cannot_hold_fails_before_the_search(tmp_path, capsys) -> None:
    assert quantize("--model", "tiny-gpt2", "--budget-bpw", "4.0", "--out", str(tmp_path / "o")) == 2
    line = one_line_error(capsys)
    assert "cannot hold any rule of the menu" in line and "transformer.h.0.mlp.c_fc" in line and "Conv1D" in line
    assert "greedy" not in capsys.readouterr().out  # refused before the search: no table


@pytest.mark.parametrize("widths, groups", [((128, 384), {128, 64, 32}), ((576, 1536), {64, 32}), ((64, 172), {-1}),
                                            ((64, 128), {128, 64, 32})])
def test_the_packable_menu_has_groups_that_divide_every_row(widths, groups) -> None:
    from types import SimpleNamespace

    from qenv.agents.quantize import packable_menu

    rules, note = packable_menu([SimpleNamespace(in_features=w) for w in widths])
    assert {r.group_size for r in rules} == groups
    assert all(r.act_scale == 0 and r.outlier_fraction == 0 and not r.keeps for r in rules)
    assert len({r.bits for r in rules}) == 6 and len(set(rules)) == len(rules)
    assert ("to divide every layer's input width" in note) == (groups != {128, 64, 32})


# -- AWQ scales folded into the op before the layer --------------------------------------------------------
def awq_recipe(task, kept: tuple[str, ...] = ()) -> Recipe:
    """AWQ rules (of several kinds) on every layer, fp16 on the layers whose names end with ``kept``."""
    awq = [Rule(bits=4, group_size=32, act_scale=0.5, mse_clip=True), Rule(bits=3, group_size=64, act_scale=0.5,
                                                                         rounding="gptq", symmetric=True)]
    return Recipe({info.name: KEEP if info.name.endswith(kept) else awq[info.block % 2] for info in task.layers})


@pytest.mark.parametrize("kept", [(), pytest.param(("k_proj", "up_proj"), marks=pytest.mark.slow)],  # 2nd: extended
                         ids=["all-awq", "fp16-readers-and-producer"])
def test_awq_scales_fold_into_the_previous_op(tmp_path, kept) -> None:
    from qenv.export_packed import packed_kl, write_packed_checkpoint
    from qenv.models.loading import load_model
    from qenv.models.tiny import build_tiny_model

    no_gqa = tmp_path / "llama-mha"  # o_proj's scale folds into v_proj only when no value head is shared
    build_tiny_model("llama", num_key_value_heads=4).save_pretrained(no_gqa)
    import gymnasium as gym

    loaded = load_model(str(no_gqa))
    task = gym.make("QuantLLM-v0", model=loaded, n_tokens=128, seq_len=64, prebuild=False).unwrapped.task
    recipe = awq_recipe(task, kept)
    folder = write_packed_checkpoint(task.evaluator, recipe, tmp_path / "packed")
    kl = packed_kl(folder, task.evaluator, recipe, max_batches=None)
    scored = task.evaluator.evaluate(recipe).kl  # the model is not the full-precision one ...
    # ... and the file is it up to float rounding: the codes are qenv's, the scales moved into the norm / rows
    assert scored > 1e-5 and kl <= min(1e-6, scored * 1e-2), (kl, scored)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
    assert not torch.equal(norm, loaded.model.model.layers[0].input_layernorm.weight)  # the scale is in the norm


def test_an_awq_scale_that_cannot_fold_is_named(tmp_path) -> None:
    from qenv.export_packed import write_packed_checkpoint

    task = tiny_task()  # GQA: o_proj's scale cannot fold
    recipe = dict(awq_recipe(task))
    recipe["model.layers.1.self_attn.k_proj"] = Rule(bits=4, group_size=32)  # reads q's input without its scale
    with pytest.raises(QenvError) as err:
        write_packed_checkpoint(task.evaluator, Recipe(recipe), tmp_path / "packed")
    message = str(err.value)
    assert "model.layers.0.self_attn.o_proj" in message and "GQA" in message
    assert "model.layers.1.self_attn.q_proj" in message and "another scale" in message
    assert "model.layers.0.self_attn.q_proj" not in message and "down_proj" not in message


# -- --menu learned: the learned-rounding rules reach the command, and their codes pack exactly ----------
def test_the_learned_menu_packs_its_learned_rules() -> None:
    from types import SimpleNamespace

    from qenv.agents.quantize import packable_menu
    from qenv.envs.spaces import LEARNED_RULES

    default, _ = packable_menu([SimpleNamespace(in_features=w) for w in (128, 384)])
    learned, note = packable_menu([SimpleNamespace(in_features=w) for w in (128, 384)], "learned")
    assert learned[:len(default)] == default and set(LEARNED_RULES) <= set(learned)
    assert "learned menu's packable rules" in note


def test_quantize_on_the_learned_menu_writes_what_it_scored(tmp_path, capsys) -> None:
    from qenv.agents.quantize import packable_menu
    from qenv.export_packed import packed_kl
    from qenv.models.loading import load_model

    out = tmp_path / "out"
    assert quantize("--model", "tiny-llama", "--budget-bpw", "3.3", "--menu", "learned", "--out", str(out)) == 0
    assert "(learned menu)" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["menu"] == "learned" and results["check"]["kl_to_scored"] <= 1e-3
    recipe = Recipe.load(out / "recipe.json")
    menu, _ = packable_menu(list(load_model("tiny-llama", device="cpu").layers), "learned")
    assert set(recipe.values()) <= set(menu) and any(r.rounding == "learned" for r in recipe.values())
    assert packed_kl(out / "model", tiny_task().evaluator, recipe, max_batches=None) <= 1e-3


@pytest.mark.parametrize("model", extended_beyond(["tiny-llama", "tiny-qwen2", "tiny-mistral"], ["tiny-llama"]))
def test_a_budget_named_by_a_preset_is_its_own_bpw_on_the_model(tmp_path, capsys, model) -> None:
    """Issue 24 item 1: ``--budget-bpw gptq-w4`` is uniform gptq-w4's exact bits per weight on this model
    (group scales and zero points of its own widths), the parser train_agent.py and eval_agent.py use."""
    from qenv.models.loading import load_model
    from qenv.quant.accounting import bits_per_weight
    from qenv.quant.presets import preset

    layers = load_model(model, device="cpu").layers
    exact = bits_per_weight(layers, preset("gptq-w4", layers))
    assert quantize("--model", model, "--budget-bpw", "gptq-w4", "--search-evals", "1", "--out", str(tmp_path / "o")) == 0
    printed = capsys.readouterr().out
    assert f"budget gptq-w4 ({exact:.3f} bpw)" in printed
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["budget_bpw"] == exact and results["budget_preset"] == "gptq-w4"
    assert [r["bpw"] for r in results["rows"] if r["method"] == "gptq-w4"] == [exact]
    assert all(r["bpw"] <= exact + 1e-9 for r in results["rows"] if r["kind"] == "searcher")
