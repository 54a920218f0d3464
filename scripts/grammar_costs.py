"""What structured output costs on the host: compile time for each of tests/test_structured.py's ten schemas (plus
a regex and a tool_choice="required" schema) for a model's tokenizer, fresh (no cache) and again (the cache); and
one decode step's grammar work for 256 sequences part-way through JSON objects: the mask fill (one row at a time, and
in xgrammar's threads) and taking the drawn tokens.

usage: python3 scripts/grammar_costs.py [MODEL] [VOCAB_SIZE]   (MODEL "" for the embedded one; VOCAB_SIZE: the model's,
where it pads the tokenizer's)
"""
from __future__ import annotations

import os
import random
import statistics
import sys
import time

import torch
import xgrammar as xgr

sys.path.insert(0, "tests")

from test_structured import SCHEMAS  # noqa: E402
from test_tools import TIME, WEATHER  # noqa: E402

from slipstream.bench.serve_bench import SCHEMAS as BENCH_SCHEMAS, schema_for  # noqa: E402
from slipstream.grammar import Grammars  # noqa: E402
from slipstream.loader import embedded_model_path, load_tokenizer  # noqa: E402
from slipstream.sampling_params import StructuredOutputs  # noqa: E402
from slipstream.server.tools import required_schema  # noqa: E402


def main() -> None:
    tok = load_tokenizer(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else embedded_model_path())
    vocab = len(tok)
    vocab_size = int(sys.argv[2]) if len(sys.argv) > 2 else vocab
    constraints = [StructuredOutputs(json=m.model_json_schema()) for m in SCHEMAS]
    constraints += [StructuredOutputs(regex=r"[A-Z][a-z]{2,6}-\d{2}"),
                    StructuredOutputs(json=required_schema([WEATHER, TIME], True))]
    g = Grammars(tok, vocab, [tok.eos_token_id])
    started = time.perf_counter()
    g.compile(StructuredOutputs(json_object=True)).result()
    print(f"tokenizer table ({vocab} tokens) + first grammar: {1e3 * (time.perf_counter() - started):.1f} ms")
    fresh, cached = [], []
    for so in constraints:
        g._cache.clear()  # fresh: neither our cache nor xgrammar's holds this grammar
        g._compiler.clear_cache()
        t = time.perf_counter()
        g.compile(so).result()
        fresh.append(1e3 * (time.perf_counter() - t))
        t = time.perf_counter()
        g.compile(so).result()
        cached.append(1e3 * (time.perf_counter() - t))
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    print(f"{len(fresh)} grammars, fresh compile ms: p50 {statistics.median(fresh):.2f}  p99 {q(fresh, 0.99):.2f}  max {max(fresh):.2f}")
    print(f"cached: p50 {statistics.median(cached):.3f} ms  max {max(cached):.3f} ms")

    steps(tok, vocab_size)


def steps(tok, vocab_size: int) -> None:  # noqa: ANN001
    """One decode step's grammar work for 256 sequences under `bench serve --structured json`'s schemas, each walked
    a random number of tokens drawn uniformly from what its grammar allows (as a random-weight model draws them):
    the mask fill, one row at a time and with xgrammar's threaded batch fill, and taking each row's drawn token."""
    g = Grammars(tok, vocab_size, [tok.eos_token_id])
    rng = random.Random(0)
    live = walked(g, 200, rng)
    rows = [(i, m, []) for i, m in enumerate(live)]
    n = len(rows)
    draws = [_draw(g, m, rng) for m in live]
    out = torch.full((n, (g.grammar_vocab + 31) // 32), -1, dtype=torch.int32)
    timings: dict[str, list[float]] = {}

    def timed(name: str, fn) -> None:  # noqa: ANN001
        for _ in range(5):
            t = time.perf_counter()
            fn()
            timings.setdefault(name, []).append(1e3 * (time.perf_counter() - t))

    def one_at_a_time() -> None:
        for r, m, _ in rows:
            m.fill(out, r)

    timed("Grammars.masks, as the engine calls it (widened on the device)", lambda: g.masks(n, rows))
    timed("Grammars.masks, widened here", lambda: g.masks(n, rows).widen(torch.device("cpu")))
    gated = Grammars(tok, vocab_size, [tok.eos_token_id], gate=RecordingGate())  # (its matchers are g's: same rows)
    for _ in range(5):  # the caller's part alone; the fill is awaited before the matchers are used again
        t = time.perf_counter()
        _, filled = gated.masks_later(n, rows)
        timings.setdefault("Grammars.masks_later, the caller's part (the fill on its thread)", []).append(
            1e3 * (time.perf_counter() - t))
        filled.result()
    timed("fill, one row at a time", one_at_a_time)
    for threads in (1, 2, 4, 8, 16):
        if threads <= (os.cpu_count() or 1):
            batch = xgr.BatchGrammarMatcher(max_threads=threads)
            timed(f"fill, batch of {n}, {threads} threads", lambda: batch.batch_fill_next_token_bitmask([m._m for m in live], out))

    def accept_one_by_one() -> None:
        for m, t in zip(live, draws):
            m.advance(t)
        for m in live:
            m.undo(1)

    def accept_batched() -> None:
        xgr.BatchGrammarMatcher.batch_accept_token([m._m for m in live], draws)
        xgr.BatchGrammarMatcher.batch_rollback([m._m for m in live], 1)

    timed("take the drawn token, one at a time (+ undo)", accept_one_by_one)
    timed("take the drawn token, batched (+ undo)", accept_batched)
    print(f"one step's grammar work for {n} live sequences, vocabulary {vocab_size} ({os.cpu_count()} CPUs), median of 5:")
    for name, ts in timings.items():
        print(f"  {name}: {statistics.median(ts):.2f} ms")


def walked(g: Grammars, most: int, rng: random.Random) -> list:
    """256 matchers over `bench serve --structured json`'s schemas, each walked up to `most` random allowed tokens;
    those not yet done."""
    compiled = [g.compile(StructuredOutputs(json=schema_for(i, False))).result() for i in range(len(BENCH_SCHEMAS))]
    matchers = []
    for i in range(256):
        m = g.matcher(compiled[i % len(compiled)])
        for _ in range(rng.randrange(most)):
            if m.done:
                break
            m.advance(_draw(g, m, rng))
        matchers.append(m)
    return [m for m in matchers if not m.done]


class RecordingGate:
    """A GPU's gate with nothing to hold, on the host: when each ticket was opened (masks_later's fill done)."""

    def __init__(self) -> None:
        self.ticket, self.opened_at = 0, {}

    def next_ticket(self) -> int:
        self.ticket += 1
        return self.ticket

    def wait(self, ticket: int) -> None:
        pass

    def open(self, ticket: int) -> None:
        self.opened_at[ticket] = time.perf_counter()


def _draw(g: Grammars, m, rng: random.Random) -> int:  # noqa: ANN001
    mask = g.masks(1, [(0, m, [])]).widen(torch.device("cpu"))[0]
    words = mask.view(-1)
    allowed = [w * 32 + b for w in range(words.numel()) if (x := int(words[w])) for b in range(32) if (x >> b) & 1]
    return rng.choice([t for t in allowed if t < g.vocab_size])

if __name__ == "__main__":
    main()
