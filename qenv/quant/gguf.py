"""llama.cpp's own quantization: GGUF types quantized by ``ggml_quantize_chunk`` from llama.cpp's C code.

qenv's GGUF rules (``Rule(gguf="Q4_K")``) are not imitations of llama.cpp's formats: the weights
are quantized by the ``ggml_quantize_chunk`` of the ``libggml-base`` that ``llama-cpp-python``
ships (through ctypes), dequantized back by the ``gguf`` package's ``gguf.quants.dequantize``,
and charged at llama.cpp's exact bytes (``ggml_row_size``: ``type_size * n_per_row / block_size``
per row). What the environment scores is therefore what ``llama-quantize`` writes and what
llama.cpp runs.

Row lengths a type cannot hold are handled as ``llama-quantize`` (llama.cpp b-series of
llama-cpp-python 0.3.36, ``tensor_type_fallback`` in ``src/llama-quant.cpp``) handles them: a
256-wide type on a row that is not a multiple of 256 falls back (IQ2/IQ3/IQ4_XS -> IQ4_NL,
Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), and a type whose block still does not
divide the row becomes F16. :func:`effective_type` is that rule; the fallback type is the one
quantized, scored and charged.

The importance matrix is what ``llama-imatrix`` computes for a tensor: the mean over calibration
tokens of each input column's squared activation (``sum x_j^2 / count``), i.e. ``act_rms**2``.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np

from qenv.errors import QenvError

#: the optional dependencies of GGUF rules and exports (``pip install 'qenv[gguf]'``)
EXTRA_FIX = "install the gguf extra: pip install 'qenv[gguf]' (llama-cpp-python and gguf)."

#: ggml type id, block size (weights) and block bytes of every type qenv handles (llama.cpp's
#: ``ggml_type`` enum and ``type_traits``; a test checks them against ``ggml_row_size``)
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4), "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34),
    "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
    "IQ2_XXS": (16, 256, 66), "IQ2_XS": (17, 256, 74), "IQ3_XXS": (18, 256, 98), "IQ1_S": (19, 256, 50),
    "IQ4_NL": (20, 32, 18), "IQ3_S": (21, 256, 110), "IQ2_S": (22, 256, 82), "IQ4_XS": (23, 256, 136),
    "IQ1_M": (29, 256, 56),
}
#: types a GGUF rule may name, with the nominal bit width reported as ``Rule.bits``
RULE_TYPES: dict[str, int] = {
    "Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8,
    "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5,
    "IQ4_XS": 4, "IQ4_NL": 4, "IQ3_S": 3, "IQ3_XXS": 3, "IQ2_S": 2, "IQ2_XS": 2, "IQ2_XXS": 2,
}
#: types llama-quantize refuses to write without an importance matrix (``tensor_requires_imatrix``;
#: ggml itself aborts on IQ2_XXS, IQ2_XS and IQ1 without one)
REQUIRES_IMATRIX: frozenset[str] = frozenset({"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"})
#: llama-quantize's ``tensor_type_fallback`` for rows that are not a multiple of the type's block
FALLBACK: dict[str, str] = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}
#: the types of the env's ``menu="gguf"``: every (type, importance matrix) pair that llama.cpp's own
#: mixes (:data:`qenv.quant.presets.LLAMACPP_PRESETS`) put on a layer, so that a search can return the
#: human mix itself (issue 24 item 5). ``("Q6_K", True)`` (q4_k_m-im, q5_k_m-im and q6_k-im put Q6_K
#: with the importance matrix on some layers) joined in issue 24; the menu had 18 rules before
MENU_TYPES: tuple[tuple[str, bool], ...] = (
    ("IQ2_XS", True), ("IQ2_S", True), ("Q2_K", False), ("Q2_K", True), ("IQ3_XXS", True), ("IQ3_S", False),
    ("IQ3_S", True), ("Q3_K", False), ("Q3_K", True), ("IQ4_XS", False), ("IQ4_XS", True), ("IQ4_NL", True),
    ("Q4_K", False), ("Q4_K", True), ("Q5_K", False), ("Q5_K", True), ("Q6_K", False), ("Q6_K", True),
    ("Q8_0", False),
)
#: the size of ``menu="gguf"`` before ``("Q6_K", True)`` joined: a discrete policy with this many
#: actions on the gguf menu was trained on the old menu
OLD_MENU_SIZE = 18


def check_type(name: str) -> str:
    """The canonical (upper-case) name of a GGUF rule type, or a clear error."""
    key = str(name).upper()
    if key not in RULE_TYPES:
        raise QenvError(f"Unknown llama.cpp type {name!r} for a GGUF rule.",
                        f"use one of {', '.join(RULE_TYPES)}.")
    return key


def effective_type(name: str, n_per_row: int) -> str:
    """The type llama-quantize actually writes for rows of ``n_per_row`` weights (``tensor_type_fallback``)."""
    _, block, _ = GGML_TYPES[name]
    if n_per_row % block == 0:
        return name
    target = FALLBACK.get(name, name)
    if n_per_row % GGML_TYPES[target][1] != 0:
        return "F16"
    return target


def row_bytes(name: str, n_per_row: int) -> int:
    """``ggml_row_size(type, n_per_row)``: bytes of one row stored as ``name``."""
    _, block, size = GGML_TYPES[name]
    if n_per_row % block:
        raise QenvError(f"Rows of {n_per_row} weights cannot be stored as {name} (blocks of {block}).")
    return size * n_per_row // block


def tensor_bits(name: str, out_features: int, in_features: int) -> int:
    """Exact storage bits of an ``[out, in]`` matrix under GGUF type ``name`` after llama.cpp's fallback."""
    return 8 * out_features * row_bytes(effective_type(name, in_features), in_features)


# -- the C library ----------------------------------------------------------------------------------------
_LIB: ctypes.CDLL | None = None


def library_path() -> Path:
    """``llama_cpp/lib/libggml-base.so`` of the installed llama-cpp-python (found without importing it)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise QenvError("GGUF rules need llama.cpp's quantizer (llama-cpp-python), which is not installed.",
                        EXTRA_FIX)
    folder = Path(spec.origin).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (folder / name).is_file():
            return folder / name
    raise QenvError(f"llama-cpp-python is installed but {folder} holds no libggml-base library.", EXTRA_FIX)


def ggml() -> ctypes.CDLL:
    """The loaded ``libggml-base`` with the prototypes qenv calls."""
    global _LIB
    if _LIB is None:
        lib = ctypes.CDLL(str(library_path()))
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.POINTER(ctypes.c_float)]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_type_name.argtypes = [ctypes.c_int]
        lib.ggml_type_name.restype = ctypes.c_char_p
        lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        lib.ggml_validate_row_data.restype = ctypes.c_bool
        _LIB = lib
    return _LIB


def gguf_quants():
    """The ``gguf`` package's ``quants`` module (dequantization), or the extra's one-line error."""
    try:
        import gguf.quants
    except ImportError:
        raise QenvError("GGUF rules need the gguf package, which is not installed.", EXTRA_FIX) from None
    return gguf.quants


def quantize_rows(w: np.ndarray, name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's bytes of ``w`` (``[rows, n_per_row]`` float32) as type ``name``: ``[rows, row_bytes]`` uint8.

    ``imatrix`` (``[n_per_row]`` float32) is passed to ``ggml_quantize_chunk`` as llama-quantize
    passes a tensor's importance matrix. F16 rows are stored as IEEE half floats.
    """
    rows, n = w.shape
    if name == "F16":
        return np.ascontiguousarray(w, dtype=np.float32).astype(np.float16).view(np.uint8).reshape(rows, 2 * n)
    type_id, block, _ = GGML_TYPES[name]
    if n % block:
        raise QenvError(f"Rows of {n} weights cannot be quantized as {name} (blocks of {block}).",
                        "quantize through effective_type(), which applies llama.cpp's fallback.")
    lib = ggml()
    if lib.ggml_quantize_requires_imatrix(type_id) and imatrix is None:
        raise QenvError(f"llama.cpp type {name} needs an importance matrix.", "use the rule with imatrix=True.")
    src = np.ascontiguousarray(w, dtype=np.float32)
    width = row_bytes(name, n)
    if int(lib.ggml_row_size(type_id, n)) != width:  # the table above disagrees with this libggml
        raise QenvError(f"libggml at {library_path()} stores {name} differently from qenv's table.", EXTRA_FIX)
    dst = np.zeros((rows, width), dtype=np.uint8)
    imat = None
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imat.shape != (n,):
            raise QenvError(f"The importance matrix has shape {imat.shape}, expected ({n},).")
        imat = imat.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    written = lib.ggml_quantize_chunk(type_id, src.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                      dst.ctypes.data, 0, rows, n, imat)
    if written != dst.nbytes or not lib.ggml_validate_row_data(type_id, dst.ctypes.data, dst.nbytes):
        raise QenvError(f"llama.cpp's {name} quantization produced invalid data.",
                        "check that the weights are finite.")
    return dst


def dequantize_rows(data: np.ndarray, name: str, n_per_row: int) -> np.ndarray:
    """Float32 ``[rows, n_per_row]`` values of llama.cpp bytes (``gguf.quants.dequantize``)."""
    if name == "F16":
        return data.view(np.float16).astype(np.float32).reshape(-1, n_per_row)
    from gguf import GGMLQuantizationType

    out = gguf_quants().dequantize(np.ascontiguousarray(data), GGMLQuantizationType[name])
    return np.asarray(out, dtype=np.float32).reshape(-1, n_per_row)


def imatrix_from_rms(act_rms: "object") -> np.ndarray:
    """llama-imatrix's value per input column (``sum x_j^2 / count``) from qenv's ``act_rms`` (``sqrt`` of it)."""
    import torch

    rms = act_rms if isinstance(act_rms, torch.Tensor) else torch.as_tensor(act_rms)
    return rms.detach().float().cpu().square().numpy().astype(np.float32)


def nominal_bpw(name: str) -> float:
    """Bits per weight of a type on rows it holds (e.g. 4.5 for Q4_K)."""
    _, block, size = GGML_TYPES[name]
    return 8 * size / block


__all__ = [
    "EXTRA_FIX", "FALLBACK", "GGML_TYPES", "MENU_TYPES", "REQUIRES_IMATRIX", "RULE_TYPES", "check_type",
    "dequantize_rows", "effective_type", "ggml", "imatrix_from_rms", "library_path", "nominal_bpw",
    "quantize_rows", "row_bytes", "tensor_bits", "block_mins", "q8_1_sum_error",
]


# -- activations, as llama.cpp's CPU backend rounds them -------------------------------------------------
#: the type llama.cpp's CPU matmul converts activations to for each weight type (``vec_dot_type``)
VEC_DOT_TYPE: dict[str, str] = {
    "F16": "F16", "Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "IQ4_NL": "Q8_0", "Q4_1": "Q8_1", "Q5_1": "Q8_1",
    **{t: "Q8_K" for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
                           "IQ4_XS", "IQ1_S", "IQ1_M")},
}


def round_activations(x: "torch.Tensor", vec_dot_type: str) -> "torch.Tensor":
    """The activations a llama.cpp CPU matmul really multiplies: ``x`` rounded to ``vec_dot_type``.

    llama.cpp does not multiply quantized weights by float activations: it first quantizes each
    activation row to 8 bits (Q8_0 / Q8_1: blocks of 32 with an fp16 scale ``amax / 127``; Q8_K:
    blocks of 256 with a float scale ``-max / 127`` of the signed largest value) or rounds it to fp16
    for F16 weights. Scoring a GGUF rule with the same rounding makes qenv's numbers the numbers
    llama.cpp computes (``quantize_row_q8_0`` rounds half to even on AVX2; ``quantize_row_q8_K_ref``
    with ``nearest_int``, also half to even).
    """
    import torch

    if vec_dot_type == "F16":
        return x.half().to(x.dtype)
    shape = x.shape
    block = 256 if vec_dot_type == "Q8_K" else 32
    v = x.float().reshape(-1, shape[-1] // block, block)
    if vec_dot_type == "Q8_K":
        idx = v.abs().argmax(dim=-1, keepdim=True)
        vmax = torch.gather(v, -1, idx)
        iscale = torch.where(vmax != 0, -127.0 / vmax, torch.zeros_like(vmax))
        q = torch.round(iscale * v).clamp(max=127.0)
        d = torch.where(vmax != 0, 1.0 / iscale, torch.zeros_like(vmax))
        out = q * d
    else:
        amax = v.abs().amax(dim=-1, keepdim=True)
        d = (amax / 127.0).half().float()
        inv = torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
        out = torch.round(v * inv) * d
    return out.reshape(shape).to(x.dtype)


def block_mins(data: np.ndarray, name: str) -> np.ndarray:
    """The fp16 minimum ``m`` of every block of Q4_1 / Q5_1 rows (``[rows, row_bytes]`` bytes) as float32
    ``[rows, n_blocks]`` (each block starts with its fp16 scale ``d`` and then ``m``)."""
    if name not in ("Q4_1", "Q5_1"):
        raise QenvError(f"{name} blocks have no minimum; only Q4_1 and Q5_1 do.")
    _, _, size = GGML_TYPES[name]
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(rows, -1, size)
    return np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16)[..., 0].astype(np.float32)


def q8_1_sum_error(x: "torch.Tensor") -> "torch.Tensor":
    """Per block of 32 inputs, llama.cpp's Q8_1 block sum ``s`` minus the sum of the rounded activations.

    A Q4_1 / Q5_1 weight is ``d*q + m``; llama.cpp's ``vec_dot_q{4,5}_1_q8_1`` adds each block's
    ``m`` times the activation block's stored sum ``s = fp16(d_x * sum(q_x))`` (``quantize_row_q8_1``,
    with ``d_x = amax / 127`` in float32), not times the sum of the rounded activations
    ``fp16(d_x) * sum(q_x)`` that a float matmul of the rounded input computes. The two differ by
    fp16 rounding only, but the difference enters every output through the block minimum and does
    not average out: without it, an all-Q5_1 default model drifts from llama.cpp by KL 4e-3 at the
    first position. The result (``[..., n_blocks]``) times the blocks' minimums is the correction.
    """
    import torch

    v = x.float().reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = v.abs().amax(dim=-1)
    d = amax / 127.0
    inv = torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
    sq = torch.round(v * inv.unsqueeze(-1)).sum(-1)
    return (d * sq).half().float() - d.half().float() * sq
