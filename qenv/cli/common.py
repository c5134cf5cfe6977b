"""Error handling, argument parsing and run folders shared by the command-line programs."""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from qenv.errors import QenvError
from qenv.io import LOCK_NAME, RunLock, check_name_lengths, check_output_dir, default_mode
from qenv.signals import (EXIT_INTERRUPTED, EXIT_TERMINATED, exit_status, signal_name, stopped_message,
                          terminate_as_interrupt)

EXIT_ERROR = 2
EXIT_IO_ERROR = 74  # sysexits' EX_IOERR: the disk refused a write (full, quota, read-only, I/O error)
#: errors of the storage, not of the input: reported in one line, like input errors
DISK_ERRNOS: frozenset[int] = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})
#: a plain folder name; matched with ``fullmatch`` (``$`` would also match before a final newline)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=@-]*")


def agents_checkout_problem() -> QenvError | None:
    """The error of a ``qenv.agents`` that comes from another checkout than ``qenv``, else None.

    The editable install maps ``qenv.agents`` to the top-level ``agents/`` folder of the checkout it
    was installed from (pyproject's ``package-dir``). A second checkout run with the same python
    imports its own ``qenv/`` (the script's folder comes first on ``sys.path``) but the first one's
    ``agents/``: edits there would silently do nothing. Found without importing the agents (the
    library never imports the programs' layer): ``agents/`` must sit beside ``qenv/`` (a checkout)
    or inside it (an installed wheel).
    """
    import importlib.util

    import qenv

    try:
        spec = importlib.util.find_spec("qenv.agents")
    except (ImportError, ValueError):
        return None  # no agents at all: the import that needs them says so
    if spec is None or not spec.origin:
        return None
    agents_dir = Path(spec.origin).resolve().parent
    qenv_dir = Path(qenv.__file__).resolve().parent
    if agents_dir in (qenv_dir.parent / "agents", qenv_dir / "agents"):
        return None
    return QenvError(f"This checkout's qenv ({qenv_dir}) would run another checkout's agents ({agents_dir}): the "
                     "editable install maps qenv.agents to the folder it was installed from, so edits to this "
                     "checkout's agents/ would do nothing.",
                     f"run `pip install -e .` in {qenv_dir.parent} (or run the programs of {agents_dir.parent}).")


def check_agents_checkout() -> None:
    """Raise :func:`agents_checkout_problem`'s error (one line, exit 2 in the programs) when there is one."""
    problem = agents_checkout_problem()
    if problem is not None:
        raise problem


def format_error(exc: QenvError) -> str:
    """``error: <problem> Fix: <fix>`` on one line."""
    text = f"error: {exc.problem}" + (f" Fix: {exc.fix}" if exc.fix else "")
    return " ".join(text.split())


def run_cli(body: Callable[[], int | None], stderr: Any = None) -> int:
    """Run a program body: a :class:`QenvError` prints one line and returns 2; Ctrl-C returns 130,
    SIGTERM 143, SIGHUP 129 (raised as :class:`qenv.signals.Terminated`, a ``KeyboardInterrupt``).

    The body handles its own Ctrl-C / SIGTERM when it has something to save; this is the last
    resort for one during start-up (loading models, computing references).
    """
    err = sys.stderr if stderr is None else stderr
    try:
        with terminate_as_interrupt():
            return int(body() or 0)
    except QenvError as exc:
        print(format_error(exc), file=err, flush=True)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        print(stopped_message(signal_name(exc)), file=err, flush=True)
        return exit_status(exc)
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        where = f"Writing {exc.filename}" if exc.filename else "Writing a file"
        print(format_error(QenvError(
            f"{where} failed: {exc.strerror or os.strerror(exc.errno)}. Files written before are whole (each is "
            "written under a temporary name and renamed into place).",
            "free disk space (or fix the file system), then run the command again; a training run continues from "
            "its last checkpoint with --resume <run folder>.")), file=err, flush=True)
        return EXIT_IO_ERROR


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose usage errors are :class:`QenvError` (one line, exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise QenvError(f"{message}.", f"run `{self.prog} --help` to see the options.")


def parse_key_values(items: Sequence[str] | None, what: str = "--env-kwargs") -> dict[str, Any]:
    """``["budget_bpw=2.5", "menu=[{bits: 4}]"]`` -> ``{"budget_bpw": 2.5, "menu": [{"bits": 4}]}``.

    Values are parsed as YAML (numbers, booleans, lists, mappings; anything else stays a string).
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise QenvError(f"{what} entry {item!r} is not key=value.", f"write e.g. {what} budget_bpw=2.5 reward=ppl.")
        try:
            out[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise QenvError(f"{what} value of {key!r} ({text!r}) is not valid YAML ({first}).",
                            "quote strings and write lists as [a, b].") from None
    return out


def normalizer_path(policy: Path) -> Path:
    """The VecNormalize statistics a policy file acts with: ``<stem>.vecnormalize.json`` beside it
    when there is one (``best_model.zip``: the statistics of the moment it was saved, from
    ``--eval-freq``), else the run's final ``vecnormalize.json``."""
    policy = Path(policy)
    own = policy.with_name(policy.stem + ".vecnormalize.json")
    return own if own.is_file() else policy.parent / "vecnormalize.json"


def run_folder_of(policy: Path) -> Path | None:
    """The run folder ``policy`` belongs to: its own folder for ``model.zip``, the run folder above
    ``checkpoints/`` for a checkpoint (``<run>/checkpoints/step_*.zip``); ``None`` if neither holds
    a ``config.json`` or ``summary.json`` of train_agent.py."""
    folder = Path(policy).resolve().parent
    for candidate in (folder, folder.parent) if folder.name == "checkpoints" else (folder,):
        if (candidate / "config.json").is_file() or (candidate / "summary.json").is_file():
            return candidate
    return None


def trained_observation(policy: Path) -> str | None:
    """The observation kind the run of ``policy`` trained with (``full`` where its settings name
    none), or ``None`` when no run folder says. ``full`` and ``relative`` observations have the
    same size, so a policy fed the other kind runs without an error on meaningless inputs."""
    from qenv.io import read_json

    folder = run_folder_of(Path(policy))
    if folder is None:
        return None
    for name in ("config.json", "summary.json"):
        try:  # size-capped, nesting checked: a run folder is input
            data = read_json(folder / name, "Run file", "")
        except QenvError:
            continue
        if not isinstance(data, dict):
            continue
        settings = data.get("settings", data) if name == "summary.json" else data
        if isinstance(settings, dict) and isinstance(settings.get("env"), dict):  # this version's layout
            from qenv.cli.runs import env_config_of

            try:
                return env_config_of(settings, str(folder / name)).observation
            except QenvError:
                continue
        if isinstance(settings, dict) and isinstance(settings.get("env_kwargs"), dict):
            return str(settings["env_kwargs"].get("observation", "full"))
    return None


def check_observation_matches(policy: Path, observation: Any, flag: str, trained: str | None = None) -> None:
    """One line when ``observation`` is not the kind the policy's run trained with (``trained``,
    when the caller has read the run's settings already; else :func:`trained_observation`)."""
    trained = trained if trained is not None else trained_observation(policy)
    if trained is not None and str(observation) != trained:
        raise QenvError(f"{flag} observation={observation} differs from the observation={trained} that {policy} was "
                        "trained with (a policy reads each entry as it learned it).",
                        f"use observation={trained}, or train a policy with observation={observation}.")


def check_run_name(name: str, parent: str | Path = ".") -> str:
    """``name`` if it is a plain folder name that the file system under ``parent`` can hold."""
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise QenvError(f"Run name {name!r} is not a plain folder name.",
                        "use letters, digits, '.', '_', '-' (no slashes); --logdir picks the parent folder.")
    check_name_lengths(Path(parent) / name, "--name", last_only=True)
    return name


def default_run_name(logdir: Path, stem: str) -> str:
    """``<stem>-YYYYmmdd-HHMMSS`` (:func:`new_run_dir` adds ``-2``, ``-3``, ... when it is taken)."""
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


#: what marks a folder as a run of train_agent.py: one of these files, a JSON object naming every key of
#: RUN_MARK_KEYS (train_agent.py writes config.json as soon as the folder is made, summary.json after)
RUN_MARK_FILES: tuple[str, ...] = ("config.json", "summary.json")
RUN_MARK_KEYS: tuple[str, ...] = ("env_id", "agent", "total_timesteps")
#: what marks a folder as eval_agent.py's output: its results.json, a JSON object naming these keys
EVAL_MARK_KEYS: tuple[str, ...] = ("policy", "agent", "budget_bpw", "models")
#: what eval_agent.py writes in its output folder (and all that its --overwrite removes there)
EVAL_OUTPUTS: tuple[str, ...] = ("results.json", "results.csv", "pareto.png", "export")
#: what marks a folder as the output of ``python -m qenv quantize``: its results.json names these keys
QUANTIZE_MARK_KEYS: tuple[str, ...] = ("model", "spec", "budget_bpw", "method", "runtime", "rows")
#: what ``python -m qenv quantize`` writes in its output folder (and all that its --overwrite removes there)
QUANTIZE_OUTPUTS: tuple[str, ...] = ("recipe.json", "comparison.csv", "results.json", "model", "model.gguf")
_MARK_MAX_BYTES = 64 << 20  # a larger "summary.json" is not one qenv wrote: not read to find out


def _json_object_naming(path: Path, keys: Sequence[str]) -> bool:
    """Whether ``path`` is a regular file holding a JSON object with every one of ``keys``."""
    import json

    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MARK_MAX_BYTES:
            return False
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and all(key in data for key in keys)


def is_run_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a run of train_agent.py: a real folder (not a link) whose config.json or
    summary.json is a JSON object naming ``env_id``, ``agent`` and ``total_timesteps``. Only such a
    folder is emptied by ``--overwrite``: a model folder's config.json, a folder of photos, a link to
    a thesis are not runs."""
    folder = Path(folder)
    return (not folder.is_symlink() and folder.is_dir()
            and any(_json_object_naming(folder / name, RUN_MARK_KEYS) for name in RUN_MARK_FILES))


def is_eval_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is an output folder of eval_agent.py: its results.json names ``policy``,
    ``agent``, ``budget_bpw`` and ``models``."""
    folder = Path(folder)
    return not folder.is_symlink() and folder.is_dir() and _json_object_naming(folder / "results.json", EVAL_MARK_KEYS)


@dataclass(frozen=True)
class OutputKind:
    """What a program's output folder is, for :func:`claim_output_dir`: how to recognise one it
    wrote (the only kind of non-empty folder that ``--overwrite`` replaces) and what to remove then."""

    noun: str  # "Run folder"
    flag: str  # the option that names the folder, for the advice: "--name"
    owner: str  # "a run of train_agent.py"
    is_ours: Callable[[Path], bool]
    exists_fix: Callable[[Path], str]  # advice for an existing folder of ours, without --overwrite
    owned: tuple[str, ...] | None = None  # the entries --overwrite removes; None: every entry


RUN_OUTPUT = OutputKind(
    "Run folder", "--name", "a run of train_agent.py (a config.json or summary.json that train_agent.py wrote)",
    is_run_folder, lambda f: f"pass --resume {f} to continue it, --overwrite to replace it, or another --name.")
EVAL_OUTPUT = OutputKind(
    "Output folder", "--out", "an output folder of eval_agent.py (a results.json that eval_agent.py wrote)",
    is_eval_folder, lambda f: "pass --overwrite to replace that evaluation, or another --out.", EVAL_OUTPUTS)


def is_quantize_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is an output folder of ``python -m qenv quantize``: its results.json names
    the model, spec, budget, method, runtime and the table's rows."""
    folder = Path(folder)
    return (not folder.is_symlink() and folder.is_dir()
            and _json_object_naming(folder / "results.json", QUANTIZE_MARK_KEYS))


QUANTIZE_OUTPUT = OutputKind(
    "Output folder", "--out", "an output folder of python -m qenv quantize (a results.json that it wrote)",
    is_quantize_folder, lambda f: "pass --overwrite to replace that quantization, or another --out.", QUANTIZE_OUTPUTS)


def claim_output_folder(out: Path, kind: OutputKind, overwrite: bool, numbered: bool = False
                        ) -> tuple[Path, RunLock, Path | None]:
    """:func:`claim_output_dir` for a program's ``--out`` path: its missing parents are created too.
    Returns the folder, its held lock and the topmost folder this call created (for
    :func:`discard_output_folder` after a failure), or ``None``."""
    top = None
    probe = out.parent
    while not probe.exists() and probe.parent != probe:
        top, probe = probe, probe.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QenvError(f"{kind.flag} {out} cannot be created ({exc.strerror}).",
                        f"pass {kind.flag} a folder you can write to.") from None
    try:
        folder, lock, created = claim_output_dir(
            lambda n: out if n == 1 else out.with_name(f"{out.name}-{n}"), kind, overwrite=overwrite,
            numbered=numbered)
    except BaseException:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise
    return folder, lock, top if top is not None else folder if created else None


def discard_output_folder(out: Path, created: Path | None, kind: OutputKind) -> None:
    """After a failed program: no half-written output (the folders this run created go, and in a
    folder that was there before, what ``kind`` writes)."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for name in kind.owned or ():
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def claim_output_dir(folder_of: Callable[[int], Path], kind: OutputKind, overwrite: bool = False,
                     numbered: bool = False) -> tuple[Path, RunLock, bool]:
    """Create the output folder ``folder_of(1)`` and lock it for this process; returns the folder,
    its held lock and whether this call created it.

    The creation is one ``mkdir``, which exactly one of several racing processes wins; with
    ``numbered``, a taken name gets ``folder_of(2)``, ``folder_of(3)``, ... instead. An existing
    folder is refused when it is a symbolic link (whatever it points to: writing, or emptying,
    through it reaches a folder that was never named) or a non-empty folder that ``kind`` did not
    write (even with ``overwrite``), before anything in it is touched. A folder of ``kind`` is locked
    first (a second writer gets the holder's PID), then refused unless it is empty, or ``overwrite``
    (what ``kind`` owns in it is removed under the lock).
    """
    n = 1
    while True:
        folder = folder_of(n)
        try:
            os.mkdir(folder, default_mode(executable=True))
            created = True
        except FileExistsError:
            if numbered:
                n += 1
                continue
            if folder.is_symlink():
                raise QenvError(f"{kind.noun} {folder} is a symbolic link (to {os.readlink(folder)}): qenv writes "
                                "only into a real folder that it names, never through a link.",
                                f"pass the folder the link points to, or another {kind.flag}.") from None
            if not folder.is_dir():
                raise QenvError(f"{folder} exists and is not a folder.", f"pick another {kind.flag}.") from None
            created = False
        break
    if not created and _entries(folder) and not kind.is_ours(folder):  # refused before the lock touches it
        what = "is not empty and" if overwrite else "already exists, is not empty and"
        raise QenvError(f"{kind.noun} {folder} {what} is not {kind.owner}: --overwrite only replaces such a folder, "
                        "and nothing in this one is touched.", f"pick another {kind.flag} (or an empty folder).")
    lock = RunLock(folder)
    try:
        lock.acquire(kind.noun.lower())
        others = _entries(folder)
        if others:
            if not overwrite:
                raise QenvError(f"{kind.noun} {folder} already exists.", kind.exists_fix(folder))
            if not kind.is_ours(folder):  # changed since the check above: still never empty a stranger's folder
                raise QenvError(f"{kind.noun} {folder} is not {kind.owner}.", f"pick another {kind.flag}.")
            for path in others:
                if kind.owned is not None and path.name not in kind.owned:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    except BaseException:
        lock.release()
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, lock, created


def _entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name != LOCK_NAME]


def new_run_dir(logdir: str | Path, name: str, overwrite: bool = False,
                numbered: bool = False) -> tuple[Path, RunLock]:
    """Create ``logdir/name`` and lock it for this process; returns the folder and its held lock
    (see :func:`claim_output_dir`: ``overwrite`` empties a run folder of train_agent.py, and only
    that; a taken name is numbered ``-2``, ``-3``, ... with ``numbered``)."""
    logdir = check_output_dir(logdir, "--logdir", "pass a --logdir folder that you can write to (or that can be "
                                                  "created), e.g. --logdir runs.")
    base = check_run_name(name, logdir)
    try:
        logdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QenvError(f"--logdir {logdir} cannot be created ({exc.strerror}).",
                        "pass a --logdir folder that you can write to.") from None
    folder, lock, _ = claim_output_dir(lambda n: logdir / (base if n == 1 else f"{base}-{n}"), RUN_OUTPUT,
                                       overwrite=overwrite, numbered=numbered)
    return folder, lock


def merge_flag(env_kwargs: dict[str, Any], key: str, flag: str, value: Any, given: dict[str, Any]) -> None:
    """Set ``env_kwargs[key] = value`` for a flag that was given, refusing a different value for the
    same key in ``--env-kwargs`` (``given``): one setting, said twice two ways, is a mistake to show,
    not a tie to break silently."""
    if value is None:
        return
    if key in given and given[key] != value:
        raise QenvError(f"{flag} {value} and --env-kwargs {key}={given[key]} disagree.",
                        f"give {key} once: either {flag} or --env-kwargs {key}=...")
    env_kwargs[key] = value


def check_weight_cache_gib(value: float | None, device: str | None) -> None:
    """``--weight-cache-gib``: positive, and no larger than the memory free on the device it will
    fill (host RAM, or the GPU's free memory), refused before anything slow."""
    if value is None:
        return
    if not value > 0:
        raise QenvError(f"--weight-cache-gib={value:g} must be positive.",
                        "pass a size in GiB, or leave it out to size the cache from the model.")
    from qenv.memory import check_cache_fits
    from qenv.models.loading import resolve_device

    check_cache_fits(value, resolve_device(device), "--weight-cache-gib")


def bpw_scope(layers: Sequence[Any]) -> str:
    """Which tensors a table's bpw counts: the quantized linear layers, and whether the embedding and
    the output layer are among them (llama.cpp's BPW counts every tensor, so the two disagree)."""
    kinds = {getattr(info, "kind", "") for info in layers}
    linears = sum(getattr(info, "kind", "") not in ("embed", "lm_head") for info in layers)
    inside = [what for kind, what in (("embed", "the embedding"), ("lm_head", "lm_head")) if kind in kinds]
    outside = [what for kind, what in (("embed", "the embedding"), ("lm_head", "lm_head")) if kind not in kinds]
    text = f"bpw counts the {linears} quantized linear layers"
    if inside:
        text += " and " + " and ".join(inside)
    if outside:
        text += f" ({' and '.join(outside)} excluded)"
    return text


def table_legend(reference: str | None, bpw_counts: str) -> str:
    """The line under a table of qenv's numbers: what KL is measured against (a GGUF of quantized
    tensors is no full-precision reference: ``LoadedModel.reference_label``), which tensors bpw
    counts (:func:`bpw_scope`), and what MB is."""
    return (f"  KL against {reference or 'the full-precision model'}; {bpw_counts}; MB: the whole model, tensors "
            "outside them at fp16")


def refuse_repeated_models(models: Sequence[str], why: str) -> None:
    """A model listed twice in ``--model`` is a mistake to show (``why`` says what it would do)."""
    twice = sorted({m for m in models if list(models).count(m) > 1})
    if twice:
        raise QenvError(f"--model {', '.join(twice)} is given more than once ({why}).", "list each model once.")


def quiet_libraries() -> None:
    """Keep the programs' output to their own lines and progress bar."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers is a dependency
        pass


def fmt(value: Any, digits: int = 4) -> str:
    """A short human-readable number."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:  # nan
            return "nan"
        if value == 0:
            return "0"
        if abs(value) >= 1000 or abs(value) < 1e-3:
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A plain-text table; ``align`` holds 'l' or 'r' per column (numbers right by default)."""
    cells = [[str(h) for h in headers]] + [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if align is None:
        align = "l" + "r" * (len(headers) - 1)
    lines = []
    for n, row in enumerate(cells):
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
