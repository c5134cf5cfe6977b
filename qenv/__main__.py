"""``python -m qenv``: small maintenance commands.

    python -m qenv cache --info     where the cache is, and what it holds (files, sizes per kind)
    python -m qenv cache --clear    delete qenv's cache files (recomputed when needed again)
    python -m qenv quantize ...     from a model to a deployable file (see ``python -m qenv quantize -h``)

The cache folder is ``$QENV_CACHE_DIR``, else ``~/.cache/qenv`` (see :mod:`qenv.cache`).

Commands that need agents (``quantize`` builds searchers and loads policies) live in the programs'
layer, which the library never imports: they are found through the ``qenv.commands`` entry-point
group (``name = "module:main"``, ``main(argv) -> int``), which qenv's own ``pyproject.toml`` fills.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Any

from qenv.cli.common import ArgumentParser, check_agents_checkout, plain_table, run_cli
from qenv.errors import QenvError


#: the entry-point group of ``python -m qenv`` commands installed by packages (qenv's own: ``quantize``)
COMMAND_GROUP = "qenv.commands"
#: commands qenv's own distribution installs there, and what each does (listed even when the install is stale)
OWN_COMMANDS: dict[str, str] = {"quantize": "from a model to a recipe, a comparison table and a deployable file"}


def installed_commands() -> dict[str, Any]:
    """Entry points of the ``qenv.commands`` group by name (loaded only when run)."""
    try:
        return {ep.name: ep for ep in metadata.entry_points(group=COMMAND_GROUP)}
    except Exception:  # a broken installed distribution must not break `python -m qenv cache`
        return {}


def run_command(name: str, argv: list[str]) -> int:
    """Run an entry-point command; a missing one (an install older than the command) is one clear line."""
    if name in OWN_COMMANDS:  # they live in qenv.agents, which may be another checkout's (editable install)
        check_agents_checkout()
    found = installed_commands().get(name)
    if found is None:
        raise QenvError(f"The command {name!r} is not installed (no {COMMAND_GROUP!r} entry point named {name!r}: "
                        "the installed qenv metadata is older than this checkout).",
                        "reinstall qenv: pip install -e . (or pip install qenv).")
    try:
        main = found.load()
    except ImportError as exc:
        raise QenvError(f"The command {name!r} ({found.value}) could not be imported ({exc}).",
                        "reinstall the package that provides it.") from None
    return int(main(argv) or 0)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m qenv", description="qenv maintenance commands.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    cache = commands.add_parser(
        "cache", help="see or clear the on-disk cache ($QENV_CACHE_DIR, else ~/.cache/qenv)",
        description="qenv caches full-precision references, sampled tokens and layer features in "
                    "$QENV_CACHE_DIR (else ~/.cache/qenv); on large models that reaches GBs.")
    what = cache.add_mutually_exclusive_group(required=True)
    what.add_argument("--info", action="store_true", help="print the folder and what it holds")
    what.add_argument("--clear", action="store_true", help="delete qenv's cache files (other files are left alone)")
    descriptions = {**OWN_COMMANDS, **{name: f"installed command ({ep.value})" for name, ep in installed_commands().items()
                                       if name not in OWN_COMMANDS}}
    for name, text in descriptions.items():  # parsed by the command itself (run_command); listed for -h
        commands.add_parser(name, help=text, add_help=False)
    return parser


def _where(folder: object) -> str:
    source = "$QENV_CACHE_DIR" if os.environ.get("QENV_CACHE_DIR") else "the default; set QENV_CACHE_DIR to move it"
    return f"qenv cache: {folder} ({source})"


def _body(argv: list[str] | None) -> int:
    from qenv.cache import CACHE_KINDS, cache_info, clear_cache, human_bytes

    args = build_parser().parse_args(argv)
    if args.info:
        info = cache_info()
        print(_where(info.folder))
        if not info.folder.is_dir():
            print("empty (the folder does not exist yet)")
            return 0
        rows = [[kind, str(len(info.files[kind])), human_bytes(info.size(kind)), CACHE_KINDS[kind]]
                for kind in CACHE_KINDS]
        rows.append(["total", str(info.total_files), human_bytes(info.total_bytes), ""])
        print(plain_table(["kind", "files", "size", "what"], rows, align="lrrl"))
        if info.other:
            print(f"({len(info.other)} other file(s) in the folder are not qenv's: --clear leaves them)")
        return 0
    info = clear_cache()
    print(_where(info.folder))
    print(f"removed {info.total_files} file(s), {human_bytes(info.total_bytes)}"
          + (f"; left {len(info.other)} file(s) that are not qenv's" if info.other else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run a command; returns the exit status (0 done, 2 bad input)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] != "cache" and not args[0].startswith("-") and \
            (args[0] in OWN_COMMANDS or args[0] in installed_commands()):
        return run_cli(lambda: run_command(args[0], args[1:]))
    return run_cli(lambda: _body(argv))


if __name__ == "__main__":
    sys.exit(main())
