#!/usr/bin/env bash
# On one GPU: structured output under load. `slipstream serve` on the Qwen3-0.6B shape with random weights and the
# embedded model's tokenizer (a real BPE vocabulary, in which JSON can be spelled), ShareGPT prompts streamed by
# `slipstream bench serve` at 256 concurrent requests: unconstrained, a JSON schema on every request (four schemas,
# cached after their first use) and a new schema on every request (each compiled fresh); then one request at a time,
# for TTFT with a cached vs a fresh schema; then the host's grammar costs for this tokenizer.
# usage: bash scripts/gpu_structured_bench.sh SHAREGPT.json OUT_DIR [NUM_PROMPTS]
#   TOKENIZER=DIR: a saved tokenizer in place of the embedded model's (where the package is not installed)
#   PROFILE=1: py-spy samples both server processes during the cached-schema run at 256 concurrent, into
#   OUT_DIR/pyspy-json.txt (summarize with scripts/pyspy_summary.py)
#   BRIEF=1: the runs at 256 concurrent only (unconstrained, a cached schema on every request, the same work unconstrained): the
#   throughput ratio, in about half the device time
#   REPEAT=N: those runs N times, alternating on the same server (one pair's ratio ranged 0.855-0.960 over six
#   machines, H100, leases AY-BB: the host drifts between and during runs), and each pair's ratio printed with the
#   ratio of the best runs. After each constrained run an unconstrained one asks each prompt for the tokens it
#   produced constrained (the same work): its ratio is printed too
set -uo pipefail
cd "$(dirname "$0")/.."
data=$1 out=$2 n=${3:-1024}
mkdir -p "$out"
model=$(python3 - <<'PY'
import json, os, tempfile
from importlib import resources
from slipstream.loader import embedded_model_path, load_tokenizer
d = tempfile.mkdtemp(prefix="slipstream-structured-")
tok = load_tokenizer(os.environ.get("TOKENIZER") or embedded_model_path())
cfg = json.loads(resources.files("slipstream.configs").joinpath("qwen3-0.6b.json").read_text())
# the head keeps Qwen3's 151,936 rows (past the tokenizer's 49,152: padding, as real checkpoints pad); the stop token
# is the tokenizer's own, which the grammar can end on
cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
json.dump(cfg, open(f"{d}/config.json", "w"))
tok.save_pretrained(d)
print(d)
PY
)
port=8125
python3 -m slipstream.cli serve "$model" --load-format dummy --dtype bfloat16 --served-model-name q3 --port $port \
  --max-model-len 4096 --log-level warning > "$out/server.log" 2>&1 &
pid=$!
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.5; done
bench() {  # $1: the run's name (its file OUT_DIR/NAME.json), $2: structured mode, $3: concurrency, $4: prompts, then more
  local name=$1 mode=$2 c=$3 num=$4; shift 4
  python3 -m slipstream.cli bench serve --base-url "http://127.0.0.1:$port" --model q3 --tokenizer "$model" \
    --dataset "$data" --num-prompts "$num" --max-concurrency "$c" --structured "$mode" --label "$name" \
    --json "$out/$name.json" "$@" 2>&1 | tail -4
}
# An unconstrained run, a constrained one, and an unconstrained one asking each prompt for the tokens it produced
# constrained ("same": the same work; answers whose JSON is complete end early, about 5% fewer tokens in all)
pair() {  # $1: a suffix for the three runs' names
  bench "none-c256$1" none 256 "$n"
  [ "${PROFILE:-0}" = 1 ] && [ -z "$1" ] && {
    py-spy record --pid $pid --subprocesses --rate 100 --format raw --nonblocking -o "$out/pyspy-json.txt" > "$out/pyspy.log" 2>&1 &
    spy=$!; }
  bench "json-c256$1" json 256 "$n"
  [ "${PROFILE:-0}" = 1 ] && [ -z "$1" ] && { kill -INT $spy; wait $spy; python3 scripts/pyspy_summary.py "$out/pyspy-json.txt" 15; }
  bench "same-c256$1" none 256 "$n" --output-lens-from "$out/json-c256$1.json"
}
for i in $(seq 2 "${REPEAT:-1}"); do pair "-$i"; done  # (the extra pairs first: the last one is the one profiled)
pair ""
if [ "${BRIEF:-0}" != 1 ]; then
  bench json-unique-c1 json-unique 1 16; bench json-c1 json 1 16; bench none-c1 none 1 16
  bench json-unique-c256 json-unique 256 "$n"
fi
python3 - "$out" <<'PY'
import glob, json, os, sys
tok = lambda f: json.load(open(f))["results"][0]["output_tok_s"]  # noqa: E731
runs = [(tok(n), tok(n.replace("/none-", "/json-")), tok(n.replace("/none-", "/same-")))
        for n in sorted(glob.glob(os.path.join(sys.argv[1], "none-c256*.json")))]
for name, i in (("unconstrained", 0), ("unconstrained, the same tokens", 2)):
    print(f"constrained / {name}, out tok/s, each run: " + ", ".join(f"{r[1] / r[i]:.3f}" for r in runs)
          + f"; best / best: {max(r[1] for r in runs) / max(r[i] for r in runs):.3f}")
PY
kill -TERM $pid; wait $pid; echo "slipstream serve exited with $?"
grep -iE "error|warning|traceback" "$out/server.log" | head -5
[ "${BRIEF:-0}" = 1 ] || python3 scripts/grammar_costs.py "$model" 151936
