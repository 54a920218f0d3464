#!/usr/bin/env bash
# On one GPU: the MoE figures of one lease (random weights from the bundled configs), each with its roofline.
#   1. batch-1 decode of the Qwen3-30B-A3B shape with 16-bit, FP8 and 4-bit experts (bench latency: tok/s against
#      the active-weight roofline: attention, router and the k experts a token reaches, at measured copy bandwidth);
#   2. the nano-vllm throughput workload on the same shape, 16-bit;
#   3. the MoE layer alone (bench kernels' MoE table: ours vs torch._grouped_mm, bf16 and FP8 blocks; the grouped
#      GEMMs and the grouped GEMV apart, up to 64 tokens, where one overtakes the other);
#   4. GLM-4.5-Air's shape with 4-bit experts, batch 1 and 16, the MTP module drafting (random: the cost of its
#      verify steps, not a speed-up).
# The vLLM peer (its MoE ops: the kit's overlay without DENSE_ONLY) runs from ../shared/peers in the same lease.
# usage: bash scripts/gpu_moe_bench.sh OUT_DIR [PARTS]   (PARTS: any of "latency throughput layer glm")
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1 parts=${2:-latency throughput layer glm}
mkdir -p "$out"
run() { python3 -m slipstream.cli bench "$@" 2>&1 | grep -v '^\[slipstream\]'; }
if [[ " $parts " == *" latency "* ]]; then
  for q in none fp8 int4; do
    run latency --model qwen3-30b-a3b --batch-size 1 --quantization $q --json "$out/latency-q3moe-$q.json"
  done
fi
if [[ " $parts " == *" throughput "* ]]; then
  run throughput --model qwen3-30b-a3b --json "$out/throughput-q3moe.json"
fi
if [[ " $parts " == *" layer "* ]]; then
  run kernels --prefill-lens --decode-batches --no-gemv --no-fp8 --int4-rows --moe-tokens 1 2 4 8 16 64 512 4096 \
    --json "$out/moe-layer.json"
fi
if [[ " $parts " == *" glm "* ]]; then  # as an AWQ checkpoint would hold it: its 16-bit form does not fit one H200
  glm=$(python3 -c 'from slipstream.bench.common import model_dir, AWQ_4BIT; print(model_dir("glm-4.5-air", AWQ_4BIT))')
  for b in 1 16; do
    run latency --model "$glm" --batch-size $b --json "$out/latency-glm-awq-b$b.json"
  done
  run speculative --model "$glm" --method mtp --batch-sizes 1 --num-prompts 4 \
    --output-len 128 --ignore-eos --max-model-len 2048 --json "$out/glm-mtp.json"
fi
