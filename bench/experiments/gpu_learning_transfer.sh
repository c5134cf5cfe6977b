#!/usr/bin/env bash
# Issue 10's GPU runs (one H200), in two back-to-back device calls from a copy of the repository
# in <main>/.dev10 (with qdata.tar.xz: wikitext-2, tinystories and stories260K of ../shared/data).
# The SmolLM2 GGUF travels in three parts (.carry1 with call A, .carry2 + .carry3 with call B).
#
#   A: train the bench models, then the per-model RL runs (MaskablePPO on the residual kind,
#      128 episodes, 3 seeds) with greedy re-measured beside them
#   B: join the GGUF; the SmolLM2 learning run (train_agent.py, stopped by SIGINT at its time
#      limit) and the transfer experiment (one policy per budget trained on default, bench-llama and
#      bench-qwen2; zero-shot on SmolLM2, bench-gpt2 and stories260K) run at the same time
set -u
step=${1:?usage: gpu_learning_transfer.sh A|B DEADLINE_S}
deadline=${2:-400}
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/parts "$OUT"
if [ "$step" = A ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl || exit 1
  cp ../.carry1/* /tmp/parts/
  mkdir -p .device && tar xJf qdata.tar.xz -C .device
  nvidia-smi -L; python3 -c "import torch, transformers, stable_baselines3, sb3_contrib; print(torch.__version__, transformers.__version__, stable_baselines3.__version__, sb3_contrib.__version__)"
  for a in llama gpt2 qwen2; do
    timeout 300 python3 scripts/train_bench_models.py --arch $a --data-dir .device/qdata/wikitext-2 \
      --out-dir /tmp/bench_models --steps 1000 --eval-every 250 > "$OUT/train_$a.log" 2>&1 &
  done
  python3 bench/bench_quality.py run --models stories260K default /tmp/bench_models/bench-llama \
    /tmp/bench_models/bench-gpt2 /tmp/bench_models/bench-qwen2 --data-dir .device/qdata --out /tmp/qrl \
    --cache-dir /tmp/qcache --episodes 128 --seeds 0 1 2 --methods greedy ppo --rl-agent maskable_ppo \
    --action-kind residual --nice 10 --deadline-s "$deadline" --grace-s 15 > "$OUT/qrl.log" 2>&1
  wait
  tar czf "$OUT/qrl.tgz" -C /tmp qrl/raw qrl/logs qrl/quality_results.json qrl/quality_tables.md
else
  cp ../.carry2/* ../.carry3/* /tmp/parts/
  cat /tmp/parts/SmolLM2-135M-Instruct.Q4_1.gguf.part* > /tmp/smollm2.gguf
  sha256sum /tmp/smollm2.gguf; ls /tmp/bench_models
  timeout -s INT "$deadline" python3 train_agent.py --model /tmp/smollm2.gguf --agent maskable_ppo \
    --data .device/qdata/wikitext-2/train.txt --n-tokens 2048 --env-kwargs device=cuda weight_cache_gib=24 \
    --timesteps 1000000 --checkpoint-freq 8400 --logdir /tmp/runs --name smollm2 --no-progress > "$OUT/smollm2.log" 2>&1 &
  python3 bench/bench_quality.py run --models --data-dir .device/qdata --out /tmp/qtr --cache-dir /tmp/qcache \
    --transfer-train default /tmp/bench_models/bench-llama /tmp/bench_models/bench-qwen2 \
    --transfer-test smollm2=/tmp/smollm2.gguf /tmp/bench_models/bench-gpt2 stories260K \
    --transfer-budgets 2.5 3.0 3.5 4.0 --transfer-seeds 0 --transfer-timesteps 12288 --transfer-eval-jobs \
    --transfer-search-evals 16 --transfer-eval-reserve-s 0 --weight-cache-gib 8 --rl-agent maskable_ppo \
    --action-kind residual --nice 10 --deadline-s "$deadline" --grace-s 15 > "$OUT/qtr.log" 2>&1
  wait
  tar czf "$OUT/smollm2.tgz" -C /tmp/runs smollm2/summary.json smollm2/config.json smollm2/tb smollm2/best_recipe.json \
    $(cd /tmp/runs && ls smollm2/checkpoints/*.json 2>/dev/null | tail -1)
  tar czf "$OUT/qtr.tgz" -C /tmp qtr/raw qtr/logs qtr/quality_results.json qtr/quality_tables.md
fi
ls -la "$OUT"
