"""What structured output costs on the host: compile time for each of tests/test_structured.py's ten schemas (plus
a regex and a tool_choice="required" schema) for a model's tokenizer, fresh (no cache) and again (the cache); and
the per-step mask fill for 256 sequences part-way through a JSON object, one at a time (as the engine does) and with
xgrammar's threaded batch fill.

usage: python3 scripts/grammar_costs.py [MODEL]
"""
from __future__ import annotations

import statistics
import sys
import time

import xgrammar as xgr

sys.path.insert(0, "tests")

from test_structured import SCHEMAS, Team  # noqa: E402
from test_tools import TIME, WEATHER  # noqa: E402

from slipstream.grammar import Grammars  # noqa: E402
from slipstream.loader import embedded_model_path, load_tokenizer  # noqa: E402
from slipstream.sampling_params import StructuredOutputs  # noqa: E402
from slipstream.server.tools import required_schema  # noqa: E402


def main() -> None:
    tok = load_tokenizer(sys.argv[1] if len(sys.argv) > 1 else embedded_model_path())
    vocab = len(tok)
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

    compiled = g.compile(StructuredOutputs(json=Team.model_json_schema())).result()
    ids = tok.encode('{"lead": {"name": "Ann", "age": 31}, "members": [{"name": "Bo', add_special_tokens=False)
    matchers = []
    for i in range(256):  # at every point of that text
        m = g.matcher(compiled)
        m.take(ids[: i % len(ids)])
        matchers.append(m)
    out = g.masks(256, [])
    batch = xgr.BatchGrammarMatcher(max_threads="auto")
    for _ in range(3):  # the last of three runs
        t = time.perf_counter()
        g.masks(256, [(i, m, []) for i, m in enumerate(matchers)])
        one_by_one = time.perf_counter() - t
        t = time.perf_counter()
        batch.batch_fill_next_token_bitmask([m._m for m in matchers], out)
        batched = time.perf_counter() - t
    print(f"mask fill, 256 rows: one at a time {1e3 * one_by_one:.2f} ms, batched {1e3 * batched:.2f} ms")


if __name__ == "__main__":
    main()
