#!/usr/bin/env bash
# On a CUDA machine: the kernel tests in bf16/fp16/fp32 (attention, GEMV, FP8, fused MoE, W4A16), multi-token steps (fp32,
# in CUDA graphs), FP8 weights (formats, kernels, the engine on FP8 checkpoints), draft heads' chains in CUDA graphs
# (EAGLE-3, MTP: the same drafts as eager), grammar masks the stream waits for behind a host gate (the same outputs as
# masks filled before each draw), the end-to-end Triton-vs-torch check, and
# `slipstream serve` under concurrent load in bf16 on the Hopper kernels (prompts of 65 to 16K tokens), with 16-bit,
# FP8 and 4-bit weights, with n-gram drafts (chains and token trees), with an FP8 KV cache, and MoE models with FP8
# experts (and an FP8 output head) and with 4-bit experts and MTP drafting.
# Usage: bash scripts/gpu_check.sh [MODEL.gguf|HF_DIR] [DUMMY_HF_DIR]
#   MODEL: for the end-to-end check (default: the embedded model, if installed)
#   DUMMY_HF_DIR: a config.json + tokenizer directory served with random weights (default: the bundled Qwen3-0.6B
#   config with a synthetic tokenizer, written by `slipstream.bench.common.model_dir`)
# PARTS="tests serve" (default): on a new machine, where Triton compiles every kernel on first use, the tests alone
# take about eleven minutes on an H200 (lease AG): PARTS=kernels (kernels, MoE, 4-bit: 5.5 min), PARTS=engines (FP8,
# multi-token, EAGLE-3, MTP: 4.5 min) and PARTS=serve run them apart ("tests" is the first two).
set -uo pipefail
cd "$(dirname "$0")/.."
rc=0
parts=${PARTS:-tests serve}
[[ " $parts " == *" tests "* ]] && parts="$parts kernels engines"
# pytest-xdist, where installed: tests spread one by one over the workers (test_moe.py alone is half the kernel tests;
# by file, one worker ran it for five minutes), and Triton's on-disk cache lets each kernel compile about once
xdist=(); python3 -c "import xdist" 2>/dev/null && xdist=(-n "${GPU_TEST_WORKERS:-12}" --dist load)
# Most of the engines part's time on a new machine is autotuning, not compiling: each test engine tunes its tiny
# shapes in every CUDA-graph batch bucket, each of 12 workers again, all of them timing on one GPU (lease AV, H100:
# 50 of the 81 engine tests reported in 330 s; the faulthandler's stacks of the rest were all in do_bench). Triton's
# own on-disk tuning cache lets a worker reuse what another has tuned. Only processes started with it read those
# (contended) timings back: the serve checks and benchmarks run without it tune for themselves, and still share the
# compiled kernels.
test_env=(env TRITON_CACHE_AUTOTUNING=1)
if [[ " $parts " == *" kernels "* ]]; then
  "${test_env[@]}" python3 -m pytest -q -rf "${xdist[@]}" tests/test_kernels.py tests/test_moe.py tests/test_int4.py -p no:cacheprovider || rc=1
fi
if [[ " $parts " == *" engines "* ]]; then
  "${test_env[@]}" python3 -m pytest -q -rf "${xdist[@]}" tests/test_fp8.py tests/test_multi_token.py tests/test_eagle3.py tests/test_mtp.py \
    tests/test_async_scheduling.py::test_masks_behind_the_gate_on_a_gpu_change_no_output \
    tests/test_structured.py::test_widening_a_mask_never_waits_for_the_device -p no:cacheprovider || rc=1
fi
[[ " $parts " == *" serve "* ]] || exit $rc
python3 scripts/gpu_e2e.py "${1:-$(python3 -c 'from slipstream.loader import embedded_model_path as p; print(p())')}" || rc=1
dummy=${2:-$(python3 -c 'from slipstream.bench.common import model_dir; print(model_dir("qwen3-0.6b"))')}
# the synthetic tokenizer's words are w0, w1, ...: the constrained tenth of the requests asks for one of them
python3 scripts/serve_check.py "$dummy" --load-format dummy --dtype bfloat16 --requests 200 --max-prompt 16384 --vocab 151000 \
  --regex 'w[0-9]{1,6}' || rc=1
python3 scripts/serve_check.py "$dummy" --load-format dummy --dtype bfloat16 --requests 200 --max-prompt 16384 --vocab 151000 \
  --regex 'w[0-9]{1,6}' --quantization fp8 || rc=1
# n-gram drafts, verified behind the step in flight (seeded draws, clients hanging up, grammars beside them)
python3 scripts/serve_check.py "$dummy" --load-format dummy --dtype bfloat16 --requests 200 --max-prompt 16384 --vocab 151000 \
  --regex 'w[0-9]{1,6}' --speculative-method ngram --num-speculative-tokens 4 || rc=1
# n-gram token trees (tree steps read before the next is planned, their kept drafts' KV moved)
python3 scripts/serve_check.py "$dummy" --load-format dummy --dtype bfloat16 --requests 200 --max-prompt 16384 --vocab 151000 \
  --regex 'w[0-9]{1,6}' --speculative-method ngram --num-speculative-tokens 6 --speculative-branches 3 || rc=1
python3 scripts/serve_check.py "$dummy" --load-format dummy --dtype bfloat16 --requests 200 --max-prompt 16384 --vocab 151000 \
  --regex 'w[0-9]{1,6}' --quantization int4 || rc=1
python3 scripts/serve_check.py "$dummy" --load-format dummy --dtype bfloat16 --requests 200 --max-prompt 16384 --vocab 151000 \
  --regex 'w[0-9]{1,6}' --kv-cache-dtype fp8 || rc=1
# a MoE model with FP8 experts (the fused kernels' FP8 variant in CUDA graphs), Qwen3-30B-A3B's shape, its output
# head rounded to FP8 as well (a 151,936-row FP8 GEMV and GEMM)
moe=$(python3 -c 'from slipstream.bench.common import model_dir; print(model_dir("qwen3-30b-a3b"))')
python3 scripts/serve_check.py "$moe" --load-format dummy --dtype bfloat16 --requests 100 --max-prompt 8192 --vocab 151000 \
  --regex 'w[0-9]{1,6}' --quantization fp8 --quantize-lm-head || rc=1
# GLM-4.5-Air's shape as a 4-bit (AWQ) checkpoint would hold it (about 60 GB; its 16-bit form would not fit), its MTP
# module drafting
glm=$(python3 -c 'from slipstream.bench.common import model_dir, AWQ_4BIT; print(model_dir("glm-4.5-air", AWQ_4BIT))')
python3 scripts/serve_check.py "$glm" --load-format dummy --dtype bfloat16 --requests 60 --max-prompt 4096 --vocab 151000 \
  --regex 'w[0-9]{1,6}' --speculative-method mtp --num-speculative-tokens 2 || rc=1
exit $rc
