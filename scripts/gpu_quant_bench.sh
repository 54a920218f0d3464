#!/usr/bin/env bash
# On one GPU: the Llama-3.1-8B shape (random weights) with 16-bit, FP8 and 4-bit weights, in one lease.
#   1. the 4-bit projections alone (bench kernels' int4 table): the fused GEMV, the W4A16 GEMM and the weight
#      dequantized whole + cuBLAS against bf16, from one row to a long prefill's; where dequant + cuBLAS overtakes
#      the W4A16 GEMM is kernels.W4A16_GEMM_ROWS;
#   2. decode tok/s by batch size for each weight format (bench latency, one engine per format, each batch size
#      against its roofline: the weight bytes plus the KV cache a step reads at measured copy bandwidth).
# usage: bash scripts/gpu_quant_bench.sh OUT_DIR [PARTS]   (PARTS: any of "layer latency"; BATCHES, FORMATS override)
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1 parts=${2:-layer latency}
mkdir -p "$out"
run() { python3 -m slipstream.cli bench "$@" 2>&1 | grep -v '^\[slipstream\]'; }
if [[ " $parts " == *" layer "* ]]; then
  run kernels --prefill-lens --decode-batches --no-gemv --no-fp8 --moe-tokens --int4-rows ${INT4_ROWS:-1 4 16 64 128 256 1024 4096} \
    --json "$out/int4-layer.json"
fi
if [[ " $parts " == *" latency "* ]]; then
  for q in ${FORMATS:-none int4 fp8}; do
    # shellcheck disable=SC2086
    run latency --model llama-3.1-8b --batch-size ${BATCHES:-1 4 16 64 256} --iters 1 --quantization $q \
      --json "$out/latency-8b-$q.json"
  done
fi
