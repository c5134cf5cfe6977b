"""GGUF rules are llama.cpp's own: byte-exact against ``ggml_quantize_chunk`` called directly, charged at
``ggml_row_size``, falling back as llama-quantize falls back, mixed as ``llama_tensor_get_type`` mixes
(checked against llama.cpp's own ``llama_quant_compute_types``), and exported as a .gguf that the real
llama.cpp loads and scores as qenv scored it.

Nothing is mocked: the C library is the ``libggml-base`` / ``libllama`` of the installed llama-cpp-python.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import STORIES_BIN, extended_beyond, require

pytest.importorskip("gguf", reason="the gguf extra (pip install 'qenv[gguf]') is not installed")
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("the gguf extra (llama-cpp-python) is not installed", allow_module_level=True)

from qenv import Evaluator, load_model, tokens_from_model  # noqa: E402
from qenv.errors import QenvError  # noqa: E402
from qenv.models.layers import LayerInfo, get_weight  # noqa: E402
from qenv.quant import gguf as G  # noqa: E402
from qenv.quant.presets import LLAMACPP_PRESETS, MIX_DEFAULT_TYPE, mix_types, preset  # noqa: E402
from qenv.quant.quantizer import gguf_encode, quantize_matrix  # noqa: E402
from qenv.quant.rules import Recipe, Rule, layer_bits  # noqa: E402

LIB_DIR = Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib"


# -- an independent binding: the tests call llama.cpp themselves --------------------------------------------
def _direct_lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(LIB_DIR / "libggml-base.so"))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    return lib


def direct_quantize(w: np.ndarray, type_id: int, imatrix: np.ndarray | None) -> bytes:
    lib = _direct_lib()
    rows, n = w.shape
    src = np.ascontiguousarray(w, dtype=np.float32)
    dst = ctypes.create_string_buffer(int(lib.ggml_row_size(type_id, n)) * rows)
    imat = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    size = lib.ggml_quantize_chunk(type_id, src.ctypes.data, dst, 0, rows, n,
                                   None if imat is None else imat.ctypes.data)
    return dst.raw[:size]


@pytest.fixture(scope="module")
def models():
    require(STORIES_BIN, "stories260K llama2.c checkpoint")
    out = {}
    for spec in (str(STORIES_BIN), "default"):
        lm = load_model(spec)
        tokens = tokens_from_model(lm.model, 256, 64, seed=0)
        out[spec] = Evaluator(lm, tokens, cache_dir=False)
    return out


def test_type_table_is_llama_cpps() -> None:
    lib = _direct_lib()
    for name, (type_id, block, size) in G.GGML_TYPES.items():
        assert lib.ggml_type_name(type_id).decode().upper() == name
        for n in (block, 4 * block, 256 * block):
            assert lib.ggml_row_size(type_id, n) == G.row_bytes(name, n)
    assert G.nominal_bpw("Q4_K") == 4.5 and G.nominal_bpw("Q3_K") == 3.4375 and G.nominal_bpw("IQ4_XS") == 4.25


@pytest.mark.parametrize("spec", ["stories", "default"])
def test_every_menu_type_is_byte_exact_with_ggml_quantize_chunk(models, spec: str) -> None:
    """qenv's bytes, dequantized image and charged bits equal llama.cpp's on real weights."""
    ev = models[str(STORIES_BIN) if spec == "stories" else "default"]
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    picked = {}
    for info in ev.layers:
        picked.setdefault(info.in_features, info)  # one layer per row length (64/172, 128/384)
    assert len(picked) == 2
    for info in picked.values():
        weight = get_weight(ev.model, info).float()
        calib = ev.calibration_of(info.name)
        imatrix = calib.act_rms.square().numpy()
        for qtype, use_imatrix in G.MENU_TYPES:
            rule = Rule(gguf=qtype, imatrix=use_imatrix)
            eff = G.effective_type(qtype, info.in_features)
            got_type, got = gguf_encode(weight, rule, calib)
            assert got_type == eff
            if eff == "F16":
                expected = weight.numpy().astype(np.float16).tobytes()
                assert direct_quantize(weight.numpy(), 1, None) == expected  # ggml's own f16 rows
            else:
                expected = direct_quantize(weight.numpy(), G.GGML_TYPES[eff][0], imatrix if use_imatrix else None)
            assert got.tobytes() == expected, (info.name, rule.label(), eff)
            image = quantize_matrix(weight, rule, calib)
            if eff != "F16":
                ref = dequantize(np.frombuffer(expected, dtype=np.uint8).reshape(info.out_features, -1),
                                 GGMLQuantizationType[eff]).reshape(weight.shape)
                assert torch.equal(image, torch.from_numpy(np.asarray(ref, dtype=np.float32)))
            lib = _direct_lib()
            type_id = 1 if eff == "F16" else G.GGML_TYPES[eff][0]
            assert layer_bits(rule, info.out_features, info.in_features) == \
                8 * info.out_features * lib.ggml_row_size(type_id, info.in_features)


def test_row_fallback_is_llama_quantizes() -> None:
    # stories260K: rows of 64 (attention, gate/up) and 172 (down); default model: 128 and 384
    assert G.effective_type("Q4_K", 64) == "Q5_0" and G.effective_type("Q6_K", 128) == "Q8_0"
    assert G.effective_type("Q3_K", 384) == "Q4_0" and G.effective_type("Q5_K", 128) == "Q5_1"
    assert G.effective_type("IQ3_S", 64) == "IQ4_NL" and G.effective_type("IQ2_XS", 384) == "IQ4_NL"
    assert G.effective_type("Q4_K", 172) == "F16" and G.effective_type("Q8_0", 172) == "F16"
    assert G.effective_type("Q4_K", 512) == "Q4_K"
    # charged as the fallback: Q4_K on 64-wide rows costs Q5_0's 5.5 bpw, on 172-wide rows 16 bpw
    assert layer_bits(Rule(gguf="Q4_K"), 64, 64) == 64 * 64 * 5.5
    assert layer_bits(Rule(gguf="Q4_K"), 64, 172) == 64 * 172 * 16
    assert layer_bits(Rule(gguf="Q4_K"), 8, 512) == 8 * 512 * 4.5


@pytest.mark.parametrize("data, named", [
    ({"gguf": "Q7_K"}, "Q7_K"),
    ({"gguf": "IQ2_XS"}, "importance matrix"),
    ({"bits": 4, "imatrix": True}, "imatrix"),
])
def test_bad_gguf_rules_are_one_clear_line(data: dict, named: str) -> None:
    with pytest.raises(QenvError) as err:
        Rule.from_dict(data)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_gguf_rules_round_trip_as_json() -> None:
    rule = Rule(gguf="iq4_xs", imatrix=True)
    assert rule.gguf == "IQ4_XS" and rule.bits == 4 and rule.needs_calibration and rule.label() == "IQ4_XS-im"
    assert rule.to_dict() == {"gguf": "IQ4_XS", "imatrix": True}
    assert Rule.from_dict(rule.to_dict()) == rule
    assert "gguf" not in Rule(bits=4).to_dict()  # plain rules serialise as before


# -- the mixes, against llama.cpp's own llama_quant_compute_types ----------------------------------------------
class _QParams(ctypes.Structure):
    _fields_ = [("nthread", ctypes.c_int32), ("ftype", ctypes.c_int), ("output_tensor_type", ctypes.c_int),
                ("token_embedding_type", ctypes.c_int), ("allow_requantize", ctypes.c_bool),
                ("quantize_output_tensor", ctypes.c_bool), ("only_copy", ctypes.c_bool), ("pure", ctypes.c_bool),
                ("keep_split", ctypes.c_bool), ("dry_run", ctypes.c_bool), ("imatrix", ctypes.c_void_p),
                ("kv_overrides", ctypes.c_void_p), ("tt_overrides", ctypes.c_void_p),
                ("prune_layers", ctypes.c_void_p), ("max_buf_size", ctypes.c_size_t)]


class _Desc(ctypes.Structure):
    _fields_ = [("architecture", ctypes.c_char_p)] + [(n, ctypes.c_uint32) for n in (
        "n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert", "n_embd_head_k", "n_embd_head_v")]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


#: llama_ftype ids (include/llama.h)
FTYPES = {"Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
          "Q5_K_M": 17, "Q6_K": 18, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XXS": 23, "IQ3_S": 26, "IQ4_XS": 30}


def llama_cpp_types(layers: list[LayerInfo], mix: str, n_head: int, n_head_kv: int, hidden: int, ff: int,
                    n_layer: int) -> dict[str, str]:
    """Types that llama.cpp's own llama_quant_compute_types gives these tensors (no importance matrix)."""
    from qenv.export import gguf_tensor_name

    llama = ctypes.CDLL(str(LIB_DIR / "libllama.so"))
    base = _direct_lib()
    llama.llama_model_quantize_default_params.restype = _QParams
    desc_fn = getattr(llama, "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc")
    desc_fn.restype, desc_fn.argtypes = ctypes.c_void_p, [ctypes.POINTER(_Desc)]
    init = getattr(llama, "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params")
    init.restype, init.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.POINTER(_QParams)]
    compute = getattr(llama, "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem")
    compute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                        ctypes.POINTER(ctypes.c_int), ctypes.c_size_t]
    free = getattr(llama, "_Z16llama_quant_freeP19quantize_state_impl")
    free.argtypes = [ctypes.c_void_p]
    llama.llama_model_free.argtypes = [ctypes.c_void_p]
    base.ggml_init.argtypes, base.ggml_init.restype = [_InitParams], ctypes.c_void_p
    base.ggml_new_tensor_2d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    base.ggml_new_tensor_2d.restype = ctypes.c_void_p
    base.ggml_set_name.argtypes, base.ggml_set_name.restype = [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p
    base.ggml_free.argtypes = [ctypes.c_void_p]

    params = llama.llama_model_quantize_default_params()
    params.ftype = FTYPES[mix]
    desc = _Desc(b"llama", hidden, ff, n_layer, n_head, n_head_kv, 0, hidden // n_head, hidden // n_head)
    model = desc_fn(ctypes.byref(desc))
    qs = init(model, ctypes.byref(params))
    ctx = base.ggml_init(_InitParams(16 << 20, None, True))
    try:
        names = [gguf_tensor_name(info) for info in layers]
        tensors = (ctypes.c_void_p * len(layers))()
        for i, (info, name) in enumerate(zip(layers, names)):
            tensors[i] = base.ggml_new_tensor_2d(ctx, 0, info.in_features, info.out_features)  # F32 source
            base.ggml_set_name(tensors[i], name.encode())
        result = (ctypes.c_int * len(layers))()
        compute(qs, FTYPES[mix], tensors, result, len(layers))
    finally:
        base.ggml_free(ctx)
        free(qs)
        llama.llama_model_free(model)
    by_id = {v[0]: k for k, v in G.GGML_TYPES.items()}
    return {info.name: by_id[int(t)] for info, t in zip(layers, result)}


def _synthetic(n_layer: int, hidden: int, ff: int, n_head: int, n_head_kv: int, head: bool) -> list[LayerInfo]:
    kv = hidden // n_head * n_head_kv
    layers = [LayerInfo("embed", "embed", -1, n_layer, 32000, hidden)]
    for b in range(n_layer):
        for kind, out_f, in_f in (("q", hidden, hidden), ("k", kv, hidden), ("v", kv, hidden), ("o", hidden, hidden),
                                  ("gate", ff, hidden), ("up", ff, hidden), ("down", hidden, ff)):
            layers.append(LayerInfo(f"b{b}.{kind}", kind, b, n_layer, out_f, in_f))
    if head:
        layers.append(LayerInfo("lm_head", "lm_head", n_layer, n_layer, 32000, hidden))
    return layers


@pytest.mark.parametrize("shape", [
    (5, 64, 172, 8, 4, False),  # stories260K
    (6, 128, 384, 4, 2, False),  # the default model
    (32, 4096, 11008, 32, 32, True),  # a Llama-2-7B (untied head)
    (32, 4096, 14336, 32, 8, True),  # a Llama-3-8B (GQA 4)
    (24, 2048, 5632, 32, 4, False),  # a tied GQA-8 model
])
def test_mixes_match_llama_cpps_own_type_choice(shape: tuple) -> None:
    n_layer, hidden, ff, n_head, n_head_kv, head = shape
    layers = _synthetic(n_layer, hidden, ff, n_head, n_head_kv, head)
    for mix in MIX_DEFAULT_TYPE:
        ours = mix_types(layers, mix, imatrix=False, n_gqa=n_head // n_head_kv)
        # llama.cpp applies its row fallback inside llama_tensor_get_type; qenv where the type is used
        ours = {name: G.effective_type(t, info.in_features) for (name, t), info in zip(ours.items(), layers)}
        assert ours == llama_cpp_types(layers, mix, n_head, n_head_kv, hidden, ff, n_layer), mix


def test_mixes_on_real_models_are_presets(models) -> None:
    ev = models["default"]
    assert "q4_k_m" in LLAMACPP_PRESETS and "iq3_xxs-im" in LLAMACPP_PRESETS and "iq3_xxs" not in LLAMACPP_PRESETS
    with pytest.raises(QenvError, match="importance matrix"):
        preset("iq2_xs", ev.layers)  # llama-quantize refuses IQ2_XS without an imatrix
    q4, q3 = preset("q4_k_m", ev.layers), preset("q3_k_m", ev.layers)
    assert all(r.gguf for r in q4.values()) and ev.size(q3)[0] < ev.size(q4)[0]
    with_im = preset("q4_k_m-im", ev.layers)
    assert all(r.imatrix for r in with_im.values()) and not any(r.imatrix for r in q4.values())


# -- the .gguf export, loaded by the real llama.cpp ----------------------------------------------------------
def _llama_cpp_logprobs(path: Path, ids: torch.Tensor, f32_cache: bool = False) -> torch.Tensor:
    """llama.cpp's next-token log-probabilities at every position of every row of ``ids``, computed in a
    child process with repacking off (``qenv.llama_cpp_isolated``: a llama.cpp crash fails this test only).

    ``f32_cache`` stores the KV cache in F32 instead of llama.cpp's default F16 (which also rounds
    the queries and the attention probabilities to F16 before the two attention matmuls).
    """
    from qenv.llama_cpp_isolated import score_gguf

    return torch.log_softmax(torch.from_numpy(score_gguf(path, ids, f32_cache=f32_cache)), -1)


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.slow
@pytest.mark.parametrize("spec, mix", [("stories", "q4_k_m"), ("stories", "iq3_xxs-im"), ("default", "q3_k_m"),
                                       ("default", "q4_k_m-im")])
def test_gguf_export_runs_in_llama_cpp_as_scored(models, tmp_path, spec: str, mix: str) -> None:
    from qenv.export_gguf import gguf_tensor_types, write_gguf

    ev = models[str(STORIES_BIN) if spec == "stories" else "default"]
    recipe = dict(preset(mix, ev.layers))
    first = ev.layers[0].name
    recipe[first] = Rule(gguf="Q8_0")  # a per-tensor override the mix would not choose
    path = write_gguf(ev, recipe, tmp_path / "model.gguf", {"recipe": mix})
    types = gguf_tensor_types(path)
    assert types["blk.0.attn_q.weight"] == "Q8_0"
    for info in ev.layers:  # every tensor has the type qenv scored (after llama.cpp's row fallback)
        from qenv.export import gguf_tensor_name

        assert types[gguf_tensor_name(info)] == G.effective_type(recipe[info.name].gguf, info.in_features)
    ids = ev.batches[0]
    ref = _llama_cpp_logprobs(path, ids)  # llama.cpp as deployed: F16 KV cache
    ref_f32 = _llama_cpp_logprobs(path, ids, f32_cache=True)
    with ev.weights.applied(recipe), torch.inference_mode():
        ours = torch.log_softmax(ev.model(input_ids=ids).logits.float(), -1)
    with torch.inference_mode():
        fp = torch.log_softmax(ev.model(input_ids=ids).logits.float(), -1)
    # qenv scores the weights and the matmuls as llama.cpp computes them (activations rounded to Q8_0 /
    # Q8_1 / Q8_K / F16, Q8_1's fp16 block sums) but attention in float32, so the pointwise bar is taken
    # against llama.cpp with an F32 KV cache. What remains is float noise that flips 8-bit activation
    # roundings: qenv against itself with a 1e-6 relative perturbation before each quantized matmul
    # differs by KL ~1e-3 on the default model, the size of this residual (measured 6e-4 to 8e-4).
    assert _kl(ours, ref_f32) <= 1e-3, _kl(ours, ref_f32)
    # llama.cpp's default F16 KV cache adds ~1e-3 pointwise (KL 2e-3 on the default model), not modelled
    # by qenv; the KL to the full-precision model is still the same number
    kl_qenv, kl_llama = _kl(fp, ours), _kl(fp, ref)
    assert abs(kl_qenv - kl_llama) <= 0.05 * kl_llama + 2e-4, (kl_qenv, kl_llama)


@pytest.mark.parametrize("qtype", extended_beyond(["Q4_1", "Q5_1"], ["Q4_1"]))  # Q5_1: --run-slow
def test_q8_1_block_sums_are_llama_cpps(models, tmp_path, qtype: str) -> None:
    """Q4_1 / Q5_1 matmuls add each block minimum times llama.cpp's fp16 activation block sum: at the first
    position (no attention mixing) qenv and llama.cpp agree to float noise (4e-3 with the float sum)."""
    from qenv.export_gguf import write_gguf

    ev = models["default"]
    recipe = {info.name: Rule(gguf=qtype) for info in ev.layers}
    ids = ev.batches[0]
    path = write_gguf(ev, recipe, tmp_path / "q.gguf")
    ref = _llama_cpp_logprobs(path, ids[:, :8], f32_cache=True)
    with ev.weights.applied(recipe), torch.inference_mode():
        ours = torch.log_softmax(ev.model(input_ids=ids[:, :8]).logits.float(), -1)
    assert _kl(ours[:, :1], ref[:, :1]) < 1e-5, _kl(ours[:, :1], ref[:, :1])


def test_fp16_gguf_export_matches_the_model(models, tmp_path) -> None:
    """The file layout (names, rope permutation, norms, vocabulary) is right: kept layers agree to float noise."""
    from qenv.export_gguf import write_gguf

    ev = models["default"]
    path = write_gguf(ev, {}, tmp_path / "fp16.gguf")
    ids = ev.batches[0][:2]
    with torch.inference_mode():
        fp = torch.log_softmax(ev.model(input_ids=ids).logits.float(), -1)
    assert _kl(fp, _llama_cpp_logprobs(path, ids)) < 1e-4


@pytest.mark.parametrize("spec", ["stories", "default"])
def test_gguf_vocabulary_tokenizes_as_the_model_does(models, tmp_path, spec: str) -> None:
    """llama.cpp reading the written vocabulary (sentencepiece -> "llama", byte-level BPE -> "gpt2")
    gives the model's own token ids on real text, special tokens included."""
    from conftest import TINYSTORIES, WIKITEXT_TEST
    from qenv.export_gguf import write_gguf
    from qenv.llama_cpp_isolated import tokenize_gguf

    text_file = TINYSTORIES if spec == "stories" else WIKITEXT_TEST
    require(text_file, "real text")
    ev = models[str(STORIES_BIN) if spec == "stories" else "default"]
    path = write_gguf(ev, {}, tmp_path / "v.gguf")
    # sentencepiece strips trailing whitespace (remove_extra_whitespaces), llama.cpp's SPM tokenizer does not
    text = text_file.read_text(encoding="utf-8")[:6000].rstrip()
    theirs = tokenize_gguf(path, text)
    ours = ev.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert theirs["ids"] == ours
    assert theirs["bos"] == ev.loaded.tokenizer.bos_token_id


def test_gguf_export_refuses_what_llama_cpp_cannot_run(models, tmp_path) -> None:
    from qenv.export_gguf import gguf_tensor_types, write_gguf

    ev = models["default"]
    recipe = dict(preset("q4_k_m", ev.layers))
    bad = ev.layers[3].name
    recipe[bad] = Rule(bits=3, group_size=128, rounding="gptq")
    with pytest.raises(QenvError) as err:
        write_gguf(ev, recipe, tmp_path / "x.gguf")
    assert bad in str(err.value) and "menu='gguf'" in str(err.value)
    assert not any(tmp_path.iterdir())  # nothing half-written
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(QenvError, match="not a readable .gguf"):
        gguf_tensor_types(corrupt)


def test_gguf_export_refuses_other_architectures(tmp_path) -> None:
    from qenv.export_gguf import write_gguf

    lm = load_model("tiny-gpt2")
    ev = Evaluator(lm, tokens_from_model(lm.model, 64, 16, seed=0), cache_dir=False)
    with pytest.raises(QenvError, match="Llama-architecture"):
        write_gguf(ev, {}, tmp_path / "x.gguf")


def test_missing_extra_is_one_line(tmp_path) -> None:
    """Without llama-cpp-python a GGUF rule fails with one line naming the extra (run in a fresh process
    where importing llama_cpp is impossible)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['llama_cpp'] = None\n"
            "import torch, qenv\n"
            "try:\n"
            "    qenv.quantize_matrix(torch.ones(4, 256), qenv.Rule(gguf='Q4_K'))\n"
            "except qenv.QenvError as e:\n"
            "    print(e)\n")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo,
                         env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"}, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and "qenv[gguf]" in lines[0], out.stdout + out.stderr


# -- foldable AWQ ------------------------------------------------------------------------------------------------
def test_unfoldable_awq_scales_are_charged(models) -> None:
    from qenv.quant.accounting import input_groups, recipe_bits, unfoldable_scales

    ev = models["default"]
    layers = ev.layers
    groups = input_groups(layers)
    q, k, v = (f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert groups[q] == (q, k, v) and groups["model.layers.0.mlp.up_proj"] == (
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    plain, awq = Rule(bits=4, group_size=32), Rule(bits=4, group_size=32, act_scale=0.5)
    shared = {i.name: awq for i in layers}
    assert unfoldable_scales(layers, shared) == []
    mixed = dict(shared) | {k: plain}
    assert sorted(unfoldable_scales(layers, mixed)) == sorted([q, v])
    # q and v need their own per-channel multiply: 16 bits per input channel each
    assert recipe_bits(layers, mixed) - recipe_bits(layers, shared) == 2 * 16 * 128
    assert unfoldable_scales(layers, dict(shared) | {k: Rule(bits=16)}) == []  # a kept layer takes any scale


def test_env_makes_shared_inputs_share_one_awq_scale(stories_bin, tmp_path) -> None:
    import gymnasium as gym

    from qenv.envs.spaces import DEFAULT_MENU
    from qenv.quant.accounting import unfoldable_scales

    env = gym.make("QuantLLM-v0", model=str(stories_bin), n_tokens=256, seq_len=64, budget_bpw=8.0,
                   cache_dir=str(tmp_path)).unwrapped
    awq = next(i for i, r in enumerate(DEFAULT_MENU) if r.act_scale > 0 and r.bits == 4)
    plain = next(i for i, r in enumerate(DEFAULT_MENU) if r.act_scale == 0 and r.bits == 4)
    env.reset(seed=0)
    inherited = []
    for i in range(len(env.task.layers)):
        _, _, done, _, info = env.step(awq if i % 2 == 0 else plain)  # alternate: q AWQ, k plain, v AWQ, ...
        inherited.append(info["act_scale_inherited"])
    recipe = recipe_of_info(info)
    assert any(inherited) and unfoldable_scales(env.task.layers, recipe) == []
    assert info["act_scales_inherited"] == sum(inherited)
    k = recipe["model.layers.0.self_attn.k_proj"]
    assert k.act_scale == recipe["model.layers.0.self_attn.q_proj"].act_scale > 0 and not k.mse_clip


def recipe_of_info(info: dict) -> Recipe:
    return Recipe({n: Rule.from_dict(r) for n, r in info["recipe_rules"].items()})


@pytest.mark.parametrize("kind", ["discrete", "multidiscrete", "continuous"])
def test_env_on_the_gguf_menu(stories_bin, tmp_path, kind: str) -> None:
    """Every action kind acts over llama.cpp's types; info names the row fallback, bits are llama.cpp's."""
    import gymnasium as gym

    from qenv.envs.spaces import GGUF_MENU

    env = gym.make("QuantLLM-v0", model=str(stories_bin), menu="gguf", action_kind=kind, budget_bpw=7.6,
                   n_tokens=256, seq_len=64, cache_dir=str(tmp_path), render_mode="ansi").unwrapped
    assert all(r.gguf for r in env.mapper.rules) and (kind != "discrete" or env.mapper.rules == GGUF_MENU)
    env.reset(seed=0)
    env.action_space.seed(0)
    done = False
    while not done:
        _, _, done, _, info = env.step(env.action_space.sample())
    recipe = recipe_of_info(info)
    assert info["budget_met"] and info["bpw"] == pytest.approx(env.task.evaluator.size(recipe)[0])
    down = "model.layers.0.mlp.down_proj"  # 172-wide rows: every type falls back to F16
    assert info["fallback"][down].endswith("->F16") and "->F16" in info["table"]


class _TensorOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("type", ctypes.c_int)]


def _run_llama_quantize(command: str, source: Path, target: Path) -> None:
    """What ``llama-quantize`` does with the script's flags: its library call ``llama_model_quantize``
    (the tool parses the flags into these same params; names are lower-cased as the tool does)."""
    import shlex

    args = shlex.split(command)
    assert args[0] == "llama-quantize"
    llama = ctypes.CDLL(str(LIB_DIR / "libllama.so"))
    llama.llama_model_quantize_default_params.restype = _QParams
    llama.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_QParams)]
    llama.llama_model_quantize.restype = ctypes.c_uint32
    params = llama.llama_model_quantize_default_params()
    params.nthread = 1
    overrides = []
    rest = args[1:]
    i = 0
    positional = []
    while i < len(rest):
        flag = rest[i]
        if flag == "--pure":
            params.pure = True
        elif flag in ("--token-embedding-type", "--output-tensor-type"):
            type_id = G.GGML_TYPES[rest[i + 1].upper()][0]
            setattr(params, "token_embedding_type" if flag.startswith("--token") else "output_tensor_type", type_id)
            i += 1
        elif flag == "--tensor-type":
            name, qtype = rest[i + 1].split("=")
            overrides.append((name.lower().encode(), G.GGML_TYPES[qtype.upper()][0]))
            i += 1
        elif flag.startswith("--"):
            raise AssertionError(f"unexpected flag {flag}")
        else:
            positional.append(flag)
        i += 1
    table = (_TensorOverride * (len(overrides) + 1))(*[_TensorOverride(p, t) for p, t in overrides],
                                                     _TensorOverride(None, 0))
    params.tt_overrides = ctypes.cast(table, ctypes.c_void_p)
    params.ftype = FTYPES[positional[-1]] if positional[-1] in FTYPES else {"Q8_0": 7, "Q4_0": 2, "Q5_0": 8,
                                                                           "Q5_1": 9, "IQ4_NL": 25}[positional[-1]]
    assert llama.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) == 0


@pytest.mark.slow
def test_llamacpp_quantize_script_gives_exactly_the_measured_model(models, tmp_path) -> None:
    """llamacpp-quantize.sh's flags (--pure, every tensor named, f16 embedding/output), run by llama.cpp's own
    quantizer on an f16 .gguf of the model, give the same bytes as qenv's model.gguf of the recipe.
    The default model's weights are float16 values, so its f16 file loses nothing."""
    from gguf import GGUFReader

    from qenv.export import llamacpp_overrides
    from qenv.export_gguf import write_gguf

    ev = models["default"]
    recipe = dict(preset("q3_k_m", ev.layers))
    recipe[ev.layers[0].name] = Rule(gguf="Q8_0")
    recipe[ev.layers[1].name] = Rule(gguf="Q4_K")  # an override equal to what the mix would give elsewhere
    ours = write_gguf(ev, recipe, tmp_path / "qenv.gguf")
    source = write_gguf(ev, {}, tmp_path / "f16.gguf")
    command = llamacpp_overrides(ev.layers, recipe).command()
    _run_llama_quantize(command, source, tmp_path / "llama.gguf")
    a = {t.name: t for t in GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in GGUFReader(str(tmp_path / "llama.gguf")).tensors}
    assert set(a) == set(b)
    assert a["blk.0.attn_q.weight"].tensor_type.name == "Q8_0" and a["blk.1.ffn_down.weight"].tensor_type.name != "F16"
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert bytes(a[name].data.tobytes()) == bytes(b[name].data.tobytes()), name


@pytest.mark.slow
def test_programs_search_the_gguf_menu_and_export_model_gguf(stories_bin, tmp_path, capsys) -> None:
    """train_agent on menu=gguf, then eval_agent --export writes a model.gguf that llama.cpp loads with the
    recipe's types; --save-model of such a recipe is refused before anything is written."""
    from conftest import load_script, run_main

    from qenv.export import gguf_tensor_name
    from qenv.export_gguf import gguf_tensor_types

    train_agent, eval_agent = load_script("train_agent"), load_script("eval_agent")
    common = ["--env-kwargs", "menu=gguf", "n_tokens=256", "seq_len=64"]
    assert run_main(train_agent, ["--agent", "greedy", "--model", stories_bin, "--budget-bpw", 7.6, "--name", "g",
                                  "--logdir", tmp_path, "--no-progress", *common]) == 0
    policy = tmp_path / "g" / "model.json"
    assert run_main(eval_agent, ["--policy", policy, "--searchers", "none", "--export", "--out", tmp_path / "e"]) == 0
    folder = next((tmp_path / "e" / "export").iterdir())
    recipe = Recipe.load(folder / "recipe.json")
    types = gguf_tensor_types(folder / "model.gguf")
    lm = load_model(str(stories_bin))
    for info in lm.layers:
        assert types[gguf_tensor_name(info)] == G.effective_type(recipe[info.name].gguf, info.in_features)
    capsys.readouterr()
    assert run_main(eval_agent, ["--policy", policy, "--searchers", "none", "--save-model", tmp_path / "sm",
                                 "--out", tmp_path / "e2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.gguf" in err[0]
    assert not (tmp_path / "sm").exists() and not (tmp_path / "e2").exists()


def test_the_gguf_menu_holds_every_rule_of_llamacpps_mixes(stories_bin) -> None:
    """Issue 24 item 5: every (type, importance matrix) rule a llama.cpp mix puts on a layer is on
    ``menu="gguf"``, so a search there can return the mix itself (q4_k_m-im's Q6_K with the matrix
    was missing, and the searched recipe lost to the mix on stories260K)."""
    from qenv.envs.spaces import GGUF_MENU

    for spec in (str(stories_bin), "default"):
        layers = load_model(spec, device="cpu").layers
        for mix in LLAMACPP_PRESETS:
            missing = {r.label() for r in preset(mix, layers).values() if r not in GGUF_MENU}
            assert not missing, (spec, mix, missing)
    assert len(GGUF_MENU) == G.OLD_MENU_SIZE + 1 and Rule(gguf="Q6_K", imatrix=True) in GGUF_MENU


@pytest.mark.slow  # extended tier: two gguf-menu envs and a PPO agent
def test_a_discrete_policy_of_the_old_gguf_menu_gets_one_line(stories_bin, tmp_path) -> None:
    """A discrete agent trained on the 18-rule gguf menu (before Q6_K with the importance matrix joined)
    is refused with one line that says so, not SB3's space mismatch."""
    from qenv.agents import load_agent, make_agent
    from qenv.envs.quant_llm import QuantLLMEnv
    from qenv.envs.spaces import GGUF_MENU

    old = [r.to_dict() for r in GGUF_MENU if r != Rule(gguf="Q6_K", imatrix=True)]
    kw = {"budget_bpw": 7.6, "n_tokens": 128, "seq_len": 64, "device": "cpu", "cache_dir": str(tmp_path / "c")}
    path = make_agent("ppo", QuantLLMEnv(str(stories_bin), menu=old, **kw), seed=0, n_steps=64,
                      batch_size=32).save(tmp_path / "old")
    with pytest.raises(QenvError, match="before Q6_K with the importance matrix") as err:
        load_agent("ppo", path, env=QuantLLMEnv(str(stories_bin), menu="gguf", **kw))
    assert "\n" not in str(err.value)
