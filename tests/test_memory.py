"""Memory that fits the model (issue 26 item 4): the caches are sized from the model, not from a share
of whatever memory is free; a cache size larger than the free memory is refused; a process that finds
a shared GPU full waits for it (bounded), then runs smaller batches, instead of dying out of memory."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from qenv.errors import QenvError
from qenv.memory import (CACHED_PREFIX_EPISODES, CACHED_RECIPES, CACHE_SHARE_CPU, CACHE_SHARE_GPU,
                         available_memory, check_cache_fits, fit_batch_size, prefix_cache_bytes, wait_for_memory,
                         weight_cache_bytes)

CPU = torch.device("cpu")
MIB = 2**20


def test_the_weight_cache_holds_a_few_recipes_of_this_model() -> None:
    # a 425 MiB recipe (SmolLM2-135M's linears in float32) and the 37-rule menu: four recipes, not a share of 24 GB
    assert weight_cache_bytes(425 * MIB, 37, CPU, free=24 << 30) == CACHED_RECIPES * 425 * MIB
    assert weight_cache_bytes(425 * MIB, 2, CPU, free=24 << 30) == 2 * 425 * MIB  # a shorter menu: no more
    assert weight_cache_bytes(4 * MIB, 37, CPU, free=24 << 30) == CACHED_RECIPES * 4 * MIB  # scales with the model
    # prebuilt: the whole menu; always within a share of what is free
    assert weight_cache_bytes(425 * MIB, 37, CPU, whole_menu_bytes=37 * 425 * MIB, free=64 << 30) == 37 * 425 * MIB
    assert weight_cache_bytes(425 * MIB, 37, CPU, whole_menu_bytes=37 * 425 * MIB, free=8 << 30) == \
        int(CACHE_SHARE_CPU * (8 << 30))
    gpu = torch.device("cuda")  # the GPU's share is larger (nothing else of the process lives there)
    assert weight_cache_bytes(425 * MIB, 37, gpu, free=2 << 30) == int(CACHE_SHARE_GPU * (2 << 30))
    assert weight_cache_bytes(425 * MIB, 37, CPU) <= CACHED_RECIPES * 425 * MIB  # the machine's own free memory


def test_the_prefix_cache_holds_a_few_episodes_of_block_outputs() -> None:
    state = 2048 * 576 * 4  # SmolLM2's hidden states over 2048 tokens, float32
    assert prefix_cache_bytes(state, 30, CPU, free=24 << 30) == CACHED_PREFIX_EPISODES * 30 * state
    assert prefix_cache_bytes(256 * 64 * 4, 5, CPU, free=24 << 30) < 2 * MIB  # stories260K: not the old fixed 1 GiB
    assert prefix_cache_bytes(state, 30, CPU, free=256 * MIB) <= 256 * MIB * CACHE_SHARE_CPU


def test_a_cache_larger_than_the_free_memory_is_refused() -> None:
    free = available_memory(CPU)
    assert free is not None and free > 0
    check_cache_fits(0.5 * free / 2**30, CPU)  # fits: nothing said
    with pytest.raises(QenvError) as err:
        check_cache_fits(2 * free / 2**30, CPU, "--weight-cache-gib")
    assert "RAM available on this machine" in str(err.value) and "--weight-cache-gib at most" in err.value.fix


def test_the_gate_never_waits_on_a_cpu() -> None:
    notes: list[str] = []
    start = time.monotonic()
    assert wait_for_memory(1 << 62, CPU, what="x", timeout_s=30, note=notes.append)
    assert fit_batch_size(8, 1 << 62, 1 << 40, CPU, timeout_s=30, note=notes.append) == 8
    assert notes == [] and time.monotonic() - start < 5


def test_build_task_sizes_its_caches_from_the_model_and_says_so(stories_bin, capsys) -> None:
    from qenv.cli.envs import make_quant_env
    from qenv.progress import shown

    with shown():
        env = make_quant_env(model=str(stories_bin), budget_bpw=4.0, n_tokens=256, seq_len=64, cache_dir=False,
                             seed=23)
    try:
        task = env.unwrapped.task
        ev = task.evaluator
        one = ev.weights.recipe_bytes()
        assert ev.weights.max_cache_bytes == CACHED_RECIPES * one  # the 37-rule menu, quantized on demand
        state = 256 * ev.model.get_input_embeddings().weight.shape[-1] * 4
        assert ev.max_prefix_cache_bytes == CACHED_PREFIX_EPISODES * ev.n_blocks * state
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("memory: ")]
        assert len(lines) == 1 and "quantized-weight cache up to" in lines[0] and "4.0 recipes" in lines[0]
        assert "quantized on demand" in lines[0] and "block-output cache up to" in lines[0], lines
    finally:
        env.close()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")


#: another process that takes ``argv[1]`` bytes of GPU memory until a line comes on its stdin
HOLDER = ("import sys, torch; x = torch.empty(int(sys.argv[1]), dtype=torch.uint8, device='cuda'); "
          "print('ready', flush=True); sys.stdin.readline()")


def _hold(nbytes: int) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(max(0, nbytes))], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "ready"
    return holder


def _release(holder: subprocess.Popen) -> None:
    holder.stdin.write("\n")
    holder.stdin.flush()
    holder.wait(60)


@needs_cuda
def test_the_gpu_gate_queues_until_memory_is_released() -> None:
    """Another process takes most of the free GPU memory; the gate waits (and says so) instead of failing,
    and proceeds once that process lets go. With the memory still held after a bounded wait, the batch
    shrinks to fit instead of running out of memory. A need the whole GPU could not meet does not wait."""
    device = torch.device("cuda")
    torch.cuda.init()
    need = 2 << 30
    holder = _hold(available_memory(device) - need // 2 - (600 << 20))  # leaves less than `need` (its context too)
    try:
        assert available_memory(device) < need
        notes: list[str] = []
        result: list[bool] = []
        waiter = threading.Thread(target=lambda: result.append(
            wait_for_memory(need, device, what="the test", timeout_s=120, poll_s=0.2, note=notes.append)))
        waiter.start()
        time.sleep(2.0)
        assert waiter.is_alive() and result == [] and notes and notes[0].startswith("waiting for GPU memory")
    finally:
        _release(holder)
    waiter.join(60)
    assert result == [True] and len(notes) == 2 and "starting the test" in notes[1]
    # still short after a bounded wait: the batch shrinks to what fits instead of running out of memory
    holder = _hold(available_memory(device) - (1 << 30))
    try:
        notes.clear()
        per_sequence = 64 << 20
        size = fit_batch_size(256, 0, per_sequence, device, what="the test", timeout_s=1, poll_s=0.2,
                              note=notes.append)
        assert 1 <= size < 256 and size * per_sequence <= available_memory(device)
        assert notes[0].startswith("waiting for GPU memory") and "batches of" in notes[-1]
        # more than the whole GPU: no wait at all (nobody can free that much)
        start = time.monotonic()
        total = torch.cuda.mem_get_info(device)[1]
        assert not wait_for_memory(2 * total, device, what="x", timeout_s=60, note=notes.append)
        assert time.monotonic() - start < 5
    finally:
        _release(holder)
