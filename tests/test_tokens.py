"""Document separators in text become document boundaries, as the model's tokenizer defines them.

TinyStories joins its stories with ``<|endoftext|>``: read literally that is a dozen tokens a
llama2.c model never saw. These tests pin that :func:`tokens_from_text` (the one tokenisation path of
the env, ``eval_agent.py`` and ``bench/``) gives exactly llama2.c's own pretokenisation, BOS + story,
and that library paths print neither transformers' "Loading weights" bar nor its sequence-length
warning.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qenv.eval.tokens import DOCUMENT_SEPARATORS, split_documents, tokens_from_text
from qenv.models.loading import LoadedModel, load_model
from conftest import REPO, STORIES_BIN, TINYSTORIES, WIKITEXT_TEST, require

SEP = "<|endoftext|>"


@pytest.fixture(scope="module")
def stories() -> LoadedModel:
    require(STORIES_BIN, "stories260K llama2.c checkpoint")
    return load_model(STORIES_BIN)


@pytest.fixture(scope="module")
def sp():
    sentencepiece = pytest.importorskip("sentencepiece")
    require(STORIES_BIN, "stories260K llama2.c checkpoint")
    return sentencepiece.SentencePieceProcessor(model_file=str(STORIES_BIN.parent / "tok512.model"))


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_tinystories_tokens_are_llama2c_pretokenisation(stories: LoadedModel, sp) -> None:
    require(TINYSTORIES, "TinyStories validation text")
    n = 4096
    tokens = tokens_from_text(stories.tokenizer, TINYSTORIES, n_tokens=n, seq_len=256)
    ids = tokens.ids.flatten().tolist()
    # llama2.c's pretokenisation of TinyStories: every story is [BOS] + sentencepiece(story.strip()).
    stories_text = [s.strip() for s in TINYSTORIES.read_text(encoding="utf-8").split(SEP) if s.strip()]
    expected: list[int] = []
    for story in stories_text:
        expected += [sp.bos_id()] + sp.encode(story)
        if len(expected) >= n:
            break
    assert ids == expected[:n]
    # No literal separator: neither its token sequence nor its text survives.
    literal = stories.tokenizer(SEP, add_special_tokens=False)["input_ids"]
    assert len(literal) > 5 and not _contains(ids, literal)
    assert SEP not in stories.tokenizer.decode(ids)
    # Each document starts with BOS: one BOS per story started within the window, the first at 0.
    assert ids[0] == stories.tokenizer.bos_token_id == 1
    starts = [i for i, t in enumerate(ids) if t == 1]
    assert len(starts) >= 5
    for k, start in enumerate(starts):
        assert sp.decode(ids[start + 1:start + 12]) == sp.decode(sp.encode(stories_text[k])[:11])


def test_separators_anywhere_and_empty_documents(stories: LoadedModel, tmp_path: Path) -> None:
    text = f"One day a cat sat.\n{SEP}\n\n{SEP}\nThe dog ran home.{SEP}A bird sang. " * 40
    path = tmp_path / "docs.txt"
    path.write_text(text, encoding="utf-8")
    ids = tokens_from_text(stories.tokenizer, path, n_tokens=256, seq_len=64).ids.flatten().tolist()
    docs = split_documents(text)
    assert docs[:3] == ["One day a cat sat.", "The dog ran home.", "A bird sang. One day a cat sat."]
    expected = [t for d in docs for t in stories.tokenizer(d)["input_ids"]]  # BOS + document, as llama2.c
    assert ids == expected[:256]
    assert split_documents("no separator here") is None and SEP in DOCUMENT_SEPARATORS


def test_running_text_without_separators_is_unchanged(stories: LoadedModel) -> None:
    require(WIKITEXT_TEST, "WikiText-2 test split")
    ids = tokens_from_text(stories.tokenizer, WIKITEXT_TEST, n_tokens=512, seq_len=128).ids.flatten().tolist()
    text = WIKITEXT_TEST.read_text(encoding="utf-8")
    assert ids == stories.tokenizer(text[:10000], add_special_tokens=False)["input_ids"][:512]
    assert 1 not in ids  # running text: no BOS inserted


def test_a_tokenizer_without_framing_ends_documents_with_eos(tmp_path: Path) -> None:
    """GPT-2-style tokenizers add no special token: documents are joined by their EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "a": 2, "b": 3, "c": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    assert tok("a b", add_special_tokens=True)["input_ids"] == [2, 3]  # frames nothing itself
    path = tmp_path / "docs.txt"
    path.write_text(f"a b\n{SEP}\nc\n{SEP}\n" * 8, encoding="utf-8")
    ids = tokens_from_text(tok, path, n_tokens=12, seq_len=6).ids.flatten().tolist()
    assert ids == [2, 3, 1, 4, 1] * 2 + [2, 3]


def test_bench_quality_uses_the_library_tokenisation(tmp_path: Path) -> None:
    """bench/bench_quality.py scores TinyStories through tokens_from_text, not a stripped copy of its own."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_quality_t", REPO / "bench" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data_dir = TINYSTORIES.parents[1]
    calib, held_out = module.corpus_files("tinystories", data_dir, tmp_path)
    assert calib is None and Path(held_out) == TINYSTORIES
    assert not any(tmp_path.iterdir())


def test_library_paths_are_quiet(stories_bin: Path, default_model_dir: Path, capfd) -> None:
    """No "Loading weights" bar on a local model and no sequence-length warning on long text;
    the user's own transformers progress-bar setting is left as it was."""
    require(WIKITEXT_TEST, "WikiText-2 test split")
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()  # the programs, run in-process by other tests, turn it off
    hf_logging.enable_progress_bar()
    try:
        capfd.readouterr()
        lm = load_model("default")
        assert hf_logging.is_progress_bar_enabled()
        tokens_from_text(lm.tokenizer, WIKITEXT_TEST, n_tokens=2048, seq_len=256)  # > model_max_length at once
        stories = load_model(stories_bin)
        tokens_from_text(stories.tokenizer, WIKITEXT_TEST, n_tokens=2048, seq_len=256)
        err = capfd.readouterr().err
    finally:
        if not was_enabled:
            hf_logging.disable_progress_bar()
    assert "Loading weights" not in err and "Token indices" not in err, err
    # Without verbose=False the same call would have warned (so the check above can fail).
    stories.tokenizer(WIKITEXT_TEST.read_text(encoding="utf-8")[:20000])
    assert stories.tokenizer.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")
