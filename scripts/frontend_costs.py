"""Host cost of the API front end's output path per streamed token, on this machine's CPU: a step's token deltas for
N streams through OutputProcessor (incremental detokenization, RequestOutputs) and the SSE chunk encoding, with the
serving process's heap as it is after start-up (tokenizer, FastAPI, grammar engine imported), once with the garbage
collector scanning that heap and once with it frozen (what the server does once ready).

usage: python3 scripts/frontend_costs.py [MODEL_DIR_OR_BUNDLED_NAME] [STREAMS] [STEPS]
"""
from __future__ import annotations

import gc
import random
import sys
import time

import orjson

from slipstream.bench.common import model_dir
from slipstream.engine.output_processor import OutputProcessor
from slipstream.engine.outputs import SeqDelta
from slipstream.loader import load_tokenizer
from slipstream.sampling_params import SamplingParams
import slipstream.server.app  # noqa: F401 - the front end's imports are part of the heap the collector scans
import slipstream.grammar  # noqa: F401

model = sys.argv[1] if len(sys.argv) > 1 else "qwen3-0.6b"
streams = int(sys.argv[2]) if len(sys.argv) > 2 else 400
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 300
tok = load_tokenizer(model_dir(model))
vocab = min(len(tok), 32000)


def run(frozen: bool) -> tuple[float, float, int]:
    """(mean us per token, worst step ms, full collections)"""
    gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()
    rng = random.Random(0)
    proc = OutputProcessor(tok)
    params = SamplingParams(max_tokens=steps + 1, ignore_eos=True)
    for i in range(streams):
        proc.add(f"r{i}", None, [rng.randrange(10, vocab) for _ in range(200)], params, stream=True)
    full = [0]
    cb = lambda phase, info: full.__setitem__(0, full[0] + (phase == "stop" and info["generation"] == 2))  # noqa: E731
    gc.callbacks.append(cb)
    times = []
    try:
        for _ in range(steps):
            deltas = [SeqDelta(f"r{i}", 0, [rng.randrange(10, vocab)]) for i in range(streams)]
            t = time.perf_counter()
            outs, _ = proc.process(deltas)
            for o in outs:
                c = o.outputs[0]
                orjson.dumps({"id": o.request_id, "object": "text_completion", "choices": [
                    {"index": 0, "text": c.delta_text, "logprobs": None, "finish_reason": c.finish_reason}]})
            times.append(time.perf_counter() - t)
    finally:
        gc.callbacks.remove(cb)
        gc.unfreeze()
    return 1e6 * sum(times) / (steps * streams), 1e3 * max(times), full[0]


print(f"{len(gc.get_objects())} objects tracked after start-up; {streams} streams, {steps} steps of one token each")
for frozen in (False, True, False, True):
    us, worst, full = run(frozen)
    print(f"heap {'frozen ' if frozen else 'scanned'}: {us:5.1f} us per token, worst step {worst:6.1f} ms, "
          f"{full} full collections")
