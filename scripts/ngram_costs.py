"""Host cost of the n-gram proposer per decode step, on this machine's CPU: 256 sequences of 300 tokens, each
growing a token a step, indexed (what every step costs, drafting or not) and indexed then looked up (a step that
drafts), on random text over a large vocabulary (few matches) and a small one (many). Older proposer.py files given
as arguments run the same steps in the same process, and must propose the same drafts. Each figure is the fastest
of three runs (this is a shared 2-core machine's kind of measurement: the spread between runs is wide).

usage: python3 scripts/ngram_costs.py [OLD_proposer.py ...]
"""
from __future__ import annotations

import random
import sys
import time

from slipstream.bench.common import module_from_file
from slipstream.engine import proposer


def main() -> None:
    drafts: dict[int, str] = {}
    for path in [*sys.argv[1:], proposer.__file__]:
        ngram = (proposer if path == proposer.__file__ else module_from_file(path)).NgramProposer
        # (before 22cc7af the proposer took its k, 4 here; now the limit alone caps what it proposes)
        make = ngram if path == proposer.__file__ else lambda ngram=ngram: ngram(4)
        for vocab in (49152, 64):
            best: dict[str, float] = {}
            for _ in range(3):
                out = _steps(make(), vocab, best)
                if drafts.setdefault(vocab, out) != out:
                    raise SystemExit(f"{path} proposes other drafts than {sys.argv[1]} (vocabulary {vocab})")
            print(f"{path}, vocabulary {vocab}: a step of 256 sequences",
                  ", ".join(f"{label} {1e3 * s:.2f} ms" for label, s in best.items()))


def _steps(p, vocab: int, best: dict[str, float]) -> str:  # noqa: ANN001
    """100 steps indexed, then 100 indexed and looked up; the fastest step times so far in `best`; the drafts."""
    rng = random.Random(0)
    seqs = {i: [rng.randrange(vocab) for _ in range(300)] for i in range(256)}
    arriving = [[rng.randrange(vocab) for _ in range(256)] for _ in range(200)]
    for i, ids in seqs.items():
        p.propose(i, ids, 0)
    out = []
    for limit, label in ((0, "indexed"), (4, "indexed + looked up")):
        t = time.perf_counter()
        for step in range(100):
            new = arriving[step + (100 if limit else 0)]
            for i, ids in seqs.items():
                ids.append(new[i])
                out.append(p.propose(i, ids, limit))
        best[label] = min(best.get(label, float("inf")), (time.perf_counter() - t) / 100)
    return str(out)


if __name__ == "__main__":
    main()
