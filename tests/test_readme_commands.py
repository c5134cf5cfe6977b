"""Every command of the README runs as written, and every relative link in it resolves.

The fenced ```bash blocks are read from README.md itself (as tests/test_readme_ci.py reads the
set-up), so a renamed flag, a moved file or a command out of order fails here, not in a user's
shell:

- each program command (``train_agent.py``, ``eval_agent.py``, ``python -m qenv ...``,
  ``scripts/gguf_perplexity.py``, rl-zoo3) is parsed by that program's own argument parser with
  the README's arguments, unchanged: every flag exists and every value is accepted;
- every path it names exists in the repository (or in ``../shared/data``), or is written by an
  earlier command of the README (``--name``'s run folder, ``--out``);
- the cheap ones really run: ``--help``, ``python -m qenv cache --info``, a run with a small
  ``--timesteps`` (with ``QENV_CACHE_DIR`` in a temporary folder, the arguments as written), and
  the Python example.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DATA_DIR, load_script

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
#: flags whose value is a file or folder a command writes, not one it reads
OUTPUT_FLAGS = {"--out", "--save-model", "--logdir"}
#: the largest --timesteps run for real here (a plug-in's few episodes on the embedded model)
CHEAP_TIMESTEPS = 1024


def bash_commands(markdown: str) -> list[str]:
    """The commands of every fenced ```bash block, in order: ``\\``-continued lines joined, comments
    dropped, ``&&`` chains split."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def program(argv: list[str]) -> str | None:
    """Which program a README command runs (None for pip, which tests/test_readme_ci.py checks)."""
    argv = ["python" if a == "python3" else a for a in argv]
    if argv[:1] == ["pip"] or argv[:3] == ["python", "-m", "pip"]:
        return "pip"
    if argv[:3] == ["python", "-m", "pytest"]:
        return "pytest"
    if argv[:2] == ["python", "train_agent.py"]:
        return "train_agent"
    if argv[:2] == ["python", "eval_agent.py"]:
        return "eval_agent"
    if argv[:4] == ["python", "-m", "qenv", "quantize"]:
        return "quantize"
    if argv[:3] == ["python", "-m", "qenv"]:
        return "qenv"
    if argv[:2] == ["python", "scripts/gguf_perplexity.py"]:
        return "gguf_perplexity"
    if argv[:3] == ["python", "-m", "rl_zoo3.train"]:
        return "rl_zoo3"
    return None


def program_arguments(argv: list[str]) -> list[str]:
    """The arguments after the program itself (``python X.py`` or ``python -m X [command]``)."""
    kind = program(argv)
    return argv[4:] if kind == "quantize" else argv[3:] if kind in ("qenv", "rl_zoo3") else argv[2:]


class _Parsed(Exception):
    """Raised by the captured ``parse_args`` so the program stops right after parsing."""


def parse_inside(run: Callable[[], object], argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with the parser a program builds inside its own main (``gguf_perplexity.py``,
    rl-zoo3's ``train()``): the real parser and its real ``parse_args``, stopped before any work."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, argv, namespace))

    with pytest.MonkeyPatch.context() as patch, pytest.raises(_Parsed) as parsed:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        run()
    return parsed.value.args[0]


def parse(argv: list[str]) -> argparse.Namespace:
    """The README command's arguments, parsed by its program's own parser (a bad flag raises)."""
    kind, args = program(argv), program_arguments(argv)
    if kind in ("train_agent", "eval_agent"):
        return load_script(kind).build_parser().parse_args(args)
    if kind == "quantize":
        from qenv.agents.quantize import build_parser

        return build_parser().parse_args(args)
    if kind == "qenv":
        from qenv.__main__ import build_parser

        return build_parser().parse_args(args)
    if kind == "gguf_perplexity":
        spec = importlib.util.spec_from_file_location("readme_gguf_perplexity", REPO / "scripts" / "gguf_perplexity.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        return parse_inside(lambda: script.main(args), args)
    if kind == "rl_zoo3":
        pytest.importorskip("rl_zoo3", reason="rl-zoo3 is the 'zoo' extra")
        from rl_zoo3.train import train

        return parse_inside(train, args)
    raise AssertionError(f"the README runs a program this test does not know: {shlex.join(argv)}")


def outputs_of(argv: list[str]) -> list[str]:
    """Paths a command writes: its ``--out``/``--save-model`` folders and ``train_agent.py``'s run
    folder (``--logdir``/``--name``)."""
    written = [argv[i + 1].rstrip("/") for i, a in enumerate(argv[:-1]) if a in OUTPUT_FLAGS]
    if program(argv) == "train_agent" and "--name" in argv:
        logdir = argv[argv.index("--logdir") + 1] if "--logdir" in argv else "runs"
        written.append(f"{logdir.rstrip('/')}/{argv[argv.index('--name') + 1]}")
    return written


def paths_read(argv: list[str]) -> list[str]:
    """The arguments that name a file or folder the command reads (plug-ins ``file.py:Class`` by
    their file), leaving out what it writes and URLs."""
    args = program_arguments(argv)
    skip = {i + 1 for i, a in enumerate(args[:-1]) if a in OUTPUT_FLAGS or a == "--name"}
    found = []
    for i, arg in enumerate(args):
        if i in skip or arg.startswith("-") or "://" in arg:
            continue
        path = arg.split(":", 1)[0] if re.search(r"\.py:\w+$", arg) else arg
        if "/" in path or re.search(r"\.(py|yaml|yml|bin|gguf|txt|zip|json)$", path):
            found.append(path)
    return found


def missing_paths(argv: list[str], written_before: list[str]) -> list[str]:
    """Paths the command reads that neither exist nor come from an earlier README command."""
    missing = []
    for path in paths_read(argv):
        if path.startswith("../shared/") and not DATA_DIR.is_dir():
            continue  # the real data is absent here: the data tests skip, so does this check
        target = (REPO / path).resolve() if not path.startswith("../shared/") else \
            DATA_DIR.parent / path.removeprefix("../shared/")
        made = any(path.rstrip("/") == w or path.startswith(w + "/") for w in written_before)
        if not made and not target.exists():
            missing.append(path)
    return missing


def runs_here(argv: list[str]) -> bool:
    """Cheap enough to really run in the test suite."""
    if "--help" in argv or program(argv) == "qenv":
        return True
    if "--timesteps" in argv:
        return int(argv[argv.index("--timesteps") + 1]) <= CHEAP_TIMESTEPS
    return False


COMMANDS = bash_commands(README.read_text(encoding="utf-8"))
PROGRAM_COMMANDS = [(i, c) for i, c in enumerate(COMMANDS) if program(shlex.split(c)) not in ("pip", "pytest")]


def test_the_readme_has_the_commands_a_user_needs() -> None:
    """The extraction is not vacuous: training, evaluation, export and a plug-in are all there."""
    kinds = {program(shlex.split(c)) for c in COMMANDS}
    assert {"pip", "pytest", "train_agent", "eval_agent", "quantize", "qenv", "rl_zoo3"} <= kinds, kinds
    assert any(runs_here(shlex.split(c)) and "--timesteps" in c for c in COMMANDS), \
        "no README command is cheap enough to run for real"
    assert len(python_blocks(README.read_text(encoding="utf-8"))) == 1


def test_the_readme_stays_a_guide_of_at_most_300_lines() -> None:
    """Experiment history belongs in BENCHMARKS.md; the README is the user's guide (issue 27)."""
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines: move detail to BENCHMARKS.md or docs/"


@pytest.mark.parametrize("index,command", PROGRAM_COMMANDS, ids=[c[:70] for _, c in PROGRAM_COMMANDS])
def test_readme_command_parses_and_names_existing_paths(index: int, command: str) -> None:
    argv = shlex.split(command)
    try:
        parse(argv)
    except SystemExit as stop:  # --help prints and exits 0
        assert stop.code == 0 and "--help" in argv, f"{command!r} exited {stop.code}"
    written_before = [w for earlier in COMMANDS[:index] for w in outputs_of(shlex.split(earlier))]
    assert missing_paths(argv, written_before) == [], \
        f"{command!r} names paths that neither exist nor are written by an earlier README command"


def test_install_extras_exist() -> None:
    """Every extra a README install names is one pyproject.toml declares."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for command in COMMANDS:
        for extras in re.findall(r"\.\[([^\]]*)\]", command):
            assert {e.strip() for e in extras.split(",")} <= declared, command


def test_the_checks_see_a_wrong_flag_and_a_missing_path() -> None:
    """The parse and path checks fail where they should: an unknown flag, a path nothing writes."""
    from qenv.errors import QenvError

    with pytest.raises(QenvError, match="--no-such-flag"):
        parse(["python", "train_agent.py", "--no-such-flag"])
    with pytest.raises(SystemExit):  # rl-zoo3's own parser: argparse's usage error
        parse(["python", "-m", "rl_zoo3.train", "--no-such-flag"])
    argv = ["python", "eval_agent.py", "--policy", "runs/never-trained/model.zip"]
    assert missing_paths(argv, ["runs/other"]) == ["runs/never-trained/model.zip"]
    assert missing_paths(argv, ["runs/never-trained"]) == []
    assert missing_paths(["python", "train_agent.py", "--agent", "docs/examples/nope.py:X"], []) == \
        ["docs/examples/nope.py"]
    anchors = github_anchors("# A `b` (c, d): e's f\n```\n# not a heading\n```\n## A `b` (c, d): e's f\n")
    assert anchors == {"a-b-c-d-es-f", "a-b-c-d-es-f-1"}


@pytest.mark.parametrize("command", [c for c in COMMANDS if runs_here(shlex.split(c)) and "--timesteps" not in c])
def test_cheap_readme_command_runs(command: str, tmp_path, monkeypatch, capsys) -> None:
    """``--help`` and ``python -m qenv cache --info`` run in this process, as written."""
    argv = shlex.split(command)
    monkeypatch.setenv("QENV_CACHE_DIR", str(tmp_path / "cache"))
    kind, args = program(argv), program_arguments(argv)
    if kind in ("train_agent", "eval_agent"):
        main = load_script(kind).main
    elif kind == "quantize":
        from qenv.agents.quantize import main
    else:
        from qenv.__main__ import main
    try:
        status = main(args)
    except SystemExit as stop:
        status = stop.code
    assert status == 0, command
    assert capsys.readouterr().out.strip(), f"{command!r} printed nothing"


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in COMMANDS if runs_here(shlex.split(c)) and "--timesteps" in c])
def test_short_readme_run_trains_as_written(command: str, tmp_path) -> None:
    """A README run with a small --timesteps, as written, in a fresh folder (the repository's files it
    names linked in), with its own cache: it finishes and leaves its run folder."""
    argv = shlex.split(command)
    for path in paths_read(argv):
        top = Path(path).parts[0]
        if top not in ("..", ".") and not (tmp_path / top).exists():
            (tmp_path / top).symlink_to(REPO / top)
    env = {**os.environ, "QENV_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, str(REPO / argv[1]), *argv[2:]], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for folder in outputs_of(argv):
        assert (tmp_path / folder / "summary.json").is_file(), (folder, out.stdout[-2000:])


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch, capsys) -> None:
    """The README's Python example, as written, with the cache in a temporary folder: it plays a whole
    episode within the budget and prints its metrics."""
    monkeypatch.setenv("QENV_CACHE_DIR", str(tmp_path / "cache"))
    code = python_blocks(README.read_text(encoding="utf-8"))[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["done"] and scope["info"]["bpw"] <= 3.0 + 1e-9
    bpw, kl, reference_kl, reward = (float(x) for x in capsys.readouterr().out.split())
    assert kl > 0 and reference_kl > 0 and bpw == scope["info"]["bpw"]


def test_readme_numbers_come_from_benchmarks() -> None:
    """Every measured number of the README's prose and tables (two or more decimals: KL, ratios, bpw,
    speed-ups) is in BENCHMARKS.md, where its machine and command are: the README only quotes."""
    readme = re.sub(r"^```.*?^```", "", README.read_text(encoding="utf-8"), flags=re.S | re.M)
    readme = re.sub(r"(?i)(python|torch)\s*(≥|>=|==)\s*[\d.]+", "", readme)  # versions, not measurements
    benchmarks = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    numbers = set(re.findall(r"(?<![\w.])\d+\.\d{2,}(?![\w.])", readme))
    assert len(numbers) >= 20, numbers  # the results tables are there
    assert sorted(n for n in numbers if n not in benchmarks) == []


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a file's headings (fenced code skipped): lower case, punctuation
    dropped, spaces to hyphens, repeats numbered -1, -2, ..."""
    anchors: set[str] = set()
    in_fence = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        match = None if in_fence else re.match(r"#{1,6} (.*)", line)
        if match:
            base = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchor, n = base, 0
            while anchor in anchors:
                n += 1
                anchor = f"{base}-{n}"
            anchors.add(anchor)
    return anchors


@pytest.mark.parametrize("document", ["README.md", "BENCHMARKS.md", "bench/experiments/README.md", "docs/custom_agent.md",
                                      "docs/llama_cpp_repack_crash.md"])
def test_relative_links_resolve(document: str) -> None:
    """Every relative link of the document names a file of the repository and, with #anchor, one of
    its headings."""
    source = REPO / document
    text = source.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file_part, _, anchor = target.partition("#")
        path = (source.parent / file_part).resolve() if file_part else source
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in github_anchors(path.read_text(encoding="utf-8")):
            broken.append(target)
    assert broken == [], f"{document}: links that do not resolve: {broken}"
