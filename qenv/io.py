"""Atomic file output: every file qenv writes appears whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_json(path: str | Path, what: str, fix: str) -> Any:
    """Parse a JSON file, or raise one clear error naming ``what`` it should have been."""
    from qenv.errors import QenvError

    path = Path(path)
    if not path.is_file():
        raise QenvError(f"{what} {path} does not exist.", fix)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QenvError(f"{what} {path} is not valid JSON ({exc}).", fix) from None


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files that :func:`atomic_path` leaves when its process is killed
    mid-write (SIGKILL, power loss), in ``folder`` and below; returns what was removed.

    Only call it when no other process is writing there (e.g. when resuming a run).
    """
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for path in sorted(folder.rglob(".*.tmp")):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
