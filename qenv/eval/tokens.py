"""Token sets: the text a quantized model is judged on.

Tokens come from text files, or are sampled from the full-precision model itself with a fixed
seed, so that any model can be evaluated with no dataset at all.

Documents. A corpus such as TinyStories joins its documents with the separator ``<|endoftext|>``
(:data:`DOCUMENT_SEPARATORS`). The separator is markup, not text: read literally it becomes a dozen
tokens the model never saw in training, which inflates every KL measured on them. So wherever qenv
turns text into tokens (:func:`tokens_from_text`, used by the env, ``eval_agent.py`` and
``bench/``), text that contains a separator is split into documents, and each document is
tokenised as the model's own tokenizer frames one text (``add_special_tokens=True``): for llama2.c models and the embedded model that is BOS
at the start of every document, as they were trained; a tokenizer that adds BOS/EOS adds both. A
tokenizer that adds no special tokens itself (GPT-2 style) gets its EOS token between documents, the
boundary it was trained with. Text with no separator (WikiText) is running text, tokenised as is.

Calibration and validation. A search fits recipes on calibration tokens; :func:`split_tokens`
holds back a seeded quarter of those sequences (:data:`VALIDATION_FRACTION`) on which it picks its
final recipe, so the pick is not the recipe that best fits the tokens it was tuned on. Held-out
text (``eval_agent.py --data``) is a third set, never calibration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qenv.errors import QenvError


@dataclass(frozen=True)
class TokenSet:
    """``ids`` is ``[n_sequences, seq_len]``; every position but the last predicts the next token."""

    ids: torch.Tensor
    source: str

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha1(self.ids.cpu().numpy().tobytes())
        digest.update(str(tuple(self.ids.shape)).encode())
        return digest.hexdigest()[:16]

    @property
    def n_tokens(self) -> int:
        return self.ids.numel()

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        return list(torch.split(self.ids, batch_size))


def _check_sizes(n_tokens: int, seq_len: int) -> int:
    if seq_len < 2:
        raise QenvError(f"seq_len={seq_len} is too short.", "use a sequence length of at least 2 tokens.")
    if n_tokens < seq_len:
        raise QenvError(f"n_tokens={n_tokens} is smaller than seq_len={seq_len}.", "ask for at least one sequence.")
    return n_tokens // seq_len


#: bytes read from a text file at a time; a text file is only read as far as its tokens are needed
TEXT_CHUNK_BYTES = 1 << 20
#: how far into a file the binary check (a NUL byte) looks
BINARY_PROBE_BYTES = 1 << 20


def _is_byte_encoding(encoding: str) -> bool:
    return encoding.replace("-", "").replace("_", "").lower() in ("utf8", "ascii", "latin1", "iso88591", "cp1252")


class TextStream:
    """The text of one or more files, joined by newlines, decoded as it is read: :meth:`read` reads
    only as many bytes as the characters asked for need (a 2 GB corpus read for 256 tokens costs a
    few MB). Binary files (a NUL byte in the first MiB) and bytes invalid in ``encoding`` are refused
    with one clear error naming the file and the offset."""

    def __init__(self, paths: Sequence[Path], encoding: str = "utf-8") -> None:
        import codecs

        try:
            self._decoder_factory = codecs.getincrementaldecoder(encoding)
        except LookupError:
            raise QenvError(f"Unknown text encoding {encoding!r}.", "use e.g. utf-8 or latin-1.") from None
        self.paths = list(paths)
        self.encoding = encoding
        self.text = ""  # what has been read so far
        self.done = False  # every file read to its end
        self._index = -1
        self._handle = None
        self._decoder = None
        self._offset = 0

    def _open_next(self) -> bool:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._index += 1
        if self._index >= len(self.paths):
            self.done = True
            return False
        if self._index > 0:
            self.text += "\n"
        self._handle = open(self.paths[self._index], "rb")  # noqa: SIM115 (closed when read through)
        self._decoder = self._decoder_factory()
        self._offset = 0
        return True

    def _read_chunk(self) -> None:
        if self._handle is None and not self._open_next():
            return
        path = self.paths[self._index]
        data = self._handle.read(TEXT_CHUNK_BYTES)
        if self._offset < BINARY_PROBE_BYTES and _is_byte_encoding(self.encoding) and b"\x00" in data:
            at = self._offset + data.index(b"\x00")
            if at < BINARY_PROBE_BYTES:
                self.close()
                raise QenvError(f"Text file {path} is a binary file, not text (a NUL byte at offset {at}).",
                                "pass a plain-text file (e.g. a .txt of the corpus), not a model, archive or binary "
                                "dump.")
        pending = self._decoder.getstate()[0]
        try:
            self.text += self._decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            buffer = pending + data
            at = self._offset - len(pending) + exc.start
            self.close()
            raise QenvError(f"Text file {path} is not valid {self.encoding} text (byte 0x{buffer[exc.start]:02x} at "
                            f"offset {at} cannot be decoded).",
                            f"convert it, e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}, "
                            "or pass a UTF-8 text file.") from None
        self._offset += len(data)
        if not data:
            self._open_next()

    def read(self, chars: int) -> str:
        """The first ``chars`` characters (all of the text when it is shorter)."""
        while len(self.text) < chars and not self.done:
            self._read_chunk()
        return self.text[:chars]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_text_file(path: str | Path, encoding: str = "utf-8") -> str:
    """The whole text of ``path``, refusing what is not text: a binary file (NUL bytes) or bytes
    that are not valid in ``encoding``. Decoding with replacement would calibrate on garbage silently."""
    with TextStream([Path(path)], encoding) as stream:
        while not stream.done:
            stream._read_chunk()
        return stream.text


def check_text_file(path: str | Path, encoding: str = "utf-8") -> None:
    """Refuse, before any slow work, a file that is binary or does not decode at its start (only
    the first chunk is read: a large corpus is not read for a check)."""
    with TextStream([Path(path)], encoding) as stream:
        stream.read(1)


def tokens_from_text(
    tokenizer: object,
    paths: str | Path | Sequence[str | Path],
    n_tokens: int,
    seq_len: int,
    offset_tokens: int = 0,
) -> TokenSet:
    """The first ``n_tokens`` tokens (after ``offset_tokens``) of the files, cut into sequences.

    Document separators (``<|endoftext|>``) become document boundaries as the model's tokenizer
    defines them (BOS at each document start for llama2.c models); see the module docstring. The
    files are read as a stream, only as far as the tokens asked for need (whether the text is split
    into documents is decided on what was read).
    """
    n_seq = _check_sizes(n_tokens, seq_len)
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if tokenizer is None:
        raise QenvError("This model has no tokenizer, so text files cannot be tokenized for it.",
                        "omit the data files to evaluate on tokens sampled from the model itself.")
    for path in paths:
        if not path.is_file():
            raise QenvError(f"Text file {path} does not exist.", "pass an existing UTF-8 text file.")
        check_text_file(path)
    need = n_seq * seq_len + offset_tokens
    with TextStream(paths) as stream:
        chars = max(4096, need * 8)
        while True:  # tokenize only as much text as needed: corpora can be large
            text = stream.read(chars)
            complete = stream.done and len(text) == len(stream.text)
            if complete and not text.strip():
                raise QenvError(f"Text file(s) {', '.join(map(str, paths))} are empty.", "pass a file with text in it.")
            documents = split_documents(text)
            if documents is not None:
                # the last document may be cut where the reading stopped: only whole ones count
                ids = _encode_documents(tokenizer, documents if complete else documents[:-1], need)
            else:
                ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) >= need or complete:
                break
            chars *= 2
    if len(ids) < need:
        raise QenvError(
            f"Text file(s) {', '.join(map(str, paths))} hold only {len(ids)} tokens, fewer than the {need} asked for.",
            "use a longer file or ask for fewer tokens (--n-tokens).",
        )
    ids_t = torch.tensor(ids[offset_tokens:need], dtype=torch.long).view(n_seq, seq_len)
    return TokenSet(ids_t, f"text:{','.join(p.name for p in paths)}[{offset_tokens}:{need}]")


DOCUMENT_SEPARATORS: tuple[str, ...] = ("<|endoftext|>",)
"""Strings that mark a boundary between documents in a text file (TinyStories' convention)."""


def split_documents(text: str) -> list[str] | None:
    """The documents of ``text`` (stripped, empty ones dropped), or None when it has no separator."""
    if not any(sep in text for sep in DOCUMENT_SEPARATORS):
        return None
    parts = [text]
    for sep in DOCUMENT_SEPARATORS:
        parts = [piece for part in parts for piece in part.split(sep)]
    return [doc.strip() for doc in parts if doc.strip()]


def _encode_documents(tokenizer: object, documents: list[str], need: int) -> list[int]:
    """Token ids of the documents with their boundaries, stopping once ``need`` ids are there.

    Each document is framed by the tokenizer itself (``add_special_tokens=True``). If the tokenizer
    adds no special token at all, its EOS (when it has one) ends each document instead, so a
    boundary is never lost.
    """
    probe = "a"
    frames = len(tokenizer(probe, add_special_tokens=True, verbose=False)["input_ids"]) != len(
        tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    tail = [] if frames or eos is None else [int(eos)]
    ids: list[int] = []
    batch = 64  # tokenise in batches: fast, and only as many documents as needed
    for start in range(0, len(documents), batch):
        encoded = tokenizer(documents[start:start + batch], add_special_tokens=True, verbose=False)["input_ids"]
        for doc_ids in encoded:
            ids.extend(doc_ids)
            ids.extend(tail)
        if len(ids) >= need:
            break
    return ids


@torch.inference_mode()
def tokens_from_model(model: torch.nn.Module, n_tokens: int, seq_len: int, seed: int = 0,
                      bos_token_id: int | None = None, batch_size: int = 16) -> TokenSet:
    """Sequences sampled from the model itself (temperature 1), reproducible from ``seed``."""
    n_seq = _check_sizes(n_tokens, seq_len)
    device = next(model.parameters()).device
    vocab = int(model.get_output_embeddings().weight.shape[0])
    sequences = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # sample reproducibly without touching the caller's RNG
        torch.manual_seed(seed)
        for start in range(0, n_seq, batch_size):
            b = min(batch_size, n_seq - start)
            if bos_token_id is not None:
                prompt = torch.full((b, 1), bos_token_id, dtype=torch.long)
            else:
                prompt = torch.randint(vocab, (b, 1))
            out = model.generate(
                prompt.to(device), attention_mask=torch.ones_like(prompt).to(device),
                do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, pad_token_id=0,
            )
            sequences.append(out[:, :seq_len].cpu())
    return TokenSet(torch.cat(sequences), f"sampled:seed={seed}")


#: share of a search's calibration sequences held back for choosing its final recipe
VALIDATION_FRACTION = 0.25


def split_tokens(tokens: TokenSet, validation_fraction: float = VALIDATION_FRACTION,
                 seed: int = 0) -> tuple[TokenSet, TokenSet]:
    """``(fit, validation)``: the sequences of ``tokens`` split in two disjoint sets by ``seed``.

    A search fits its recipes on the ``fit`` sequences and picks its final recipe on the
    ``validation`` ones, which it never fitted: with 2048 calibration tokens a search at 4 bits
    fits the tokens rather than the model (issue 24), and a recipe chosen on tokens it was not
    tuned on is the honest pick. Whole sequences move (never a sequence cut in two), chosen by a
    seeded permutation, so the split is the same for every recipe of one search and differs
    between seeds; each side keeps at least one sequence. ``source`` says which side a set is.
    """
    n = int(tokens.ids.shape[0])
    if n < 2:
        raise QenvError(f"{tokens.n_tokens} calibration tokens make {n} sequence, too few to hold some back for "
                        "validation.", "use at least two sequences of calibration tokens (n_tokens >= 2 * seq_len).")
    if not 0.0 < validation_fraction < 1.0:
        raise QenvError(f"validation_fraction={validation_fraction!r} must be between 0 and 1.", "use e.g. 0.25.")
    held = min(n - 1, max(1, round(n * validation_fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    fit_idx, val_idx = order[held:].sort().values, order[:held].sort().values
    ids = tokens.ids
    return (TokenSet(ids[fit_idx.to(ids.device)], f"{tokens.source} [fit {n - held}/{n} sequences, seed {seed}]"),
            TokenSet(ids[val_idx.to(ids.device)], f"{tokens.source} [validation {held}/{n} sequences, seed {seed}]"))
