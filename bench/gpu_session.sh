#!/usr/bin/env bash
# One device call: offline throughput (cold compile), then the same model served over HTTP from the
# warm compilation cache, measured with bench.serve. Usage: bash bench/gpu_session.sh [NUM_PROMPTS]
set -u
N=${1:-1000}
MODEL=${MODEL:-bench/configs/llama-3.1-8b}
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
python3 -m pip install --no-deps -q .carry/wheels/*.whl 2>&1 | grep -v WARNING | tail -1
COMMON=${COMMON:-"--load-format dummy --dtype bfloat16 --max-model-len 4096 --max-num-batched-tokens 4096"}
BUCKETS=${BUCKETS:-"--token-buckets 64 256 1024 4096"}
timeout ${OFFLINE_TIMEOUT:-330} python3 -m bench.throughput --model "$MODEL" $COMMON $BUCKETS --num-prompts "$N" \
  --output-json "$OUT/throughput_xla.json" > "$OUT/offline.log" 2>&1
echo "offline rc=$?"; tr '\r' '\n' < "$OUT/offline.log" | grep -E "output_tokens_per_s|startup_s|elapsed_s|Compiled|KV cache|wait_result|engine_step|runner_exec|steps" | head -20
MODEL_DIR=$(python3 -c "from bench.common import model_dir_with_tokenizer as m; print(m('$MODEL'))")
T0=$(date +%s)
python3 -m jaxllm.serve --model "$MODEL_DIR" --served-model-name llama-8b $COMMON $BUCKETS --port 8000 \
  --disable-log-stats > "$OUT/server.log" 2>&1 &
for _ in $(seq 1 150); do curl -sf localhost:8000/health >/dev/null && break; sleep 1; done
echo "server ready after $(( $(date +%s) - T0 )) s (warm compilation cache)"
timeout 200 python3 -m bench.serve --model llama-8b --num-prompts "$N" --request-rate inf \
  --output-json "$OUT/serve_inf.json" 2>&1 | tail -20
kill %1 2>/dev/null; wait
