#!/usr/bin/env bash
# A/B on one GPU: this checkout against another checkout of slipstream (OLD_DIR, e.g. a worktree of the commit
# before a change), alternating fresh processes: `bench latency` (Llama-3.1-8B shape, random weights) and
# `bench throughput` (nano-vllm workload, Qwen3-0.6B shape). JSON results go to OUT/{old,new}-{latency,throughput}-N.json.
# BENCHES="throughput" runs one of them.
# Usage: bash scripts/ab_bench.sh OLD_DIR OUT [ROUNDS]
set -uo pipefail
cd "$(dirname "$0")/.."
old=$(cd "$1" && pwd); out=$2; rounds=${3:-2}
mkdir -p "$out"
base=${PYTHONPATH:-}
for i in $(seq 1 "$rounds"); do
  for side in old new; do
    dir=$PWD; [ "$side" = old ] && dir=$old
    for b in ${BENCHES:-latency throughput}; do
      extra=(); [ "$b" = latency ] && extra=(--iters 3)
      (cd "$dir" && PYTHONPATH="$dir${base:+:$base}" python3 -m slipstream.cli bench "$b" "${extra[@]}" \
        --json "$out/$side-$b-$i.json") 2>&1 | grep -v "^\s*$" | tail -4
    done
  done
done
python3 - "$out" <<'PY'
import glob, json, statistics, sys
for b, key in (("latency", "decode_tok_s"), ("throughput", "output_tok_s")):
    for side in ("old", "new"):
        runs = [json.load(open(f))["results"] for f in sorted(glob.glob(f"{sys.argv[1]}/{side}-{b}-*.json"))]
        runs = [r[0] if isinstance(r, list) else r for r in runs]  # (latency: a result per batch size, one here)
        if not runs:
            continue
        vals = [round(r[key], 1) for r in runs]
        extra = [round(100 * r["cpu_share_of_step_time"], 1) for r in runs if "cpu_share_of_step_time" in r]
        print(f"{b:10s} {side}: {key} {vals} mean {statistics.mean(vals):.1f}  cpu share % {extra}")
PY
