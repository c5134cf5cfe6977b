"""qenv's on-disk cache: where it is, what it holds, and clearing it.

Everything that does not depend on a recipe is computed once and kept in one folder,
``$QENV_CACHE_DIR`` or else ``~/.cache/qenv``: the full-precision reference of a model on a token
set (log-probabilities, block outputs and each layer's input statistics: the bulk, up to GBs on
large models), tokens sampled from a model, the layers' observation features and their output
errors under each menu rule, the human presets' metrics. Each file's
name carries the fingerprints of what it was computed from, so a changed model or token set
never reads a stale file; a damaged file (its checksum or its shapes, values or token ids are
wrong: :mod:`qenv.cache_files`) is recomputed, never used. Deleting the cache only costs time.

``python -m qenv cache --info`` prints this summary; ``python -m qenv cache --clear`` deletes
qenv's files (and only those: a file counts as qenv's only when its whole name has the exact form
qenv gives it, :data:`CACHE_NAME_PATTERNS`; other files in the folder are counted and left alone).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from qenv.eval.reference import default_cache_dir

#: file-name prefix -> what those files hold (every cache file qenv writes is ``<kind>-<keys>.<ext>``)
CACHE_KINDS: dict[str, str] = {
    "reference": "full-precision references: log-probs, block outputs, layer input statistics",
    "tokens": "calibration tokens sampled from a model",
    "features": "layers' observation features",
    "errors": "each layer's output error under each menu rule (greedy plan, allocation, residual kinds)",
    "presets": "human presets' metrics (eval_agent.py's baselines), per model, tokens, recipe and settings",
    "start": "best starts: the best measured recipe per model, tokens, menu and budget (qenv.envs.task)",
}


@dataclass
class CacheInfo:
    """What the cache folder holds: per kind, the files and their total size in bytes."""

    folder: Path
    files: dict[str, list[Path]] = field(default_factory=dict)
    other: list[Path] = field(default_factory=list)  # files in the folder that are not qenv's
    sizes: dict[Path, int] = field(default_factory=dict)  # bytes per file when the folder was read

    def size(self, kind: str) -> int:
        # read at scan time: after clear_cache the files are gone, and the size freed must still show
        return sum(self.sizes[p] if p in self.sizes else _size(p) for p in self.files.get(kind, []))

    @property
    def total_files(self) -> int:
        return sum(len(v) for v in self.files.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.size(kind) for kind in self.files)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # removed meanwhile by another process
        return 0


_HEX = r"[0-9a-f]{8,64}"
#: the exact names qenv gives its cache files, per kind (qenv.eval.reference, qenv.envs.quant_llm's make_tokens,
#: qenv.eval.reference.layer_table_path): a user's ``tokens-backup.txt`` or ``errors-2024.log`` is none of them
CACHE_NAME_PATTERNS: dict[str, re.Pattern[str]] = {
    "reference": re.compile(rf"reference-v\d+-{_HEX}(?:-{_HEX}|-b\d+(?:x\d+)*|-n[0-9a-f]{{8}})*\.safetensors"),
    "tokens": re.compile(rf"tokens-{_HEX}-s\d+-n\d+-l\d+(?:-n[0-9a-f]{{8}})?\.safetensors"),
    "features": re.compile(rf"features-v\d+-{_HEX}\.(?:safetensors|npy)"),  # .npy: written before v3
    "errors": re.compile(rf"errors-v\d+-{_HEX}\.(?:safetensors|npy)"),  # .npy: written before v2
    "presets": re.compile(rf"presets-v\d+-{_HEX}\.safetensors"),  # eval_agent.py's preset metrics
    "start": re.compile(rf"start-{_HEX}\.safetensors"),  # the version is in the key (START_CACHE_VERSION)
}
#: :func:`qenv.io.atomic_path`'s temporary name: ``.<name>.<mkstemp's 8 random characters>.tmp``
_TEMP_RE = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


def _kind_of(name: str) -> str | None:
    """The cache kind of a file name, for finished files and for :func:`qenv.io.atomic_path`'s
    temporary ``.<name>.<random>.tmp`` files (left behind when a writer is killed); ``None`` for any
    other name, however it begins (matched whole: ``fullmatch``)."""
    temp = _TEMP_RE.fullmatch(name)
    if temp is not None:
        name = temp.group("name")
    for kind, pattern in CACHE_NAME_PATTERNS.items():
        if pattern.fullmatch(name):
            return kind
    return None


def cache_info(folder: str | Path | None = None) -> CacheInfo:
    """The cache's content (``folder`` defaults to ``$QENV_CACHE_DIR`` or ``~/.cache/qenv``)."""
    info = CacheInfo(Path(folder) if folder is not None else default_cache_dir())
    info.files = {kind: [] for kind in CACHE_KINDS}
    if info.folder.is_dir():
        for path in sorted(info.folder.iterdir()):
            if not path.is_file():
                continue
            kind = _kind_of(path.name)
            if kind is None:
                info.other.append(path)
            else:
                info.files[kind].append(path)
                info.sizes[path] = _size(path)
    return info


def clear_cache(folder: str | Path | None = None) -> CacheInfo:
    """Delete qenv's cache files in ``folder`` (nothing else); returns what was there before.

    Safe while nothing runs: every cache file is recomputed when it is needed again. A run that is
    using the cache at the same time recomputes what it loses.
    """
    info = cache_info(folder)
    for paths in info.files.values():
        for path in paths:
            path.unlink(missing_ok=True)
    return info


def human_bytes(n: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover
