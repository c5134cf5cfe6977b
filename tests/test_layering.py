"""The layout's one-way imports: the library (``qenv/``) never imports the programs' layer, and the
agents install as ``qenv.agents`` only (a top-level ``agents`` package would shadow other
distributions', e.g. the OpenAI Agents SDK)."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ("agents", "qenv.agents", "train_agent", "eval_agent")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)]
    return found


def test_library_never_imports_the_programs_layer() -> None:
    offenders = [f"{path.relative_to(REPO)}:{line} imports {name}"
                 for path in sorted((REPO / "qenv").rglob("*.py"))
                 for line, name in _imports(path)
                 if any(name == p or name.startswith(p + ".") for p in PROGRAMS)]
    assert offenders == []


def test_agents_import_as_qenv_agents_only() -> None:
    for path in sorted(REPO.rglob("*.py")):
        if ".git" in path.parts or "build" in path.parts:
            continue
        bad = [(line, name) for line, name in _imports(path) if name == "agents" or name.startswith("agents.")]
        assert bad == [], f"{path.relative_to(REPO)} imports the bare 'agents' package: {bad}"
    import qenv.agents

    assert Path(qenv.agents.__file__).resolve().parent == REPO / "agents"
    # run from outside the repository, without PYTHONPATH, so the checkout's own folder is not on sys.path
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('agents') is not None)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert subprocess.run([sys.executable, "-c", probe], cwd="/", env=env, check=False).returncode == 0, \
        "a top-level 'agents' module is importable after installing qenv"
    assert importlib.util.find_spec("qenv.agents.registry") is not None


def _module_imports() -> dict[str, set[str]]:
    """Each ``qenv`` module's imports of other ``qenv`` modules, at any depth of the file (lazy and
    ``TYPE_CHECKING`` imports included: a circle hidden in a function is still a circle).
    ``from package import submodule`` counts as an import of the submodule."""
    modules = {}
    for path in sorted((REPO / "qenv").rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [s for s in subs if s in modules] or [node.module]
            else:
                continue
            edges[name] |= {t for t in targets if t in modules and t != name}
    return edges


def test_no_import_circle_in_the_library() -> None:
    """Imports point one way inside ``qenv`` too: no module reaches itself through others (the env's
    features and allocation, export and export_gguf, the evaluator and its reference were circles)."""
    edges = _module_imports()
    circles = []
    for start in edges:
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    circles.append(" -> ".join(path + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert circles == []


def test_no_library_file_is_over_600_lines() -> None:
    """Rooms of one job each: the env's hall (quant_llm.py, 1,112 lines) was split into its task,
    config, kinds and rendering; no file of the library grows past 600 lines again."""
    long = {str(p.relative_to(REPO)): n for p in sorted((REPO / "qenv").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


@pytest.mark.slow
def test_a_second_checkout_is_told_it_would_run_the_first_ones_agents(tmp_path) -> None:
    """The editable install maps ``qenv.agents`` to the checkout it was installed from: a second
    checkout run with the same python imports its own ``qenv/`` but that first ``agents/``, so edits to
    its own agents/ silently did nothing. A copy of this checkout in tmp_path (not installed) is such a
    second checkout: its programs and ``import qenv.agents`` say so in one line, exit 2."""
    import shutil

    import qenv.agents

    if Path(qenv.agents.__file__).resolve().parent != REPO / "agents":
        import pytest

        pytest.skip("qenv.agents is not this checkout's agents/ (not an editable install of it)")
    second = tmp_path / "second-checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "qenv", second / "qenv", ignore=ignore)
    shutil.copytree(REPO / "agents", second / "agents", ignore=ignore)
    for script in ("train_agent.py", "eval_agent.py"):
        shutil.copy2(REPO / script, second / script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "train_agent.py", "--help"], cwd=second, env=env, capture_output=True,
                         text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, (out.returncode, out.stderr[-2000:])
    assert lines[0].startswith("error: ") and str(second / "qenv") in lines[0] and str(REPO / "agents") in lines[0]
    assert "pip install -e ." in lines[0], lines[0]
    # `python -m qenv quantize` (its code lives in agents/) and the library's own `import qenv.agents`
    # refuse too, before any of the other checkout's agents run (one process: each start imports torch)
    probe = ("import sys; from qenv.__main__ import main; print('status', main(['quantize', '--help']), flush=True); "
             "import qenv.agents")
    out = subprocess.run([sys.executable, "-c", probe], cwd=second, env=env, capture_output=True, text=True,
                         timeout=300)
    assert "status 2" in out.stdout, (out.stdout, out.stderr[-2000:])
    first = out.stderr.splitlines()[0]
    assert first.startswith("error: ") and "pip install -e ." in first and str(REPO / "agents") in first
    assert out.returncode != 0 and "QenvError" in out.stderr.splitlines()[-1], out.stderr[-2000:]
