"""Shared test fixtures: where the real data lives, and skips when it is absent.

Two tiers, like transformers' ``RUN_SLOW``. ``python -m pytest -q`` (the README's and CI's command) runs
the default tier: every unit-level test and at least one real end-to-end test of each consumer and
program path, under 8 minutes on a 2-core machine. Tests marked ``@pytest.mark.slow`` (or a module's
``pytestmark = pytest.mark.slow``) form the extended tier: the SmolLM2 runs, the full parametrizations,
the benchmarks' scripts, the longer trainings and searches. They are skipped unless ``--run-slow`` or
``QENV_SLOW_TESTS=1`` is given: ``python -m pytest -q --run-slow`` runs everything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORIES_BIN = DATA_DIR / "stories260K" / "stories260K.bin"
WIKITEXT_TEST = DATA_DIR / "wikitext-2" / "test.txt"
TINYSTORIES = DATA_DIR / "tinystories" / "TinyStories-valid-first1000.txt"
REPO = Path(__file__).resolve().parents[1]
BUILTIN_DEFAULT = REPO / "qenv" / "models" / "builtin" / "wikitext-llama"

#: The reason every skipped extended-tier test reports (one line of ``-ra``'s summary for all of them)
EXTENDED_TIER_SKIP = "extended tier (@pytest.mark.slow): run with --run-slow or QENV_SLOW_TESTS=1"


def pytest_addoption(parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the extended tier (tests marked slow); QENV_SLOW_TESTS=1 does the same")


def run_slow_tests(config) -> bool:
    """Whether this session runs the extended tier: ``--run-slow`` or ``QENV_SLOW_TESTS`` set to a true value."""
    flag = os.environ.get("QENV_SLOW_TESTS", "").strip().lower()
    return bool(config.getoption("--run-slow")) or flag in ("1", "true", "yes", "on")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """Skip an extended-tier test before any of its fixtures is built (a skipped module builds nothing).

    Raised here rather than added as a skip marker so that ``-ra`` sums them up in one line."""
    if item.get_closest_marker("slow") is not None and not run_slow_tests(item.config):
        pytest.skip(EXTENDED_TIER_SKIP)


def extended_beyond(values, kept, unpack: bool = False) -> list:
    """``values`` for ``pytest.mark.parametrize`` with every value but those in ``kept`` marked ``slow``:
    the representative cases run in the default tier, the full parametrization with ``--run-slow``.
    ``unpack``: each value is a tuple of several argument names' values."""
    def param(value):
        return pytest.param(*value, marks=pytest.mark.slow) if unpack else pytest.param(value, marks=pytest.mark.slow)

    missing = [k for k in kept if k not in values]
    assert not missing, f"representative cases {missing} are not among the parametrization's values"
    return [value if value in kept else param(value) for value in values]


@pytest.fixture(scope="session")
def stories_bin() -> Path:
    if not STORIES_BIN.is_file():
        pytest.skip(f"real data missing: {STORIES_BIN} (../shared/data beside the repo)")
    return STORIES_BIN


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    if not WIKITEXT_TEST.is_file():
        pytest.skip(f"real data missing: {WIKITEXT_TEST} (../shared/data beside the repo)")
    return WIKITEXT_TEST


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    if not (BUILTIN_DEFAULT / "config.json").is_file():
        pytest.skip(f"embedded default model missing at {BUILTIN_DEFAULT}")
    return BUILTIN_DEFAULT


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The models under test are tiny: one intra-op thread is several times faster than two on a
    busy 2-core machine, and results do not depend on it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def require(path: Path, what: str) -> None:
    """Skip the calling test with a clear reason when a real-data file is missing."""
    if not path.exists():
        pytest.skip(f"{what} missing at {path} (../shared/data must sit beside the repo)")


def load_script(name: str):
    """Import one of the repository's programs (``train_agent``, ``eval_agent``) as a module."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"qenv_script_{name}", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import does: a dataclass of the program finds its module
    spec.loader.exec_module(module)
    return module


def run_main(module, argv: list) -> int:
    """``module.main(argv)`` in this process, restoring the torch thread count it changes."""
    import os

    import torch

    threads = torch.get_num_threads()
    env_threads = os.environ.get("QENV_TORCH_THREADS")
    try:
        return module.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
        if env_threads is None:
            os.environ.pop("QENV_TORCH_THREADS", None)
        else:
            os.environ["QENV_TORCH_THREADS"] = env_threads


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A qenv cache folder shared by one test module (set as $QENV_CACHE_DIR while it runs)."""
    import os

    folder = tmp_path_factory.mktemp("qenv-cache")
    old = os.environ.get("QENV_CACHE_DIR")
    os.environ["QENV_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("QENV_CACHE_DIR", None)
    else:
        os.environ["QENV_CACHE_DIR"] = old


def clear_error(err: "pytest.ExceptionInfo", *words: str) -> str:
    """One QenvError naming the problem (``words``) and a fix, with no traceback chained behind it."""
    e = err.value
    text = str(e)
    assert e.problem and e.fix, text
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__), "chained traceback"
    for word in words:
        assert word.lower() in text.lower(), f"{word!r} not in {text!r}"
    return text


@pytest.fixture(scope="session")
def tiny_env():
    """A maker of cheap QuantLLM-v0 envs on a tiny built-in model (256 tokens of 32, no disk cache),
    one per (kind, model, budget, options) for the whole session: tests of an action kind's
    semantics share them instead of measuring the same model again. Reset one before use; the
    fixture closes them at the end of the session."""
    import gymnasium as gym

    import qenv  # noqa: F401  (registers QuantLLM-v0)

    made = {}

    def make(kind: str = "discrete", model: str = "tiny-llama", budget_bpw: float = 3.0, **options):
        key = (kind, model, budget_bpw, repr(sorted(options.items())))
        if key not in made:
            made[key] = gym.make("QuantLLM-v0", model=model, action_kind=kind, budget_bpw=budget_bpw, n_tokens=256,
                                 seq_len=32, cache_dir=False, **options).unwrapped
        return made[key]

    yield make
    for env in made.values():
        env.close()


#: A PPO config of a few steps on the residual kind: the programs' runs of the transfer tests
TINY_ZOO_CONFIG = """\
QuantLLM-v0:
  n_timesteps: 64
  policy: MlpPolicy
  n_steps: 32
  batch_size: 32
  n_epochs: 1
  policy_kwargs: {net_arch: [16]}
  env_kwargs: {action_kind: residual}
"""


@pytest.fixture(scope="session")
def zoo_run(stories_bin, tmp_path_factory):
    """A policy trained on a zoo (stories260K and tiny-llama), then fine-tuned on tiny-qwen2: one run
    for the program tests (tests/test_transfer_programs.py) and the bench scripts' (tests/bench/)."""
    train_agent = load_script("train_agent")
    root = tmp_path_factory.mktemp("zoo")
    (root / "tiny.yaml").write_text(TINY_ZOO_CONFIG)
    args = ["--config", root / "tiny.yaml", "--logdir", root, "--no-progress", "--env-kwargs", "n_tokens=256",
            "seq_len=32", "cache_dir=false"]
    assert run_main(train_agent, ["--model", stories_bin, "--model", "tiny-llama", "--name", "zoo", *args]) == 0
    assert run_main(train_agent, ["--init-from", root / "zoo" / "model.zip", "--model", "tiny-qwen2",
                                  "--name", "ft", "--timesteps", 32, *args]) == 0
    return root
