"""Issue 28, damaged caches and resources: a cache file is input, never trusted as it is.

Every cache kind (reference, sampled tokens, features, per-rule errors) is damaged in every way a
disk or a person can damage it (zero-filled by a power cut, zero-filled past its header, a flipped
bit, truncated, NaN or out-of-vocabulary ids written with a valid checksum): each is detected, said
once, removed and recomputed to exactly the clean values; nothing damaged is scored. Then: the
reference's long key (many batches), the reference's size refused up front, the thread cap, text
streamed rather than read whole, and a searcher that misses the budget listed apart.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import load_script, run_main

from qenv.cache_files import CacheWarning, read_cache_file, write_cache_file
from qenv.errors import QenvError

SEQ_LEN = 32
N_TOKENS = 256


@pytest.fixture(scope="module")
def loaded(stories_bin):
    from qenv.models.loading import load_model

    return load_model(str(stories_bin))


# -- each cache kind: how to build it, where its file is, how to read back what it holds ---------------------
def _tokens(loaded, folder):
    from qenv.envs.task import make_tokens

    return make_tokens(loaded, None, N_TOKENS, SEQ_LEN, 0, folder)


def _evaluator(loaded, folder):
    from qenv.eval.evaluator import Evaluator

    return Evaluator(loaded, _tokens(loaded, folder), batch_size=4, cache_dir=folder)


def build(kind: str, loaded, folder: Path):
    """Build (or read from ``folder``) the cache of ``kind``; returns what it holds, as numpy."""
    from qenv.eval.sensitivity import rule_errors
    from qenv.envs.features import ladder_rules, static_features

    if kind == "tokens":
        return _tokens(loaded, folder).ids.numpy()
    ev = _evaluator(loaded, folder)
    if kind == "reference":
        ref = ev.reference
        from qenv.quant.presets import preset

        assert ev.evaluate(preset("fp16", ev.layers)).kl == 0.0  # what a damaged reference broke
        return np.concatenate([lp.numpy().ravel() for lp in ref.logprobs]
                              + [cal.hessian.numpy().ravel() for _, cal in sorted(ref.calibration.items())
                                 if cal.hessian is not None])
    if kind == "features":
        return static_features(ev, ev.layers)
    if kind == "errors":
        return rule_errors(ev, ev.layers, ladder_rules())
    raise AssertionError(kind)


def cache_file(kind: str, folder: Path) -> Path:
    files = sorted(folder.glob(f"{kind}-*.safetensors"))
    assert len(files) == 1, files
    return files[0]


def _header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return 8 + size, json.loads(data[8:8 + size])


def _rewrite_with_valid_checksum(path: Path, change) -> None:
    """Rewrite the file through qenv's own writer (a valid checksum) with ``change`` applied to its
    tensors: what a buggy writer or an edit would leave, caught by the semantic checks only."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        key = handle.metadata()["qenv.key"]
        tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}
    change(tensors)
    write_cache_file(path, tensors, key)


def _poison_nan(tensors: dict) -> None:
    name = next(n for n in sorted(tensors) if tensors[n].is_floating_point())
    tensors[name].view(-1)[0] = float("nan")


def _poison_ids(tensors: dict) -> None:
    tensors["ids"].view(-1)[3] = 10**9


def damage(how: str, kind: str, path: Path) -> None:
    data = bytearray(path.read_bytes())
    start, _ = _header(path)
    if how == "zero-filled":  # a power cut after a rename without fsync: the whole file reads as zeros
        path.write_bytes(bytes(len(data)))
    elif how == "zero-payload":  # the header made it to the disk, the data did not
        path.write_bytes(bytes(data[:start]) + bytes(len(data) - start))
    elif how == "bit-flip":
        at = start + (len(data) - start) // 2
        data[at] ^= 0x10
        path.write_bytes(bytes(data))
    elif how == "truncated":
        path.write_bytes(bytes(data[: start + (len(data) - start) // 2]))
    elif how == "nan-or-bad-ids":
        _rewrite_with_valid_checksum(path, _poison_ids if kind == "tokens" else _poison_nan)
    else:
        raise AssertionError(how)


KINDS = ("reference", "tokens", "features", "errors")
DAMAGES = ("zero-filled", "zero-payload", "bit-flip", "truncated", "nan-or-bad-ids")


@pytest.fixture(scope="module")
def clean(loaded, tmp_path_factory):
    """Each kind's values computed once in a fresh cache folder."""
    folder = tmp_path_factory.mktemp("clean-cache")
    return {kind: build(kind, loaded, folder) for kind in KINDS}


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_cache_file_is_recomputed_never_used(kind, how, loaded, clean, tmp_path):
    build(kind, loaded, tmp_path)
    path = cache_file(kind, tmp_path)
    damage(how, kind, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = build(kind, loaded, tmp_path)
    said = [w for w in caught if issubclass(w.category, CacheWarning)]
    assert len(said) == 1, [str(w.message) for w in caught]  # said once, naming the file
    assert str(path) in str(said[0].message) and "recomputed" in str(said[0].message)
    np.testing.assert_array_equal(again, clean[kind])  # the clean values, not the damaged ones
    # the file was rewritten whole: read again, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        np.testing.assert_array_equal(build(kind, loaded, tmp_path), clean[kind])


def test_cache_file_with_another_key_is_not_used(tmp_path):
    """A file whose header names other inputs than the ones asked for (a hash collision, a renamed
    file) is not read."""
    path = tmp_path / "features-x.safetensors"
    write_cache_file(path, {"table": torch.ones(2, 3)}, key="one")
    with pytest.warns(CacheWarning, match="other inputs"):
        assert read_cache_file(path, key="two") is None
    assert not path.exists()


def test_cache_writes_are_synced_before_the_rename(tmp_path, monkeypatch):
    """A rename that reaches the disk before the data is what leaves a zero-filled file after a
    power cut: the file is fsynced before it is renamed, and its folder after."""
    import qenv.io as qio

    order: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        order.append("fsync-dir" if Path(os.readlink(f"/proc/self/fd/{fd}")).is_dir() else "fsync-file")
        real_fsync(fd)

    def replace(src, dst):
        order.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(qio.os, "fsync", fsync)
    monkeypatch.setattr(qio.os, "replace", replace)
    write_cache_file(tmp_path / "tokens-x.safetensors", {"ids": torch.arange(4)}, key="k")
    assert order == ["fsync-file", "rename", "fsync-dir"]


def test_token_ids_outside_the_vocabulary_are_refused_in_one_line(loaded):
    from qenv.eval.evaluator import Evaluator
    from qenv.eval.tokens import TokenSet

    ids = torch.zeros(2, SEQ_LEN, dtype=torch.long)
    ids[1, 5] = 10**9
    with pytest.raises(QenvError, match="outside .*vocabulary"):
        Evaluator(loaded, TokenSet(ids, "hand-made"), cache_dir=False)


# -- item 16: the reference's key of many batches ------------------------------------------------------------
@pytest.mark.slow  # extended tier: a reference of many batches
def test_reference_of_many_batches_is_cached_under_a_hashed_name(loaded, tmp_path, monkeypatch):
    """300 batches of one sequence: the old name held one entry per batch and failed with
    'File name too long' after the whole pass. The name is short, the key is whole (in the header),
    and another batch split is another file."""
    from qenv.eval import reference as reference_module
    from qenv.eval.evaluator import Evaluator
    from qenv.eval.tokens import tokens_from_model

    tokens = tokens_from_model(loaded.model, 300 * 4, 4, seed=1)
    first = Evaluator(loaded, tokens, batch_size=1, cache_dir=tmp_path).reference
    path = cache_file("reference", tmp_path)
    assert len(path.name) < 120 and path.name.startswith(f"reference-v{reference_module.CACHE_VERSION}-")
    _, header = _header(path)
    assert "batches=" + "x".join(["1"] * 300) in header["__metadata__"]["qenv.key"]

    def no_recompute(*args, **kwargs):
        raise AssertionError("the cached reference was not read")

    monkeypatch.setattr(reference_module, "compute_reference", no_recompute)
    again = Evaluator(loaded, tokens, batch_size=1, cache_dir=tmp_path).reference
    assert all(torch.equal(a, b) for a, b in zip(first.logprobs, again.logprobs))
    monkeypatch.undo()
    Evaluator(loaded, tokens, batch_size=2, cache_dir=tmp_path).reference  # another split: its own file
    assert len(list(tmp_path.glob("reference-*.safetensors"))) == 2


# -- item 20: resources ----------------------------------------------------------------------------------------
def test_reference_size_estimate_matches_what_is_stored(loaded, tmp_path):
    from qenv.eval.reference import reference_bytes, reference_tensors

    ev = _evaluator(loaded, tmp_path)
    stored = sum(t.numel() * t.element_size() for t in reference_tensors(ev.reference).values())
    estimate = reference_bytes(loaded.model, loaded.layers, N_TOKENS // SEQ_LEN, SEQ_LEN)
    assert stored <= estimate <= 1.5 * stored


def test_a_reference_that_cannot_fit_is_refused_before_sampling(stories_bin, tmp_path, monkeypatch):
    """n_tokens=50,000,000 on stories260K: ~150 GiB of reference. Refused with the estimate before
    a single token is sampled (sampling alone would take hours)."""
    import gymnasium as gym

    from qenv.eval import tokens as tokens_module

    def no_sampling(*args, **kwargs):
        raise AssertionError("tokens were sampled before the size check")

    monkeypatch.setattr(tokens_module, "tokens_from_model", no_sampling)
    monkeypatch.setattr("qenv.envs.task.tokens_from_model", no_sampling)
    with pytest.raises(QenvError) as refused:
        gym.make("QuantLLM-v0", model=str(stories_bin), n_tokens=50_000_000, seq_len=128, cache_dir=tmp_path)
    message = str(refused.value)
    assert "50000000 tokens needs about" in message and "GiB" in message and "fit here" in message
    assert list(tmp_path.iterdir()) == []


def test_the_reference_size_refusal_is_one_line_from_train_agent(stories_bin, tmp_path, capsys):
    train_agent = load_script("train_agent")
    code = run_main(train_agent, ["--model", stories_bin, "--logdir", tmp_path, "--name", "big", "--no-progress",
                                  "--env-kwargs", "n_tokens=50000000", "seq_len=128"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "GiB" in lines[0], err


def test_threads_are_capped_and_absurd_counts_refused(capsys, monkeypatch):
    from qenv.cli.envs import MAX_THREADS_PER_CORE, available_cores, set_torch_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("QENV_TORCH_THREADS", raising=False)  # restored after the test (set_torch_threads sets it)
    cores = available_cores()
    try:
        set_torch_threads(cores + 1)
        assert torch.get_num_threads() == cores
        out = capsys.readouterr().out
        assert out.count("\n") == 1 and f"using {cores}" in out
        for absurd in (5000 if 5000 > MAX_THREADS_PER_CORE * cores else 10**9, 100000):
            with pytest.raises(QenvError, match="far more than"):
                set_torch_threads(absurd)
        assert torch.get_num_threads() == cores  # nothing changed by a refusal
    finally:
        torch.set_num_threads(before)


def test_absurd_threads_exit_2_in_one_line_before_any_work(stories_bin, tmp_path, capsys):
    train_agent = load_script("train_agent")
    code = run_main(train_agent, ["--model", stories_bin, "--logdir", tmp_path, "--name", "t", "--threads", 100000,
                                  "--no-progress"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--threads=100000" in lines[0], err
    assert not (tmp_path / "t").exists()


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


@pytest.mark.skipif(not Path("/proc/self/io").is_file(), reason="needs Linux's /proc/self/io")
def test_text_is_streamed_not_read_whole(loaded, tmp_path):
    """A 64 MiB text file read for 256 tokens: a few MiB are read (it was read whole, twice by
    eval_agent), and the tokens equal those of a file holding only its start."""
    from qenv.eval.tokens import check_text_file, tokens_from_text

    story = "Once upon a time there was a little girl who liked to play in the park with her dog.\n"
    small = tmp_path / "small.txt"
    small.write_text(story * 200)
    big = tmp_path / "big.txt"
    with open(big, "w") as fh:
        block = story * 10_000
        while fh.tell() < 64 << 20:
            fh.write(block)
    before = _bytes_read()
    streamed = tokens_from_text(loaded.tokenizer, big, N_TOKENS, SEQ_LEN)
    check_text_file(big)  # eval_agent's up-front check of --data
    read = _bytes_read() - before
    assert read < 8 << 20, f"{read} bytes read"
    assert torch.equal(streamed.ids, tokens_from_text(loaded.tokenizer, small, N_TOKENS, SEQ_LEN).ids)


def test_streamed_text_still_refuses_binary_and_bad_bytes(loaded, tmp_path):
    from qenv.eval.tokens import tokens_from_text

    binary = tmp_path / "model.bin"
    binary.write_bytes(b"abc\x00def" * 100)
    with pytest.raises(QenvError, match="binary file"):
        tokens_from_text(loaded.tokenizer, binary, N_TOKENS, SEQ_LEN)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(("word " * 3000).encode() + b"caf\xe9 " + ("word " * 3000).encode())
    with pytest.raises(QenvError, match=r"byte 0xe9 at offset 15003"):
        tokens_from_text(loaded.tokenizer, latin, 2048, SEQ_LEN)


# -- item 23: a searcher that misses the budget is not listed as a result -----------------------------------------
@pytest.mark.slow  # extended tier: eval_agent.py with searches
def test_searcher_over_budget_is_listed_apart(stories_bin, tmp_path, capsys):
    """At 3.0 bpw no llama.cpp mix fits stories260K (its rows are too narrow for k-quants): the
    llamacpp searcher returns a 7+ bpw mix. It is listed apart, with a plain note, not as a
    searcher's result."""
    train_agent, eval_agent = load_script("train_agent"), load_script("eval_agent")
    small = ["--env-kwargs", f"n_tokens={N_TOKENS}", f"seq_len={SEQ_LEN}"]
    assert run_main(train_agent, ["--agent", "greedy", "--model", stories_bin, "--budget-bpw", 3.0, "--name", "g",
                                  "--logdir", tmp_path, "--no-progress", *small]) == 0
    capsys.readouterr()
    assert run_main(eval_agent, ["--policy", tmp_path / "g" / "model.json", "--searchers", "llamacpp,greedy",
                                 "--out", tmp_path / "e", "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "e" / "results.json").read_text())["models"][0]["rows"]
    by_method = {r["method"]: r for r in rows}
    missed = by_method["llamacpp"]
    assert missed["bpw"] > 3.0 and missed["over_budget"]
    assert missed["kind"] == "missed budget" and missed["note"].startswith("did not meet the 3 bpw budget")
    assert by_method["greedy"]["kind"] == "searcher" and not by_method["greedy"]["over_budget"]
    main_table, _, apart = out.partition("(* over the 3 bpw budget)")
    assert "llamacpp" not in main_table and "greedy" in main_table
    said = [line for line in apart.splitlines() if "llamacpp" in line]
    assert len(said) == 1 and "not a result at 3 bpw: the llamacpp searcher did not meet the budget" in said[0]
    # the same run scored on held-out text at 50,000,000 tokens: refused before the text is read
    held = tmp_path / "held.txt"
    held.write_text("Once upon a time there was a cat.\n" * 100)
    code = run_main(eval_agent, ["--policy", tmp_path / "g" / "model.json", "--searchers", "none", "--data", held,
                                 "--n-tokens", 50_000_000, "--out", tmp_path / "e-big"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "50000000 tokens needs about" in lines[0], err
    assert not (tmp_path / "e-big").exists()


@pytest.mark.slow  # extended tier: references computed at two thread counts
def test_caches_are_keyed_on_the_thread_count(tmp_path):
    """Float results depend on torch's thread count (reduction order), so a cache written by a
    process with other threads must not be read: each count gets its own files."""
    import torch

    from qenv.eval.reference import numerics_key

    before = torch.get_num_threads()
    try:
        names = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            env = gym.make("QuantLLM-v0", model="tiny-llama", n_tokens=128, seq_len=32, cache_dir=str(tmp_path)).unwrapped
            names.append(numerics_key(env.task.loaded.device))
            env.close()  # drops the task from the per-process cache: the next env reads the disk cache
        files = sorted(p.name for p in tmp_path.iterdir())
    finally:
        torch.set_num_threads(before)
    assert names[0] != names[1]
    for prefix in ("reference-", "features-", "errors-"):
        assert len([f for f in files if f.startswith(prefix)]) == 2, files
