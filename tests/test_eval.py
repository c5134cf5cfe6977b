"""Acceptance tests of the evaluator: token sets, the on-disk reference cache, the metrics themselves,
the streaming path against the plain path (tied lm_head included), and every tiny architecture.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qenv.eval.reference as reference_module
from qenv.errors import QenvError
from qenv.eval.evaluator import Evaluator, Metrics
from qenv.eval.tokens import TokenSet, tokens_from_model, tokens_from_text
from qenv.models.layers import get_module
from qenv.models.loading import LoadedModel, load_model
from qenv.models.tiny import TINY_ARCHITECTURES
from qenv.quant.presets import preset
from qenv.quant.rules import KEEP, Rule
from conftest import STORIES_BIN, TINYSTORIES, WIKITEXT_TEST, BUILTIN_DEFAULT as DEFAULT_DIR, require



@pytest.fixture(scope="module")
def stories() -> LoadedModel:
    """stories260K with its lm_head (tied to the embedding) among the targeted layers."""
    require(STORIES_BIN, "stories260K llama2.c checkpoint")
    lm = load_model(STORIES_BIN, include_lm_head=True)
    assert lm.layers[-1].kind == "lm_head" and lm.layers[-1].tied_to == "model.embed_tokens"
    return lm


def _assert_same(a: Metrics, b: Metrics) -> None:
    """Streaming and plain paths agree to ~1e-6 relative on every metric."""
    assert a.kl == pytest.approx(b.kl, rel=1e-6, abs=1e-12)
    assert a.ppl == pytest.approx(b.ppl, rel=1e-6)
    assert a.top1 == pytest.approx(b.top1, rel=1e-6)
    assert (a.bpw, a.model_bytes, a.n_tokens) == (b.bpw, b.model_bytes, b.n_tokens)


# ---------------------------------------------------------------------------------------------
# Token sets
# ---------------------------------------------------------------------------------------------

def test_tokens_from_text_are_deterministic_and_shaped(stories: LoadedModel) -> None:
    require(WIKITEXT_TEST, "WikiText-2 test split")
    a = tokens_from_text(stories.tokenizer, WIKITEXT_TEST, n_tokens=1024, seq_len=128)
    b = tokens_from_text(stories.tokenizer, str(WIKITEXT_TEST), n_tokens=1024, seq_len=128)
    assert a.ids.shape == (8, 128) and a.ids.dtype == torch.long and a.n_tokens == 1024
    assert torch.equal(a.ids, b.ids) and a.fingerprint == b.fingerprint
    assert 0 <= int(a.ids.min()) and int(a.ids.max()) < stories.vocab_size
    # The sequences are the text's tokens in order, cut into rows (no BOS inserted).
    expected = stories.tokenizer(WIKITEXT_TEST.read_text()[:20000], add_special_tokens=False)["input_ids"][:1024]
    assert a.ids.flatten().tolist() == expected
    # n_tokens that is not a multiple of seq_len keeps whole sequences only.
    c = tokens_from_text(stories.tokenizer, WIKITEXT_TEST, n_tokens=1000, seq_len=128)
    assert c.ids.shape == (7, 128) and torch.equal(c.ids, a.ids[:7])
    # An offset skips tokens; a different window has a different fingerprint.
    d = tokens_from_text(stories.tokenizer, WIKITEXT_TEST, n_tokens=512, seq_len=128, offset_tokens=256)
    assert torch.equal(d.ids.flatten(), a.ids.flatten()[256:768])
    assert d.fingerprint != a.fingerprint and d.source != a.source


def test_sampled_tokens_are_reproducible(stories: LoadedModel) -> None:
    rng_before = torch.get_rng_state()
    a = tokens_from_model(stories.model, n_tokens=512, seq_len=64, seed=0, bos_token_id=1)
    assert torch.equal(torch.get_rng_state(), rng_before), "sampling must not move the caller's RNG"
    b = tokens_from_model(stories.model, n_tokens=512, seq_len=64, seed=0, bos_token_id=1)
    c = tokens_from_model(stories.model, n_tokens=512, seq_len=64, seed=1, bos_token_id=1)
    assert a.ids.shape == (8, 64) and a.ids.dtype == torch.long
    assert torch.equal(a.ids, b.ids) and a.fingerprint == b.fingerprint
    assert not torch.equal(a.ids, c.ids) and a.fingerprint != c.fingerprint
    assert (a.ids[:, 0] == 1).all() and int(a.ids.max()) < stories.vocab_size
    assert a.source == "sampled:seed=0"


def test_token_size_errors(stories: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(QenvError, match="seq_len"):
        tokens_from_model(stories.model, n_tokens=512, seq_len=1)
    with pytest.raises(QenvError, match="smaller than seq_len"):
        tokens_from_model(stories.model, n_tokens=32, seq_len=64)
    with pytest.raises(QenvError, match="no tokenizer"):
        tokens_from_text(None, tmp_path / "x.txt", n_tokens=512, seq_len=64)
    with pytest.raises(QenvError, match="does not exist"):
        tokens_from_text(stories.tokenizer, tmp_path / "missing.txt", n_tokens=512, seq_len=64)
    with pytest.raises(QenvError, match="batch_size"):
        Evaluator(stories, TokenSet(torch.zeros(2, 8, dtype=torch.long), "zeros"), batch_size=0, cache_dir=False)


# ---------------------------------------------------------------------------------------------
# The full-precision reference, cached on disk
# ---------------------------------------------------------------------------------------------

def test_reference_disk_cache_is_reused_and_damage_is_recomputed(
    stories: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require(TINYSTORIES, "TinyStories text")
    tokens = tokens_from_text(stories.tokenizer, TINYSTORIES, n_tokens=512, seq_len=64)
    recipe = preset("awq-w3", stories.layers)  # reads the cached activation statistics
    first = Evaluator(stories, tokens, batch_size=4, cache_dir=tmp_path)
    m1 = first.evaluate(recipe)
    files = sorted(tmp_path.glob("reference-*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    cache = files[0]
    stamp = (cache.stat().st_size, cache.stat().st_mtime_ns)

    calls = []
    real_compute = reference_module.compute_reference

    def counting_compute(*args, **kwargs):
        calls.append(1)
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(reference_module, "compute_reference", counting_compute)

    # A second evaluator on the same model and tokens loads the file instead of recomputing.
    second = Evaluator(stories, tokens, batch_size=4, cache_dir=tmp_path)
    assert second.evaluate(recipe) == m1
    assert calls == [] and (cache.stat().st_size, cache.stat().st_mtime_ns) == stamp
    for info in stories.layers:
        a, b = first.calibration_of(info.name), second.calibration_of(info.name)
        assert torch.equal(a.act_rms, b.act_rms) and torch.equal(a.hessian, b.hessian)
    for x, y in zip(first.reference.logprobs, second.reference.logprobs):
        assert torch.equal(x, y)

    # Other tokens get their own file.
    other = tokens_from_text(stories.tokenizer, TINYSTORIES, n_tokens=512, seq_len=64, offset_tokens=512)
    Evaluator(stories, other, batch_size=4, cache_dir=tmp_path).reference
    assert len(list(tmp_path.glob("reference-*.safetensors"))) == 2 and calls == [1]

    # A damaged file (garbage, then a truncated copy) is recomputed, rewritten and gives the same metrics.
    good = cache.read_bytes()
    for damaged in (b"this is not a safetensors file" * 4, good[: len(good) // 2]):
        cache.write_bytes(damaged)
        n_calls = len(calls)
        again = Evaluator(stories, tokens, batch_size=4, cache_dir=tmp_path)
        assert again.evaluate(recipe) == m1
        assert len(calls) == n_calls + 1
        assert cache.stat().st_size == len(good) and load_file(str(cache))  # whole and readable again
    assert not list(tmp_path.glob("*.tmp"))


def test_each_layer_calibration_is_its_own_input_statistics(stories: LoadedModel) -> None:
    """rms(x) and XᵀX/n of every targeted layer, against its inputs captured by hooks.

    Layers that read the same tensor (q/k/v, gate/up) share statistics; no other layer may: a freed
    activation's address reused by a later tensor once gave unrelated layers the same Hessian.
    """
    require(TINYSTORIES, "TinyStories text")
    tokens = tokens_from_text(stories.tokenizer, TINYSTORIES, n_tokens=512, seq_len=64, offset_tokens=2048)
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [
        get_module(stories.model, info.name).register_forward_hook(
            lambda mod, args, out, name=info.name: inputs.setdefault(name, []).append(
                args[0].reshape(-1, args[0].shape[-1]).double().clone()))
        for info in stories.layers
    ]
    try:
        with torch.inference_mode():
            for ids in tokens.batches(4):
                stories.model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    ev = Evaluator(stories, tokens, batch_size=4, cache_dir=False)
    for info in stories.layers:
        x = torch.cat(inputs[info.name])
        calib = ev.calibration_of(info.name)
        hessian = x.T @ x / x.shape[0]
        assert torch.allclose(calib.hessian.double(), hessian, rtol=1e-4, atol=1e-6 * float(hessian.abs().max()))
        assert torch.allclose(calib.act_rms.double(), x.square().mean(0).sqrt(), rtol=1e-4, atol=1e-7)
    shared = {name for name, c in ((i.name, ev.calibration_of(i.name)) for i in stories.layers)
              if any(c is ev.calibration_of(o.name) for o in stories.layers if o.name != name)}
    assert {name.rsplit(".", 1)[-1] for name in shared} == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}


# ---------------------------------------------------------------------------------------------
# The metrics, by hand
# ---------------------------------------------------------------------------------------------

def test_metrics_equal_a_hand_computation(stories: LoadedModel) -> None:
    require(TINYSTORIES, "TinyStories text")
    tokens = tokens_from_text(stories.tokenizer, TINYSTORIES, n_tokens=1024, seq_len=128)
    ev = Evaluator(stories, tokens, batch_size=3, cache_dir=False)  # ragged last batch on purpose
    ids = tokens.ids
    recipe = preset("rtn-w3", stories.layers)
    m = ev.evaluate(recipe)
    with torch.inference_mode():
        ref = torch.log_softmax(stories.model(input_ids=ids, use_cache=False).logits[:, :-1].double(), -1)
        with ev.weights.applied(recipe):
            out = torch.log_softmax(stories.model(input_ids=ids, use_cache=False).logits[:, :-1].double(), -1)
        fp = ev.evaluate({})
    kl = float((ref.exp() * (ref - out)).sum(-1).mean())
    nll = float(-out.gather(-1, ids[:, 1:, None]).mean())
    nll_fp = float(-ref.gather(-1, ids[:, 1:, None]).mean())
    top1 = float((out.argmax(-1) == ref.argmax(-1)).double().mean())
    n = 8 * 127
    assert m.n_tokens == fp.n_tokens == n
    assert m.kl == pytest.approx(kl, rel=1e-4)
    assert m.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert m.top1 == pytest.approx(top1, abs=1.5 / n)
    assert fp.kl == 0.0 and fp.top1 == 1.0 and fp.ppl == pytest.approx(math.exp(nll_fp), rel=1e-5)
    assert fp.ppl < m.ppl and 0.0 < m.top1 < 1.0
    assert m.model_mb == m.model_bytes / 1e6 and m.to_dict()["kl"] == m.kl


# ---------------------------------------------------------------------------------------------
# Streaming path == plain path
# ---------------------------------------------------------------------------------------------

def _stream_model(request: pytest.FixtureRequest) -> tuple[LoadedModel, Evaluator]:
    if request.param == "stories260K":
        require(TINYSTORIES, "TinyStories text")
        lm, text = request.getfixturevalue("stories"), TINYSTORIES
    else:
        if not (DEFAULT_DIR / "config.json").is_file():
            pytest.skip(f"embedded default model not there yet: {DEFAULT_DIR} has no config.json")
        require(WIKITEXT_TEST, "WikiText-2 test split")
        lm, text = load_model("default", include_lm_head=True), WIKITEXT_TEST
    tokens = tokens_from_text(lm.tokenizer, text, n_tokens=1024, seq_len=128)
    return lm, Evaluator(lm, tokens, batch_size=4, cache_dir=False)


@pytest.fixture(scope="module", params=["stories260K", "default"])
def streamed(request: pytest.FixtureRequest) -> tuple[LoadedModel, Evaluator]:
    return _stream_model(request)


def _recipes(lm: LoadedModel) -> dict[str, dict[str, Rule]]:
    head = lm.layers[-1]
    assert head.kind == "lm_head" and head.tied_to is not None  # tied: it is the embedding matrix too
    names = [info.name for info in lm.layers]
    mixed = {name: rule for name, rule in zip(names, [
        Rule(bits=3, group_size=32, symmetric=True, rounding="gptq"),
        KEEP,
        Rule(bits=2, group_size=64, outlier_fraction=0.02, salience=(1.0, 1.0, 0.0)),
        Rule(bits=4, act_scale=0.5, mse_clip=True),
        Rule(bits=6, group_size=-1, clip=0.95),
    ] * len(names))}
    return {
        "rtn-w4 (lm_head too)": dict(preset("rtn-w4", lm.layers)),
        "gptq-w3 (lm_head too)": dict(preset("gptq-w3", lm.layers)),
        "q3_k_m": dict(preset("q3_k_m", lm.layers)),
        "tied lm_head only": {head.name: Rule(bits=3)},
        "awq-w3 blocks only": dict(preset("awq-w3", lm.layers[:-1])),
        "mixed": mixed,
    }


def test_streaming_equals_plain(streamed: tuple[LoadedModel, Evaluator]) -> None:
    lm, ev = streamed
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    results = {}
    for label, recipe in _recipes(lm).items():
        plain, stream = ev.evaluate(recipe), ev.evaluate_blockwise(recipe)
        _assert_same(stream, plain)
        assert plain.kl > 0, label
        results[label] = plain.kl
    # Quantizing the tied head alone changes the embeddings too: it must move the model.
    assert results["tied lm_head only"] > 1e-3
    # Both paths gave every weight back, the shared embedding/head matrix included.
    for name, param in lm.model.named_parameters():
        assert torch.equal(param.detach(), before[name]), name


def test_full_precision_ppl_from_the_reference_equals_a_forward(streamed: tuple[LoadedModel, Evaluator]) -> None:
    _, ev = streamed
    assert ev.full_precision_ppl == pytest.approx(ev.evaluate({}).ppl, rel=1e-9)


def test_fresh_evaluator_streams_a_calibrated_recipe_first(streamed: tuple[LoadedModel, Evaluator]) -> None:
    """The first thing a fresh evaluator does is stream a GPTQ recipe: building the reference
    lazily must not undo rules already swapped into the model."""
    lm, warm = streamed
    # the block's first layer needs no calibration, so a rule is already applied when the second
    # layer's GPTQ asks for the reference
    recipe = {info.name: Rule(bits=3) if i % 2 == 0 else Rule(bits=3, rounding="gptq")
              for i, info in enumerate(lm.layers)}
    fresh = Evaluator(lm, warm.tokens, batch_size=warm.batch_size, cache_dir=False)
    _assert_same(fresh.evaluate_blockwise(recipe), warm.evaluate(recipe))


def test_stream_step_by_step_block_errors_and_prefix_reuse(streamed: tuple[LoadedModel, Evaluator]) -> None:
    lm, ev = streamed
    n = ev.n_blocks
    blocks_only = {info.name: Rule(bits=3) for info in lm.layers if info.kind != "lm_head"}
    # Full precision: every block output equals the reference.
    s = ev.stream()
    for b in range(n):
        s.advance({}, b)
        assert s.block_error(b) <= 1e-12
    _assert_same(s.finish({}), ev.evaluate({}))
    # Quantized blocks: errors appear from block 0 on, and finishing equals the plain path.
    s = ev.stream()
    errors = []
    for b in range(n):
        s.advance(blocks_only, b)
        errors.append(s.block_error(b))
    assert all(e > 0 for e in errors) and errors[-1] > errors[0]
    _assert_same(s.finish(blocks_only), ev.evaluate(blocks_only))
    # A recipe differing only in the last block reuses every earlier block from the prefix cache.
    last = {info.name for info in lm.layers if info.block == n - 1 and info.kind != "lm_head"}
    changed = {name: (Rule(bits=2) if name in last else rule) for name, rule in blocks_only.items()}
    runs, hits = ev.blocks_run, ev.prefix_hits
    m = ev.evaluate_blockwise(changed)
    assert ev.blocks_run - runs == 1 and ev.prefix_hits - hits == n - 1
    _assert_same(m, ev.evaluate(changed))
    with pytest.raises(QenvError):
        ev.stream().block_error(0)  # not advanced yet


# ---------------------------------------------------------------------------------------------
# Every tiny architecture
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_architecture_streaming_and_kl_order(arch: str) -> None:
    lm = load_model(f"tiny-{arch}")
    tokens = tokens_from_model(lm.model, n_tokens=512, seq_len=64, seed=0)
    ev = Evaluator(lm, tokens, batch_size=4, cache_dir=False)
    kl = {b: ev.evaluate(preset(f"rtn-w{b}", lm.layers)).kl for b in (8, 4, 2)}
    assert 0.0 < kl[8] < kl[4] < kl[2], kl
    for name in ("rtn-w4", "gptq-w4-g32"):
        recipe = preset(name, lm.layers)
        _assert_same(ev.evaluate_blockwise(recipe), ev.evaluate(recipe))
    assert ev.evaluate({}).kl == 0.0


def test_calibrated_rule_on_a_layer_without_statistics_is_a_clear_error() -> None:
    """Embeddings never run as a linear module, so GPTQ cannot calibrate them: say which layer."""
    lm = load_model("tiny-llama", include_embeddings=True)
    ev = Evaluator(lm, tokens_from_model(lm.model, 128, 32), cache_dir=False)
    embed = next(info for info in lm.layers if info.kind == "embed")
    with pytest.raises(QenvError, match=f"activation statistics of layer {embed.name}"):
        ev.evaluate({embed.name: Rule(bits=3, rounding="gptq")})
    assert ev.evaluate({embed.name: Rule(bits=3)}).kl > 0


def test_reference_cache_is_keyed_by_the_batch_split(stories: LoadedModel, tmp_path: Path) -> None:
    """16 sequences in batches of 8 or of 12 make two batches each, of different shapes: the
    cached reference of one must not be read for the other."""
    tokens = tokens_from_model(stories.model, 16 * 32, 32, seed=3)
    recipe = dict(preset("rtn-w3", stories.layers))
    by8 = Evaluator(stories, tokens, batch_size=8, cache_dir=tmp_path).evaluate(recipe)
    by12 = Evaluator(stories, tokens, batch_size=12, cache_dir=tmp_path).evaluate(recipe)
    assert by12.kl == pytest.approx(by8.kl, rel=1e-5) and by12.n_tokens == by8.n_tokens
