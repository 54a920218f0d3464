"""Whether a step's masks can fill on a thread beside the engine's Python work: `Grammars.masks_later` for 256 rows
part-way through `bench serve --structured json`'s schemas (the embedded model's tokenizer under a 151,936-row head),
while the calling thread stays busy in Python for 2, 5 and 10 ms; the time until the fill opened its gate, against the
fill alone. On this machine's CPU; the switch interval of the interpreter is the first argument (default: the one
`Grammars` sets when it is given a gate).

usage: python3 scripts/fill_thread_probe.py [SWITCH_INTERVAL_S]
"""
from __future__ import annotations

import random
import statistics
import sys
import time

sys.path.insert(0, "scripts")

from grammar_costs import RecordingGate, walked  # noqa: E402

from slipstream.grammar import Grammars  # noqa: E402
from slipstream.loader import embedded_model_path, load_tokenizer  # noqa: E402


def _busy(seconds: float) -> None:
    end, x = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        x += 1


def main() -> None:
    tok, gate = load_tokenizer(embedded_model_path()), RecordingGate()
    g = Grammars(tok, 151936, [tok.eos_token_id], gate=gate)  # (sets the interval it fills under)
    if len(sys.argv) > 1:
        sys.setswitchinterval(float(sys.argv[1]))
    rows = [(i, m, []) for i, m in enumerate(walked(g, 100, random.Random(0)))]
    alone = []
    for _ in range(20):
        t = time.perf_counter()
        g.masks(256, rows)
        alone.append(time.perf_counter() - t)
    print(f"{len(rows)} rows, switch interval {sys.getswitchinterval()} s; the fill alone: p50 {1e3 * statistics.median(alone):.2f} ms")
    for busy in (0.002, 0.005, 0.010):
        delays = []
        for _ in range(20):
            t = time.perf_counter()
            mask, filled = g.masks_later(256, rows)
            _busy(busy)
            filled.result()
            delays.append(gate.opened_at[mask.ticket] - t)
        print(f"  the caller busy {1e3 * busy:.0f} ms: the gate opened after p50 {1e3 * statistics.median(delays):.2f} ms, "
              f"max {1e3 * max(delays):.2f} ms")


if __name__ == "__main__":
    main()
