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

from grammar_costs import _draw  # noqa: E402

from slipstream.bench.serve_bench import SCHEMAS, schema_for  # noqa: E402
from slipstream.grammar import Grammars  # noqa: E402
from slipstream.loader import embedded_model_path, load_tokenizer  # noqa: E402
from slipstream.sampling_params import StructuredOutputs  # noqa: E402


class _Gate:  # when each ticket was opened
    def __init__(self) -> None:
        self.ticket, self.opened_at = 0, {}

    def next_ticket(self) -> int:
        self.ticket += 1
        return self.ticket

    def wait(self, ticket: int) -> None:
        pass

    def open(self, ticket: int) -> None:
        self.opened_at[ticket] = time.perf_counter()


def _busy(seconds: float) -> None:
    end, x = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        x += 1


def main() -> None:
    tok, gate = load_tokenizer(embedded_model_path()), _Gate()
    g = Grammars(tok, 151936, [tok.eos_token_id], gate=gate)  # (sets the interval it fills under)
    if len(sys.argv) > 1:
        sys.setswitchinterval(float(sys.argv[1]))
    rng = random.Random(0)
    compiled = [g.compile(StructuredOutputs(json=schema_for(i, False))).result() for i in range(len(SCHEMAS))]
    rows = []
    for i in range(256):
        m = g.matcher(compiled[i % len(compiled)])
        for _ in range(rng.randrange(100)):
            if m.done:
                break
            m.advance(_draw(g, m, rng))
        if not m.done:
            rows.append((i, m, []))
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
