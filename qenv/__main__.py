"""``python -m qenv``: small maintenance commands.

    python -m qenv cache --info     where the cache is, and what it holds (files, sizes per kind)
    python -m qenv cache --clear    delete qenv's cache files (recomputed when needed again)

The cache folder is ``$QENV_CACHE_DIR``, else ``~/.cache/qenv`` (see :mod:`qenv.cache`).
"""

from __future__ import annotations

import os
import sys

from qenv.cli.common import ArgumentParser, plain_table, run_cli


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
    return run_cli(lambda: _body(argv))


if __name__ == "__main__":
    sys.exit(main())
