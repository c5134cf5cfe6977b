"""Exports parse back: recipe JSON, llama.cpp tensor types (checked against a real GGUF's tensor
names), GPTQModel dynamic regexes, and a saved model that reproduces the evaluator's KL."""

from __future__ import annotations

import re
import shlex
import struct
from pathlib import Path

import pytest
import torch

from qenv.errors import QenvError
from qenv.export import (
    export_all,
    gguf_tensor_name,
    gptqmodel_dynamic,
    gptqmodel_rule_for,
    llamacpp_overrides,
    parse_tensor_types,
    save_quantized_model,
)
from qenv.export_gguf import nearest_kquant
from qenv.quant.presets import KQUANT_RULES
from qenv.quant.rules import KEEP, Recipe, Rule

GGUF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stories260K" / "stories260K.gguf"
#: ggml_type_name() of every type llama-quantize accepts by name
GGML_TYPES = {"f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K",
              "q8_K", "iq2_xxs", "iq2_xs", "iq3_xxs", "iq1_s", "iq4_nl", "iq3_s", "iq2_s", "iq4_xs", "i8", "i16",
              "i32", "i64", "f64", "iq1_m", "bf16", "tq1_0", "tq2_0", "mxfp4"}
RULES = [
    Rule(bits=2, group_size=64),
    Rule(bits=3, group_size=128, rounding="gptq"),
    Rule(bits=3, group_size=64, rounding="gptq", outlier_fraction=0.005),
    Rule(bits=4, group_size=128, act_scale=0.5, mse_clip=True),
    KQUANT_RULES["Q4_K"],
    Rule(bits=5, group_size=128),
    KQUANT_RULES["Q6_K"],
    Rule(bits=8, group_size=-1, symmetric=True),
    KEEP,
]


def gguf_tensor_names(path: Path) -> list[str]:
    """Tensor names from a GGUF (v2/v3) header: magic, version, counts, metadata, tensor infos."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        nonlocal pos
        n = take("Q")
        text = data[pos:pos + n].decode("utf-8")
        pos += n
        return text

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(kind: int) -> None:
        if kind == 8:
            string()
        elif kind == 9:
            inner, count = take("I"), take("Q")
            for _ in range(count):
                value(inner)
        else:
            take(scalar[kind])

    assert data[:4] == b"GGUF"
    pos = 4
    version = take("I")
    assert version in (2, 3)
    n_tensors, n_kv = take("Q"), take("Q")
    for _ in range(n_kv):
        string()
        value(take("I"))
    names = []
    for _ in range(n_tensors):
        names.append(string())
        dims = take("I")
        for _ in range(dims):
            take("Q")
        take("I")  # type
        take("Q")  # offset
    return names


@pytest.fixture(scope="module")
def task(stories_bin, tmp_path_factory):
    import gymnasium as gym

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest (and kind to a busy machine)
    try:
        env = gym.make("QuantLLM-v0", model=str(stories_bin), n_tokens=512, seq_len=64,
                       cache_dir=str(tmp_path_factory.mktemp("cache")))
        yield env.unwrapped.task
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def recipe(task) -> Recipe:
    return Recipe({info.name: RULES[i % len(RULES)] for i, info in enumerate(task.layers)})


def test_recipe_json_round_trip(task, recipe, tmp_path):
    paths = export_all(tmp_path / "x", task.layers, recipe, {"model": task.name, "budget_bpw": 3.0})
    assert Recipe.load(paths["recipe"]) == recipe
    # the recipe holds rules GPTQModel cannot run as measured: no config, and skipped.txt says why
    assert set(paths) == {"recipe", "llamacpp", "llamacpp_command", "skipped"}
    assert "gptqmodel-quantize-config.json: Layer" in paths["skipped"].read_text()
    script = paths["llamacpp_command"].read_text()
    assert "PR #25716" in script and "llama-quantize --pure" in script


def test_llamacpp_names_match_a_real_gguf(task, recipe, tmp_path):
    if not GGUF.is_file():
        pytest.skip(f"real data missing: {GGUF}")
    real = gguf_tensor_names(GGUF)
    assert "blk.0.attn_v.weight" in real and "output.weight" in real
    path = export_all(tmp_path / "x", task.layers, recipe)["llamacpp"]
    pairs = parse_tensor_types(path.read_text())
    assert len(pairs) == len(task.layers) == len({name for name, _ in pairs})
    for (name, qtype), info in zip(pairs, task.layers):
        assert qtype in GGML_TYPES
        assert name == gguf_tensor_name(info)
        # llama-quantize treats NAME as a regex and uses regex_search: it must pick exactly this tensor
        assert [t for t in real if re.search(name, t)] == [name]
    by_layer = dict(zip((i.name for i in task.layers), (t for _, t in pairs)))
    for info in task.layers:
        rule = recipe[info.name]
        if rule == KEEP:
            assert by_layer[info.name] == "f16"
        elif rule == KQUANT_RULES["Q4_K"]:
            assert by_layer[info.name] == "q4_K"
        elif rule == KQUANT_RULES["Q6_K"]:
            assert by_layer[info.name] == "q6_K"


def test_llamacpp_mapping_names_and_annotations(task, recipe):
    layers = {info.name: info for info in task.layers}
    assert gguf_tensor_name(layers["model.layers.3.self_attn.v_proj"]) == "blk.3.attn_v.weight"
    assert gguf_tensor_name(layers["model.layers.3.mlp.down_proj"]) == "blk.3.ffn_down.weight"
    assert gguf_tensor_name(layers["model.layers.0.self_attn.o_proj"]) == "blk.0.attn_output.weight"
    from qenv.models.layers import LayerInfo

    assert gguf_tensor_name(LayerInfo("lm_head", "lm_head", 5, 5, 512, 64)) == "output.weight"
    export = llamacpp_overrides(task.layers, recipe)
    text = export.text()
    for info in task.layers:
        name = gguf_tensor_name(info)
        rule = recipe[info.name]
        notes = export.notes[name]
        if rule.rounding == "gptq":
            assert any("GPTQ" in n for n in notes)
        if rule.outlier_fraction:
            assert any("outliers" in n for n in notes)
        if rule.act_scale:
            assert any("AWQ" in n for n in notes)
        if rule in (KQUANT_RULES["Q4_K"], KQUANT_RULES["Q6_K"], KEEP):
            assert notes == []
        if notes:
            assert f"# approximate {name} ({info.name}): " in text
    # the nearest type is by bits per weight: 2-bit g64 (2.28 bpw) -> Q2_K, 5-bit g128 (5.16) -> Q5_K
    assert nearest_kquant(Rule(bits=2, group_size=64), task.layers[0])[0] == "Q2_K"
    assert nearest_kquant(Rule(bits=5, group_size=128), task.layers[0])[0] == "Q5_K"
    command = shlex.split(export.command("in.gguf", "out.gguf"))
    assert command[:2] == ["llama-quantize", "--pure"] and command[-3:] == ["in.gguf", "out.gguf", export.base_type]
    # the untargeted embedding/output stay f16 (as qenv charges them), every quantized tensor is named
    assert command[2:6] == ["--token-embedding-type", "f16", "--output-tensor-type", "f16"]
    flags = command[6:-3]
    assert flags[::2] == ["--tensor-type"] * len(task.layers)
    assert [tuple(f.split("=")) for f in flags[1::2]] == export.overrides


GPTQ_RULES = [Rule(bits=2, group_size=64, rounding="gptq"), Rule(bits=3, group_size=128, rounding="gptq"),
              Rule(bits=4, group_size=-1, symmetric=True, rounding="gptq"), Rule(bits=8, group_size=32, rounding="gptq"),
              KEEP]


def test_gptqmodel_refuses_rules_it_cannot_run(task, recipe):
    from qenv.export import nearest_gptqmodel_rule

    for bad in (Rule(bits=5, group_size=128, rounding="gptq"), Rule(bits=4, group_size=128),
                Rule(bits=3, group_size=64, rounding="gptq", outlier_fraction=0.005), KQUANT_RULES["Q4_K"],
                Rule(bits=4, group_size=128, act_scale=0.5, mse_clip=True, rounding="gptq")):
        layer = task.layers[2].name
        mixed = {info.name: GPTQ_RULES[0] for info in task.layers} | {layer: bad}
        with pytest.raises(QenvError) as err:
            gptqmodel_dynamic(task.layers, mixed)
        nearest = nearest_gptqmodel_rule(bad)
        assert layer in str(err.value) and nearest.label() in str(err.value), str(err.value)
        gptqmodel_dynamic(task.layers, mixed | {layer: nearest})  # the suggestion is runnable


def test_gptqmodel_dynamic_matches_intended_modules(task, stories_bin):
    from qenv import load_model

    recipe = Recipe({info.name: GPTQ_RULES[i % len(GPTQ_RULES)] for i, info in enumerate(task.layers)})
    config = gptqmodel_dynamic(task.layers, recipe)
    modules = [name for name, _ in load_model(str(stories_bin)).model.named_modules() if name]
    for pattern, overrides in config["dynamic"].items():
        assert pattern[:2] in ("+:", "-:")
        hits = [m for m in modules if re.match(pattern[2:], m)]
        assert len(hits) == 1, (pattern, hits)
        if pattern.startswith("-:"):
            assert overrides == {} and recipe[hits[0]] == KEEP
    for info in task.layers:
        rule = recipe[info.name]
        got = gptqmodel_rule_for(config, info.name)
        if rule == KEEP:
            assert got is None
            continue
        assert got == {"bits": rule.bits, "group_size": rule.group_size, "sym": rule.symmetric}
    assert config["lm_head"] is False and config["desc_act"] is False


def _kl_of(model, evaluator) -> float:
    kl, count = 0.0, 0
    with torch.inference_mode():
        for ids, ref in zip(evaluator.batches, evaluator.reference.logprobs):
            logprobs = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
            kl += float((ref.exp() * (ref - logprobs)).sum())
            count += ids[:, 1:].numel()
    return kl / count


def test_saved_model_refuses_llama_cpp_types(task, recipe, tmp_path):
    with pytest.raises(QenvError, match="model.gguf"):
        save_quantized_model(task.evaluator, recipe, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def _no_gguf(recipe: Recipe) -> Recipe:
    return Recipe({n: Rule(bits=r.bits, group_size=32) if r.gguf else r for n, r in recipe.items()})


def test_saved_model_reproduces_the_evaluators_kl(task, recipe, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = _no_gguf(recipe)
    ev = task.evaluator
    metrics = ev.evaluate(recipe)
    folder = save_quantized_model(ev, recipe, tmp_path / "q", {"metrics": metrics.to_dict()})
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert Recipe.from_dict(model.config.qenv_recipe["rules"]) == recipe
    assert model.config.qenv_recipe["metrics"]["kl"] == metrics.kl
    assert _kl_of(model, ev) == pytest.approx(metrics.kl, rel=1e-5)
    # the original weights are back in the evaluator's model, and its config has no recipe left
    assert ev.evaluate({}).kl == pytest.approx(0.0, abs=1e-6)
    assert not hasattr(task.loaded.model.config, "qenv_recipe")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "Once upon a time, there was a little girl named Lily."
    assert tokenizer(text)["input_ids"] == task.loaded.tokenizer(text)["input_ids"]


def test_saved_model_folder_is_not_overwritten(task, recipe, tmp_path):
    recipe = _no_gguf(recipe)
    target = tmp_path / "q"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(QenvError, match="not empty"):
        save_quantized_model(task.evaluator, recipe, target)
    assert (target / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary folder left behind
    with pytest.raises(QenvError, match="is not a model saved by qenv"):  # overwrite replaces only a saved model
        save_quantized_model(task.evaluator, recipe, target, overwrite=True)
    assert (target / "keep.txt").read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["q"]
    saved = save_quantized_model(task.evaluator, recipe, tmp_path / "saved")
    (saved / "stale.txt").write_text("from an earlier save")
    save_quantized_model(task.evaluator, recipe, saved, overwrite=True)
    assert not (saved / "stale.txt").exists() and (saved / "model.safetensors").is_file()
