#!/usr/bin/env bash
# On one GPU: `slipstream serve` and vLLM's server on the same random-weight model directory, each driven by
# vLLM's own `bench serve` client (scripts/vllm_client_sweep.py: vLLM's code, one process for all rates) and by
# `slipstream bench serve` (ShareGPT, Poisson arrivals, --ignore-eos, 400 prompts per rate).
# usage: bash scripts/gpu_serve_bench.sh MODEL_DIR SHAREGPT.json OUT_DIR [RATES...]   (default rates: 10 20 40 80 inf)
# ENGINES="slipstream vllm" (default): the servers, one at a time (each takes most of the GPU's memory).
# VLLM_PATH: where vLLM 0.26 imports from; the peer's server and client run with PYTHONPATH=$VLLM_PATH alone.
# PROFILE=1: after its sweeps, one more run (at PROFILE_RATE, default inf; with vLLM's client, or ours where CLIENTS
# leaves vLLM's out) with py-spy sampling both slipstream processes (API front end and engine core) into
# OUT_DIR/pyspy-slipstream.txt (collapsed stacks, one line per stack).
# SERVE_FLAGS: extra flags for `slipstream serve`. CLIENTS="vllm ours" (default): which clients drive each server;
# CLIENTS=none: each server's start-up alone (launch to healthy, and what its log says of the phases).
set -uo pipefail
model=$1 data=$2 out=$3; shift 3
rates=${*:-10 20 40 80 inf}
mkdir -p "$out"
port=8123
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
peer() { PYTHONPATH=${VLLM_PATH:-} "$@"; }

wait_healthy() {  # $1: the server's pid, $2: its label; prints the time from launch to healthy
  local t0=$SECONDS
  for _ in $(seq 900); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && { echo "[$2] healthy $((SECONDS - t0)) s after launch"; return 0; }
    kill -0 "$1" 2>/dev/null || { echo "[$2] the server exited"; return 1; }
    sleep 0.5
  done
  echo "[$2] server did not become healthy"; return 1
}

vllm_client() {  # $1: label, $2: rates
  peer python3 scripts/vllm_client_sweep.py "$1" "$out" "$2" -- --backend openai --base-url "http://127.0.0.1:$port" \
    --endpoint /v1/completions --model q3 --tokenizer "$model" --dataset-name sharegpt --dataset-path "$data" \
    --num-prompts 400 --ignore-eos --seed 0 2>&1 \
    | grep -E "^====|Successful|Failed|throughput|TTFT|TPOT|ITL" | sed "s/^/[$1] /"
}

clients() {  # $1: engine label
  [[ " ${CLIENTS:-vllm ours} " == *" vllm "* ]] && vllm_client "$1" "$rates"
  [[ " ${CLIENTS:-vllm ours} " == *" ours "* ]] || return 0
  python3 -m slipstream.cli bench serve --base-url "http://127.0.0.1:$port" --model q3 --tokenizer "$model" \
    --dataset "$data" --num-prompts 400 --request-rate $rates --label "$1" --json "$out/ourclient-$1.json" 2>&1 | tail -8
}

serve_slipstream() {
  # shellcheck disable=SC2086
  python3 -m slipstream.cli serve "$model" --load-format dummy --dtype bfloat16 --served-model-name q3 --port $port \
    --max-model-len 4096 --log-level warning ${SERVE_FLAGS:-} > "$out/slipstream-server.log" 2>&1 &
  local pid=$!
  if wait_healthy $pid slipstream; then
    clients slipstream
    if [ "${PROFILE:-0}" = 1 ]; then
      py-spy record --pid $pid --subprocesses --rate 100 --format raw --nonblocking -o "$out/pyspy-slipstream.txt" \
        > "$out/pyspy.log" 2>&1 &
      local spy=$!
      sleep 1
      if [[ " ${CLIENTS:-vllm ours} " == *" vllm "* ]]; then
        vllm_client slipstream-profiled "${PROFILE_RATE:-inf}"
      else
        python3 -m slipstream.cli bench serve --base-url "http://127.0.0.1:$port" --model q3 --tokenizer "$model" \
          --dataset "$data" --num-prompts 400 --request-rate "${PROFILE_RATE:-inf}" --label profiled 2>&1 | tail -3
      fi
      kill -INT $spy; wait $spy; tail -2 "$out/pyspy.log"
    fi
  fi
  # the engine's steps by kind (decode: one CUDA graph; mixed: with prompt tokens) and their time on the device
  curl -s "http://127.0.0.1:$port/metrics" | grep -E "^slipstream:engine_step(s|_device_seconds)_total" | sed "s/^/[slipstream] /"
  kill -TERM $pid; wait $pid; echo "slipstream serve exited with $?"
  grep -E "ready in|CUDA graphs|KV cache" "$out/slipstream-server.log" | head -5
  echo "kernels compiled after warm-up: $(grep -c 'compiled after warm-up' "$out/slipstream-server.log")"
  grep 'compiled after warm-up' "$out/slipstream-server.log" | cut -c1-200 | head -8
}

serve_vllm() {
  # not through peer(): a backgrounded function is a subshell, and SIGTERM to it would leave the server running
  PYTHONPATH=${VLLM_PATH:-} python3 -m vllm.entrypoints.cli.main serve "$model" --load-format dummy --dtype bfloat16 \
    --served-model-name q3 --port $port --max-model-len 4096 > "$out/vllm-server.log" 2>&1 &
  local pid=$!
  wait_healthy $pid vllm && clients vllm
  kill -TERM $pid; wait $pid
  grep -E "max_num_seqs|Loading weights took|graph capturing finished|init engine" "$out/vllm-server.log" | head -5
}

for e in ${ENGINES:-slipstream vllm}; do serve_$e; done
