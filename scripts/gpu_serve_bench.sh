#!/usr/bin/env bash
# On one GPU: `slipstream serve` and vLLM's server on the same random-weight model directory, each driven by
# vLLM's own `bench serve` client and by `slipstream bench serve` (ShareGPT, Poisson arrivals, --ignore-eos).
# usage: bash scripts/gpu_serve_bench.sh MODEL_DIR SHAREGPT.json OUT_DIR [RATES...]   (default rates: 10 20 40 80 inf)
# ENGINES="slipstream vllm" (default) picks the servers. Needs vLLM importable (PYTHONPATH) for the peer server and its client. Servers run one at a time: each takes
# most of the GPU's memory.
set -uo pipefail
model=$1 data=$2 out=$3; shift 3
rates=${*:-10 20 40 80 inf}
mkdir -p "$out"
port=8123
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

wait_healthy() {  # $1: the server's pid
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
    kill -0 "$1" 2>/dev/null || { echo "the server exited"; return 1; }
    sleep 0.5
  done
  echo "server did not become healthy"; return 1
}

clients() {  # $1: engine label
  for r in $rates; do
    python3 -m vllm.entrypoints.cli.main bench serve --backend openai --base-url "http://127.0.0.1:$port" \
      --endpoint /v1/completions --model q3 --tokenizer "$model" --dataset-name sharegpt --dataset-path "$data" \
      --num-prompts 400 --request-rate "$r" --ignore-eos --seed 0 --save-result --result-dir "$out" \
      --result-filename "vllmclient-$1-$r.json" 2>&1 | grep -E "Successful|Failed|throughput|TTFT|TPOT|ITL" | sed "s/^/[$1 rate $r] /"
  done
  python3 -m slipstream.cli bench serve --base-url "http://127.0.0.1:$port" --model q3 --tokenizer "$model" \
    --dataset "$data" --num-prompts 400 --request-rate $rates --label "$1" --json "$out/ourclient-$1.json" 2>&1 | tail -12
}

serve_slipstream() {
python3 -m slipstream.cli serve "$model" --load-format dummy --dtype bfloat16 --served-model-name q3 --port $port \
  --max-model-len 4096 --log-level warning > "$out/slipstream-server.log" 2>&1 &
pid=$!
wait_healthy $pid && clients slipstream
kill -TERM $pid; wait $pid; echo "slipstream serve exited with $?"
tail -5 "$out/slipstream-server.log"
}

serve_vllm() {
python3 -m vllm.entrypoints.cli.main serve "$model" --load-format dummy --dtype bfloat16 --served-model-name q3 \
  --port $port --max-model-len 4096 > "$out/vllm-server.log" 2>&1 &
pid=$!
wait_healthy $pid && clients vllm
kill -TERM $pid; wait $pid
}

for e in ${ENGINES:-slipstream vllm}; do serve_$e; done
