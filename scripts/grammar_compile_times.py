"""Grammar compile time for structured output: each of tests/test_structured.py's ten schemas (plus a regex and a
tool_choice="required" schema) compiled for the embedded model's tokenizer, fresh (a new compiler, no cache) and
again (the cache). Compilation runs on the host, off the engine's step loop.

usage: python3 scripts/grammar_compile_times.py [MODEL]
"""
from __future__ import annotations

import statistics
import sys
import time

sys.path.insert(0, "tests")

from test_structured import SCHEMAS  # noqa: E402
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


if __name__ == "__main__":
    main()
