"""Shared test fixtures: where the real data lives, and skips when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORIES_BIN = DATA_DIR / "stories260K" / "stories260K.bin"
WIKITEXT_TEST = DATA_DIR / "wikitext-2" / "test.txt"
BUILTIN_DEFAULT = Path(__file__).resolve().parents[1] / "qenv" / "models" / "builtin" / "wikitext-llama"


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
