"""Atomic file output, run-folder locks and output-path checks.

- Every file qenv writes appears whole or not at all (:func:`atomic_path`), with the permissions
  an ordinary ``open()`` would give it (the umask decides: 0644 under umask 022), not the 0600 of
  the temporary file it is written to.
- A run folder has one writer at a time (:class:`RunLock`, an ``flock`` held for the run's life).
- An output path is checked (:func:`check_output_dir`) before any slow work, so a bad ``--out``
  or ``--logdir`` costs nothing.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: the lock file inside a run folder (removed when the run ends; left by a killed process, then recovered)
LOCK_NAME = ".lock"


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no other way to read it: set and restore at once
    os.umask(mask)
    return mask


def default_mode(executable: bool = False) -> int:
    """The mode ``open()`` (or ``mkdir`` for ``executable``) would give a new file here: 0666 (0777)
    less the umask."""
    return (0o777 if executable else 0o666) & ~current_umask()


@contextmanager
def atomic_path(path: str | Path, executable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The file is synced to the disk before the rename and the folder after it, so that a power cut
    never leaves a renamed file whose data was not written (a zero-filled file).

    The file gets the mode a plain ``open()`` would give it (``executable``: as ``mkdir`` would, for
    scripts), not the owner-only mode of ``mkstemp``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_mode(executable))
        _fsync(tmp)  # the data reaches the disk before the name does: a power cut leaves the old
        os.replace(tmp, path)  # file or the new one, never a zero-filled new one
        _fsync(path.parent)
    except OSError as exc:  # a full disk, a quota, a file-size limit: name the file the user asked for
        if exc.filename is None or str(exc.filename) == tmp:
            exc.filename = str(path)
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)


def _fsync(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot sync a folder: nothing more can be done there
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def make_dir_like_mkdir(prefix: str, parent: str | Path) -> Path:
    """``tempfile.mkdtemp`` with the mode a plain ``mkdir`` gives (0755 under umask 022), for a
    folder that is renamed into place as output."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, default_mode(executable=True))
    return folder


def apply_default_modes(folder: str | Path) -> None:
    """Give every file and folder under ``folder`` the mode a plain ``open()``/``mkdir`` would (some
    writers, e.g. transformers' safetensors shards, leave 0600 files behind)."""
    root = Path(folder)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, default_mode(executable=path.is_dir()))


#: the largest JSON file qenv reads (run files, checkpoint states, saved searchers, statistics: KBs)
MAX_JSON_BYTES = 64 * 2**20


def read_json(path: str | Path, what: str, fix: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file, or raise one clear error naming ``what`` it should have been.

    Files are input: the size is checked before reading, and nesting too deep to parse (a
    ``RecursionError`` in the parser) is refused like any other bad JSON."""
    from qenv.errors import QenvError

    path = Path(path)
    if not path.is_file():
        raise QenvError(f"{what} {path} does not exist.", fix)
    size = path.stat().st_size
    if size > max_bytes:
        raise QenvError(f"{what} {path} is {size / 2**20:,.1f} MiB, more than the {max_bytes / 2**20:,.0f} MiB such "
                        "a file may have; it is not read.", fix)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QenvError(f"{what} {path} is not valid JSON ({exc}).", fix) from None
    except RecursionError:
        raise QenvError(f"{what} {path} is not valid JSON (it nests too deeply).", fix) from None


def write_text_atomic(path: str | Path, text: str, executable: bool = False) -> Path:
    with atomic_path(path, executable=executable) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


# -- output paths -----------------------------------------------------------------------------------
#: NAME_MAX where the file system does not say (Linux, macOS and Windows file systems all hold 255)
DEFAULT_NAME_MAX = 255
#: PATH_MAX of Linux (a longer path is ENAMETOOLONG whatever its components)
DEFAULT_PATH_MAX = 4096


def name_max(path: str | Path) -> int:
    """The longest file name the file system holding ``path`` (or its nearest existing ancestor) takes."""
    probe = Path(os.path.abspath(Path(path).expanduser()))
    while True:
        try:
            return int(os.pathconf(probe, "PC_NAME_MAX"))
        except (OSError, ValueError, AttributeError):  # missing, or itself too long: ask its parent
            if probe.parent == probe:
                return DEFAULT_NAME_MAX
            probe = probe.parent


def check_name_lengths(path: str | Path, what: str, reserve: int = 0, last_only: bool = False) -> Path:
    """Refuse, before any work, a path with a component longer than the file system's NAME_MAX
    (``ENAMETOOLONG`` would otherwise come when the output is written, after the work). ``reserve``
    is what the writer adds to the last component (e.g. a temporary name's prefix and suffix);
    ``last_only`` checks the last component alone (the parent is another option's, checked there)."""
    from qenv.errors import QenvError

    path = Path(path).expanduser()
    limit = name_max(path)
    parts = path.parts
    for i, part in enumerate(parts):
        if last_only and i < len(parts) - 1:
            continue
        extra = reserve if i == len(parts) - 1 else 0
        if len(os.fsencode(part)) + extra > limit:
            shown = part if len(part) <= 40 else part[:20] + "..." + part[-12:]
            room = f" ({extra} more are kept for temporary names)" if extra else ""
            raise QenvError(f"{what} {shown!r} is a name of {len(os.fsencode(part))} bytes; the file system takes at "
                            f"most {limit}{room}.", f"pass a shorter {what} (at most {limit - extra} bytes for that "
                            "name).")
    whole = len(os.fsencode(os.path.abspath(path))) + reserve
    if whole >= DEFAULT_PATH_MAX:
        raise QenvError(f"{what} {str(path)[:40]}... is a path of {whole} bytes; the system takes fewer than "
                        f"{DEFAULT_PATH_MAX}.", f"pass a shorter {what}.")
    return path


def check_output_dir(path: str | Path, what: str, fix: str | None = None, reserve: int = 0) -> Path:
    """Check, before any work, that the folder ``path`` exists or can be created, and can be written.

    Nothing is created: the nearest existing ancestor must be a writable folder (tested by creating
    and removing a temporary file there, which is what counts for root, for read-only file systems
    and for ACLs alike), and no ancestor may be a file, and no component may be longer than the file
    system takes (:func:`check_name_lengths`, ``reserve`` as there). ``what`` names the path in the
    error (e.g. ``"--logdir"``). Returns ``path``.
    """
    from qenv.errors import QenvError

    path = Path(path).expanduser()
    fix = fix or f"pass a {what} folder that you can write to."
    check_name_lengths(path, what, reserve)
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: following it would write elsewhere
            raise QenvError(f"{what} {path}: {probe} is a broken symbolic link.", fix)
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == path else f"is under {probe}, which is a file"
        raise QenvError(f"{what} {path} {where}, not a folder.", fix)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".qenv-write-check.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise QenvError(f"{what} {path} cannot be written: {probe} refuses new files ({reason}).", fix) from None
    return path


# -- run-folder locks ---------------------------------------------------------------------------------
class RunLock:
    """An exclusive lock on a run folder, held for the life of the run: one writer per folder.

    It is an ``flock`` on ``<folder>/.lock``, which holds the writer's PID. The kernel drops the
    lock when the process ends however it ends (kill -9 included), so a lock file left by a dead
    process is stale and simply taken over (:attr:`recovered_from` names that PID). A second
    process gets a :class:`~qenv.errors.QenvError` naming the PID that holds the folder.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.recovered_from: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self, what: str = "run folder") -> RunLock:
        import fcntl  # POSIX only: imported here so that the rest of this module works everywhere

        from qenv.errors import QenvError

        for _ in range(100):  # a holder may remove the file between our open and our flock: retry
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, default_mode())
            except OSError as exc:
                raise QenvError(f"The {what} {self.folder} cannot be locked for writing ({exc.strerror}).",
                                "work on a copy of it that you can write to, or fix its permissions.") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = self.holder()
                who = f"process {holder}" if holder is not None else "another process"
                stop = f"stop it (kill -INT {holder})" if holder is not None else "stop it"
                raise QenvError(f"The {what} {self.folder} is in use: {who} is writing to it (it holds {self.path}).",
                                f"wait for that run to finish or {stop}, then --resume it; or pick another "
                                "--name.") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # locked a file its holder had just removed: take the new one
                os.close(fd)
                continue
            old = os.pread(fd, 64, 0).decode(errors="replace").strip()
            if old.isdigit() and int(old) != os.getpid():
                self.recovered_from = int(old)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return self
        raise QenvError(f"Could not lock {self.path}: it keeps being replaced.", "retry in a moment.")

    def holder(self) -> int | None:
        """The PID written in the lock file (the holder's, while it is locked)."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        """Remove the lock file, then unlock (in that order: a waiting process retries on the new file)."""
        if self.fd is None:
            return
        try:
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire() if not self.held else self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def remove_stale_temp_files(folder: str | Path, lock: RunLock) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files that :func:`atomic_path` leaves when its process is killed
    mid-write (SIGKILL, power loss), in ``folder`` and below; returns what was removed.

    Only under ``lock``, held on ``folder``: without it, a live writer's temporary file (about to be
    renamed into place) could be deleted under it.
    """
    folder = Path(folder)
    if not lock.held or lock.folder.resolve() != folder.resolve():
        raise RuntimeError(f"remove_stale_temp_files({folder}) needs the run lock of that folder, held.")
    removed = []
    if folder.is_dir():
        for path in sorted(folder.rglob(".*.tmp")):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
