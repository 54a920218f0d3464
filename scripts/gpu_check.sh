#!/usr/bin/env bash
# On a CUDA machine: the kernel tests in bf16/fp16/fp32 and the end-to-end Triton-vs-torch check.
# Usage: bash scripts/gpu_check.sh [MODEL.gguf|HF_DIR]   (default: the embedded model, if installed)
set -uo pipefail
cd "$(dirname "$0")/.."
rc=0
python3 -m pytest -q tests/test_kernels.py -p no:cacheprovider || rc=1
python3 scripts/gpu_e2e.py "${1:-$(python3 -c 'from slipstream.loader import embedded_model_path as p; print(p())')}" || rc=1
exit $rc
