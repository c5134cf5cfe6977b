#!/usr/bin/env bash
# Issue 10: SmolLM2-135M learning run with the policy started at greedy's plan, in ONE device call
# (one H200, <= 8 minutes of training), from a copy of the repository laid out as for
# bench/gpu_learning_transfer.sh: wheels in ../.whl, the GGUF in parts in ../.carry*/, qdata.tar.xz
# (wikitext-2) in the repository copy.
#
#   bash bench/gpu_smollm2_plan.sh 460      # seconds of training before SIGINT (saves summary + tb)
#
# Writes $OUT/smollm2_plan.log and $OUT/smollm2_plan.tgz (summary.json, config.json, tb/,
# best_recipe.json); then, here: tar xzf smollm2_plan.tgz -C runs && python
# bench/plot_learning_curve.py runs/smollm2_plan bench/results/learning_smollm2_plan.png
# --greedy-reward <greedy's reward, printed as "reward before" in the log>
set -u
limit=${1:-460}
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/parts "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl || exit 1
mkdir -p .device && tar xJf qdata.tar.xz -C .device
cp ../.carry*/SmolLM2-135M-Instruct.Q4_1.gguf.part* /tmp/parts/
cat /tmp/parts/SmolLM2-135M-Instruct.Q4_1.gguf.part* > /tmp/smollm2.gguf
sha256sum /tmp/smollm2.gguf; nvidia-smi -L
timeout -s INT "$limit" python3 train_agent.py --model /tmp/smollm2.gguf --agent maskable_ppo \
  --config bench/smollm2_maskable_ppo.yaml --data .device/qdata/wikitext-2/train.txt --n-tokens 2048 \
  --env-kwargs device=cuda weight_cache_gib=24 --logdir /tmp/runs --name smollm2_plan --no-progress \
  > "$OUT/smollm2_plan.log" 2>&1
echo "train_agent exit status $?"
tail -20 "$OUT/smollm2_plan.log"
tar czf "$OUT/smollm2_plan.tgz" -C /tmp/runs smollm2_plan/summary.json smollm2_plan/config.json smollm2_plan/tb \
  smollm2_plan/best_recipe.json
ls -la "$OUT"
