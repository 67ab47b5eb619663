#!/usr/bin/env bash
# One device call, several benches in a row, each under its own time limit, logs in $OUT.
#   bash bench/gpu_steps.sh kernels offline-xla offline-pallas structured latency serve
# Steps: kernels (bench/kernels.py table), gmm (bench/grouped_matmul.py, the MoE experts' GEMM), grid (the
# attention kernel's correctness grid), offline-<backend>
# (bench.throughput, sharegpt_like 1000), profile (the same under cProfile), structured (bench.structured_cost), latency
# (bench.latency), serve (server + bench.serve at inf rate, then 8 req/s), hf (bench.hf_compare),
# parity (bench/gpu_parity.py: a random 1B Llama against transformers, bf16), trace (bench/step_trace.py),
# startup (launch to the first served token, cold then warm from the compilation cache),
# loadtime (bench/kernels.py --load-time: a compiled decode step's load in a new process, with and
# without XLA's compiled-thunk serialization).
# Env: MODEL (bench/configs/llama-3.1-8b), N (1000), T_<step> (seconds), EXTRA (more engine flags),
# COMMON (the engine flags in place of the 8B defaults).
set -u
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .carry/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .carry/wheels/*.whl 2>&1 | grep -v -i warning | tail -2
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
MODEL=${MODEL:-bench/configs/llama-3.1-8b}
N=${N:-1000}
COMMON=${COMMON:-"--load-format dummy --dtype bfloat16 --max-model-len 4096 ${EXTRA:-}"}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local t0; t0=$(date +%s)
  echo "=== $name (limit ${secs}s) $(date +%T)"
  timeout --kill-after=10 "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $(( $(date +%s) - t0 )) s"
  tr '\r' '\n' < "$OUT/$name.log" | grep -a -E "$GREP" | grep -a -v -E "$NOISE" | tail -${TAILN:-25}
}
wait_loaded() {  # wait_loaded LOG: a served engine's buckets load in the background; wait for all of them
  for _ in $(seq 1 "${T_loaded:-300}"); do grep -q -a "Compiled .* forward buckets" "$1" && break; sleep 1; done
}
GREP='busy|wall_ms|span_ms|output_tokens_per_s|total_tokens_per_s|startup_s|elapsed_s|Compiled|KV cache|Activation|"steps"|_s":|ms_per|Error|error|Traceback|FAIL|^\||ceilings|rc=|^step |fuzz (failures|.*FAIL)|MISALIGNED|positions_|passed|failures|diff_matched'
NOISE='cuda_event.cc|cuda_executor.cc|cuda_host_allocator|cuda_device_allocator|Source Location|cuda_status.cc'

for s in "$@"; do
  case $s in
    kernels) step kernels "${T_kernels:-240}" python3 bench/kernels.py ${KERNEL_ARGS:-} ;;
    gmm) step gmm "${T_gmm:-240}" python3 -m bench.grouped_matmul ${GMM_ARGS:-} ;;
    loadtime) step loadtime "${T_loadtime:-300}" python3 bench/kernels.py --load-time ;;
    grid) step grid "${T_grid:-200}" python3 bench/kernels.py --only "decode 128 x 2048" --grid --budget-s "${B_grid:-150}" ;;
    offline-*) step "$s" "${T_offline:-300}" python3 -m bench.throughput --model "$MODEL" $COMMON \
        --attention-backend "${s#offline-}" --num-prompts "$N" --output-json "$OUT/$s.json" ${OFFLINE_ARGS:-} ;;
    profile) step profile "${T_profile:-150}" python3 -m bench.throughput --model "$MODEL" $COMMON \
        --num-prompts "$N" --profile ;;
    structured) step structured "${T_structured:-200}" python3 -m bench.structured_cost --model "$MODEL" $COMMON \
        --batch 64 ;;
    latency) step latency "${T_latency:-200}" python3 -m bench.latency --model "$MODEL" $COMMON \
        --output-json "$OUT/latency.json" ;;
    parity) step parity "${T_parity:-240}" python3 -m bench.gpu_parity --attention-backend "${PARITY_BACKEND:-pallas}" \
        --output-json "$OUT/parity.json" ;;
    trace) step trace "${T_trace:-200}" python3 bench/step_trace.py --model "$MODEL" $COMMON \
        --batches 1 256 --sharegpt "$N" \
        --out /tmp/jaxllm-trace --output-json "$OUT/trace.json" ;;
    hf) step hf "${T_hf:-480}" python3 -m bench.hf_compare --model "$MODEL" --max-model-len 4096 \
        --num-prompts "${N_hf:-200}" --max-seconds 90 ${HF_ARGS:---run-jaxllm} --output-json "$OUT/hf.json" ;;
    serve)
      MODEL_DIR=$(python3 -c "from bench.common import model_dir_with_tokenizer as m; print(m('$MODEL'))")
      t0=$(date +%s)
      python3 -m jaxllm.serve --model "$MODEL_DIR" --served-model-name llama-8b $COMMON --port 8000 \
        --disable-log-stats > "$OUT/server.log" 2>&1 &
      for _ in $(seq 1 "${T_ready:-240}"); do curl -sf localhost:8000/health >/dev/null && break; sleep 1; done
      echo "server ready after $(( $(date +%s) - t0 )) s"
      wait_loaded "$OUT/server.log"  # measure the server with every bucket loaded
      echo "every bucket loaded after $(( $(date +%s) - t0 )) s"
      step serve-inf "${T_serve:-200}" python3 -m bench.serve --model llama-8b --num-prompts "$N" \
        --request-rate inf --output-json "$OUT/serve_inf.json"
      step serve-8 "${T_serve8:-150}" python3 -m bench.serve --model llama-8b --num-prompts "${N8:-400}" \
        --request-rate 8 --output-json "$OUT/serve_8.json"
      kill %1 2>/dev/null; wait ;;
    startup)  # time from launch to the first completion token: cold (empty compilation cache), then warm
      MODEL_DIR=$(python3 -c "from bench.common import model_dir_with_tokenizer as m; print(m('$MODEL'))")
      CACHE=$(mktemp -d)
      for run in cold warm; do
        t0=$(date +%s%N)
        python3 -m jaxllm.serve --model "$MODEL_DIR" --served-model-name llama-8b $COMMON --port 8000 \
          --disable-log-stats --compilation-cache-dir "$CACHE" > "$OUT/startup-$run.log" 2>&1 &
        for _ in $(seq 1 "${T_ready:-240}"); do
          curl -sf localhost:8000/v1/completions -H 'Content-Type: application/json' \
            -d '{"model": "llama-8b", "prompt": "Hello", "max_tokens": 1}' >/dev/null && break
          sleep 0.5
        done
        echo "startup $run: first token after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
        wait_loaded "$OUT/startup-$run.log"  # so the warm run finds every bucket in the cache
        echo "startup $run: every bucket loaded after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
        grep -a -E "Compiled|KV cache|Activation|Loaded" "$OUT/startup-$run.log" | tail -5
        kill %1 2>/dev/null; wait
        # The warm run must not start while the driver still tears down the cold server's pool:
        # a warm run started during that teardown reached jax's first line much later than the
        # cold run (bench/RESULTS.md).
        for _ in $(seq 1 120); do
          [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null)" ] && break; sleep 0.5
        done
        echo "startup $run: GPU free again after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
      done ;;
    *) echo "unknown step $s" ;;
  esac
done
