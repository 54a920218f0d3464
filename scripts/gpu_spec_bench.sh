#!/usr/bin/env bash
# On one GPU: what speculative decoding buys (`slipstream bench speculative`), in one lease.
#   1. n-gram (prompt lookup) on answers that quote their prompt, the embedded model's real weights, batch 1 and 16
#      (14 prompts: batch 1 runs them one after another), k up to 4 and up to 8;
#   2. an EAGLE-3 head trained here by `slipstream train-draft` for the embedded model (ShareGPT prompts), then
#      measured on other ShareGPT prompts, batch 1 and 16;
#   3. the verification mechanism on the Llama-3.1-8B shape (random weights), batch 1: a drafter always right (the
#      ceiling for k drafts) and one always wrong (the cost floor), k = 1, 2, 4, 8, fixed;
#   4. the off-switch: n-gram on 1,024 chat prompts at batch 64 and 256 (adaptive k): at least 0.95x plain decoding.
# usage: bash scripts/gpu_spec_bench.sh SHAREGPT.json OUT_DIR [PARTS]   (PARTS: any of "ngram eagle3 oracle off")
set -uo pipefail
cd "$(dirname "$0")/.."
data=$1 out=$2 parts=${3:-ngram eagle3 oracle off}
mkdir -p "$out"
bench() { python3 -m slipstream.cli bench speculative --dtype bfloat16 "$@" 2>&1 | grep -v '^\[slipstream\]'; }
if [[ " $parts " == *" ngram "* ]]; then
  # k up to 4 and up to 8 (one plain run): on an H100 k = 8 fixed ran batch 1 at 1.99x, k = 4 at 1.79x (lease BA)
  bench --method ngram --workload quote --batch-sizes 1,16 --output-len 256 --num-speculative-tokens 4,8 --repeats 2 \
    --json "$out/ngram-quote.json"
fi
if [[ " $parts " == *" eagle3 "* ]]; then
  python3 -m slipstream.cli train-draft --prompts "$data" --num-prompts 2000 --answer-tokens 256 --epochs 3 \
    --out "$out/smol-eagle3" --dtype bfloat16 --max-model-len 2048 --gpu-memory-utilization 0.5 --quiet | tail -1
  python3 - "$data" "$out/heldout.txt" <<'PY'
import json, sys
convs = [c["conversations"][0]["value"] for c in json.load(open(sys.argv[1])) if c.get("conversations")]
open(sys.argv[2], "w").write("\n".join(p.replace("\n", " ") for p in convs[2500:] if 16 <= len(p) <= 2000))
PY
  bench --method eagle3 --speculative-model "$out/smol-eagle3" --workload chat --dataset "$out/heldout.txt" \
    --batch-sizes 1,16 --output-len 256 --num-prompts 16 --json "$out/eagle3-chat.json"
fi
if [[ " $parts " == *" oracle "* ]]; then
  bench --model llama-3.1-8b --method oracle,wrong --fixed-k --num-speculative-tokens 1,2,4,8 --batch-sizes 1 \
    --num-prompts 4 --output-len 128 --ignore-eos --max-model-len 2048 --json "$out/oracle-wrong.json"
fi
if [[ " $parts " == *" off "* ]]; then
  python3 - "$data" "$out/chat.txt" <<'PY'
import json, sys
convs = [c["conversations"][0]["value"] for c in json.load(open(sys.argv[1])) if c.get("conversations")]
open(sys.argv[2], "w").write("\n".join(p.replace("\n", " ") for p in convs[:2500] if 16 <= len(p) <= 2000))
PY
  # (1,024 prompts: a batch size runs whole waves of them, 16 of 64 and 4 of 256; a single wave's run lasted
  # 0.4-1.1 s, too short to carry one late compile, leases AW and AX)
  # (the best of three runs each: single runs drifted with the host by up to a fifth, leases AZ and BA)
  bench --method ngram --workload chat --dataset "$out/chat.txt" --batch-sizes 64,256 --num-prompts 1024 \
    --output-len 256 --repeats 3 --json "$out/ngram-offswitch.json"
fi
