#!/usr/bin/env bash
# The GPU check, as one script for a lent CUDA machine with no network (bench/README.md, "GPU"):
# TRL's PPO step against Dialoop's on the same card and model, `dialoop demo --quick` on CUDA, the training
# tests on CUDA, and the server on CUDA. Each step has its own time limit and writes its output under $OUT
# as it ends, so a step that runs out of time loses only itself.
#
# Prepare here (pip works here, not there): the missing packages as cp312 wheels in .whl/ and TRL's harness in
# .peers/ (both ignored by git; ../shared/peers/gpu/README.md says how), then run, carrying .whl and .peers:
#   bash bench/gpu_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRL_EXPERIMENTAL_SILENCE=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, print the verdict
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "[gpu-check] $name: exit $rc in $(($(date +%s) - start)) s"
  tail -n 4 "$OUT/$name.log"
}

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
DIALOOP=(python3 -c "from dialoop.cli import app; app()")  # an array, not a function: `timeout` runs it

nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"

# the embedded default's shape with random weights, next to its real tokenizer: every reply runs to the limit
python3 -c "from pathlib import Path; from dialoop.modeling.tiny import make_tiny_model; \
make_tiny_model(Path('/tmp/smol-rand'), full_size=True)" || exit 1

# 1. PPO step, 64 episodes of 64 tokens: TRL 1.12 then Dialoop, same card, same weights, back to back
if [ -d .peers ]; then
  sed 's/use_cpu=True,/use_cpu=not torch.cuda.is_available(),/' .peers/trl_ppo_step.py >.peers/trl_ppo_gpu.py
  step trl_ppo 150 python3 .peers/trl_ppo_gpu.py --model-dir /tmp/smol-rand --batch 64 --mini-batch 64 --stop none --bf16
fi
step dialoop_ppo 150 "${DIALOOP[@]}" bench ppo --json --device cuda --model /tmp/smol-rand --batch 64 --mini-batch 64
# 2. the whole loop on CUDA (tiny model, tiny budgets)
step demo_quick 150 "${DIALOOP[@]}" demo --quick --out /tmp/demo-quick
cp /tmp/demo-quick/report.json "$OUT/demo_quick_report.json" 2>/dev/null
# 3. the tests whose training, generation and demo run on the best device (here CUDA)
step pytest_cuda 180 python3 -m pytest -q -x -p no:cacheprovider -n 4 tests/test_train_sft.py tests/test_train_rm.py \
  tests/test_smoke_tiny.py tests/test_demo.py tests/test_loop.py \
  tests/test_engine.py
# 4. the server on CUDA: time to first token and tokens/s at 1, 4, 8 streams
step serve 120 "${DIALOOP[@]}" bench serve --json --model /tmp/smol-rand --max-tokens 64
# 5. the demo's own PPO workload (16 episodes of 48 tokens, 4 PPO epochs, top 6 blocks trained)
step dialoop_ppo_demo 120 "${DIALOOP[@]}" bench ppo --json --device cuda --model /tmp/smol-rand --batch 16 --mini-batch 16 \
  --ppo-epochs 4 --new-tokens 48 --trainable-layers 6 --steps 2
# 6. the generation engine alone, random weights of the default's shape, bf16: one stream, then 64 streams
#    (tokens_per_s in its JSON line: tokens / engine_s; ttft_staggered_over_one_stream: arrivals joining a running batch)
step engine_1 120 python3 -m dialoop.engine.bench --shape default --device cuda --dtype bfloat16 --rows 1 --new-tokens 256
step engine_64 150 python3 -m dialoop.engine.bench --shape default --device cuda --dtype bfloat16 --rows 64 --new-tokens 128
echo "[gpu-check] done"
