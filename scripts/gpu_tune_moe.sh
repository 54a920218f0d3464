#!/usr/bin/env bash
# On a CUDA machine: tune the fused MoE kernels' tiles for one bundled MoE config and weight format; the table (and
# the timings, tuned vs before) go to OUT, to be committed under slipstream/configs/moe/.
# Usage: bash scripts/gpu_tune_moe.sh MODEL WEIGHTS OUT   e.g. qwen3-30b-a3b bf16 $OUT (about 5-8 minutes on an H200)
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1 weights=$2 out=$3
python3 -m slipstream.cli tune moe --model "$model" --weights "$weights" --json "$out/tune-$model-$weights.json"
cp slipstream/configs/moe/*.json "$out/" 2>/dev/null || true
