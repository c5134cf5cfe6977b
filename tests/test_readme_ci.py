"""The README's set-up commands are the ones CI runs (`.ci/run`), read from both files.

Compared generally, not against fixed strings: every install command of the README's set-up
(other than installing torch itself, which CI pins first) must be in `.ci/run` and the other way
round, extras compared as sets; the test command must be the same; and CI must install torch
before qenv, as the README's CPU route does.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIP_NOISE = {"--quiet", "-q", "--disable-pip-version-check", "--no-input"}


def setup_commands(readme: str) -> list[list[str]]:
    """Shell commands (as argument lists) of the fenced bash blocks of the README's "Set-up" section."""
    match = re.search(r"^## Set-up\n(.*?)(?=^## )", readme, flags=re.S | re.M)
    assert match, "README.md has no '## Set-up' section"
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", match.group(1), flags=re.S):
        commands += shell_commands(block)
    return commands


def shell_commands(script: str) -> list[list[str]]:
    """Commands of a shell script: lines and '&&' chains split, comments and shell settings dropped."""
    commands = []
    for line in script.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            argv = shlex.split(part)
            if argv and argv[0] not in ("set", "cd"):
                commands.append(argv)
    return commands


def normalise(argv: list[str]) -> list[str]:
    """``python -m pip ...`` -> ``pip ...`` without output-only flags; ``python3`` -> ``python``."""
    argv = ["python" if a in ("python3", '"$PYTHON"', "$PYTHON") else a for a in argv]
    if argv[:3] == ["python", "-m", "pip"]:
        argv = ["pip"] + argv[3:]
    if argv[:1] == ["pip"]:
        argv = [a for a in argv if a not in PIP_NOISE]
    return argv


def is_pip_install(argv: list[str]) -> bool:
    return argv[:2] == ["pip", "install"]


def installs_torch_only(argv: list[str]) -> bool:
    """``pip install torch==X`` or ``pip install torch --index-url ...``: the torch build, chosen separately."""
    packages = [a for a in argv[2:] if not a.startswith("-") and "://" not in a]
    return bool(packages) and all(re.match(r"torch\b", p) for p in packages)


def editable_extras(argv: list[str]) -> tuple[list[str], frozenset[str]] | None:
    """(the command without the target, the extras) of ``pip install [...] -e ".[a,b]"``."""
    for i, arg in enumerate(argv):
        target = argv[i + 1] if arg == "-e" and i + 1 < len(argv) else None
        if target is not None:
            m = re.fullmatch(r"\.(?:\[([^\]]*)\])?", target)
            assert m, f"unexpected editable target {target!r}"
            extras = frozenset(e.strip() for e in (m.group(1) or "").split(",") if e.strip())
            return argv[:i] + argv[i + 2:], extras
    return None


def install_signature(argv: list[str]) -> tuple:
    """A comparable form of an install command: flags and packages, with extras as a set."""
    editable = editable_extras(argv)
    if editable is not None:
        rest, extras = editable
        return ("editable", tuple(rest), extras)
    return ("packages", tuple(argv))


def parse() -> tuple[list[list[str]], list[list[str]]]:
    readme = [normalise(c) for c in setup_commands((REPO / "README.md").read_text(encoding="utf-8"))]
    ci = [normalise(c) for c in shell_commands((REPO / ".ci" / "run").read_text(encoding="utf-8"))]
    return readme, ci


def test_ci_installs_what_the_readme_installs() -> None:
    readme, ci = parse()
    readme_installs = {install_signature(c) for c in readme if is_pip_install(c) and not installs_torch_only(c)}
    ci_installs = {install_signature(c) for c in ci if is_pip_install(c) and not installs_torch_only(c)}
    assert any(sig[0] == "editable" for sig in readme_installs), "the README's set-up installs no `-e .[...]`"
    assert readme_installs == ci_installs, (
        f"README installs {sorted(map(str, readme_installs))} but .ci/run installs {sorted(map(str, ci_installs))}")
    # every editable install in the README names the same extras (the CPU route repeats the line)
    assert len({sig[2] for sig in readme_installs if sig[0] == "editable"}) == 1


def test_ci_runs_the_readme_test_command() -> None:
    readme, ci = parse()
    readme_tests = [c for c in readme if "pytest" in " ".join(c)]
    ci_tests = [c for c in ci if "pytest" in " ".join(c)]
    assert len(readme_tests) == 1, f"the README's set-up should give one test command, got {readme_tests}"
    assert ci_tests == readme_tests, f".ci/run runs {ci_tests}, the README says {readme_tests}"


def test_torch_comes_first_and_the_cpu_route_is_the_standard_index() -> None:
    readme, ci = parse()
    ci_torch = [i for i, c in enumerate(ci) if is_pip_install(c) and installs_torch_only(c)]
    ci_qenv = [i for i, c in enumerate(ci) if is_pip_install(c) and editable_extras(c) is not None]
    assert ci_torch and ci_qenv and max(ci_torch) < min(ci_qenv), "CI must choose the torch build before qenv"
    cpu = [c for c in readme if is_pip_install(c) and installs_torch_only(c)]
    assert cpu, "the README gives CPU-only users no torch install line"
    assert all(c[c.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu" for c in cpu)
    # no README line claims a plain PyPI torch pin is the CPU build
    assert not any(re.fullmatch(r"torch==[\d.]+", a) for c in cpu for a in c)


def test_the_parser_sees_a_difference() -> None:
    """The comparison is not vacuous: changed extras or a changed test command are caught."""
    readme, ci = parse()
    editable = next(c for c in readme if is_pip_install(c) and editable_extras(c) is not None)
    changed = [a.replace("[", "[extra-x,") if a.startswith(".[") else a for a in editable]
    assert install_signature(changed) != install_signature(editable)
    reordered = [a if not a.startswith(".[") else ".[" + ",".join(sorted(editable_extras(editable)[1],
                                                                         reverse=True)) + "]" for a in editable]
    assert install_signature(reordered) == install_signature(editable)
    assert normalise(shlex.split("python -m pip install --quiet -e .[test]")) == ["pip", "install", "-e", ".[test]"]
