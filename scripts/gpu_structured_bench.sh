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
#   BRIEF=1: the two runs at 256 concurrent only (unconstrained, then a cached schema on every request): the
#   throughput ratio, in about half the device time
#   REPEAT=N: those two runs N times, alternating on the same server (one pair's ratio ranged 0.855-0.960 over six
#   machines, H100, leases AY-BB: the host drifts between and during runs), and each pair's ratio printed with the
#   ratio of the best runs
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
bench() {  # $1: structured mode, $2: concurrency, $3: prompts
  python3 -m slipstream.cli bench serve --base-url "http://127.0.0.1:$port" --model q3 --tokenizer "$model" \
    --dataset "$data" --num-prompts "$3" --max-concurrency "$2" --structured "$1" --label "$1-c$2" \
    --json "$out/$1-c$2.json" 2>&1 | tail -4
}
for i in $(seq 2 "${REPEAT:-1}"); do  # (the extra pairs first: the last pair below is the one profiled)
  bench none 256 "$n" && mv "$out/none-c256.json" "$out/none-c256-$i.json"
  bench json 256 "$n" && mv "$out/json-c256.json" "$out/json-c256-$i.json"
done
bench none 256 "$n"
if [ "${PROFILE:-0}" = 1 ]; then
  py-spy record --pid $pid --subprocesses --rate 100 --format raw --nonblocking -o "$out/pyspy-json.txt" > "$out/pyspy.log" 2>&1 &
  spy=$!
fi
bench json 256 "$n"
if [ "${PROFILE:-0}" = 1 ]; then kill -INT $spy; wait $spy; python3 scripts/pyspy_summary.py "$out/pyspy-json.txt" 15; fi
if [ "${BRIEF:-0}" != 1 ]; then
  bench json-unique 1 16; bench json 1 16; bench none 1 16
  bench json-unique 256 "$n"
fi
python3 - "$out" <<'PY'
import glob, json, os, sys
tok = lambda f: json.load(open(f))["results"][0]["output_tok_s"]  # noqa: E731
nones = sorted(glob.glob(os.path.join(sys.argv[1], "none-c256*.json")))
pairs = [(tok(n), tok(os.path.join(sys.argv[1], "json-" + os.path.basename(n)[5:]))) for n in nones]
print("constrained / unconstrained out tok/s, each pair:", ", ".join(f"{j / u:.3f}" for u, j in pairs),
      f"; best / best: {max(j for _, j in pairs) / max(u for u, _ in pairs):.3f}")
PY
kill -TERM $pid; wait $pid; echo "slipstream serve exited with $?"
grep -iE "error|warning|traceback" "$out/server.log" | head -5
[ "${BRIEF:-0}" = 1 ] || python3 scripts/grammar_costs.py "$model" 151936
