#!/usr/bin/env bash
# The test suite (CPU; Triton kernels run under TRITON_INTERPRET=1 in their own tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m pip install -q "torch==2.13.0" -e ".[test]"  # pytest, hypothesis, triton (for the interpreter), ...
python3 -m pytest -q tests "$@"
