"""The draft policy (engine/speculation.py) against cost models of its steps, on the CPU: for each model, the policy's
tokens/s over a run as a share of the best fixed k's under the same pauses and noise (the worst of six seeds); then
batch 1 on text where drafts pay in phases.
An argument of 0 turns the clamp off (every step's seconds counted whole), for the comparison.

usage: PYTHONPATH=. python3 scripts/draft_policy_sim.py [PAUSE_RATIO]
"""
from __future__ import annotations

import random
import sys

from slipstream.engine import speculation

# name: (batch, seconds of a step by k, tokens a sequence by k, a 100 ms pause every N steps, timing noise +-[, what
# the first plain step after a verifying one costs more: with overlap it starts with nothing in flight])
MODELS = {
    "lease AZ, batch 256: a plain step 2.5 ms behind another, 5 ms after a verifying one": (
        256, {0: 2.5e-3, 1: 7e-3, 2: 9e-3, 4: 12e-3}, {0: 1, 1: 1.7, 2: 2.0, 4: 2.2}, 300, 0.1, 2.5e-3),
    "lease AY, batch 256 (plain best), pause / 150": (200, {0: 3.6e-3, 1: 15e-3, 2: 17e-3, 4: 20e-3},
                                                     {0: 1, 1: 1.7, 2: 2.0, 4: 2.3}, 150, 0.1),
    "lease AY, batch 256, pause / 300": (200, {0: 3.6e-3, 1: 15e-3, 2: 17e-3, 4: 20e-3},
                                         {0: 1, 1: 1.7, 2: 2.0, 4: 2.3}, 300, 0.1),
    "verifying dearer, pause / 30": (200, {0: 3.6e-3, 1: 9e-3, 2: 10e-3, 4: 12e-3}, {0: 1, 1: 1.7, 2: 2.1, 4: 2.3}, 30, 0.1),
    "verifying dearer, noisy (+-70%)": (200, {0: 3.6e-3, 1: 9e-3, 2: 10e-3, 4: 12e-3}, {0: 1, 1: 1.7, 2: 2.1, 4: 2.3},
                                        0, 0.7),
    "drafts pay, batch 14, pause / 150": (14, {0: 2e-3, 1: 2.5e-3, 2: 2.6e-3, 4: 2.8e-3}, {0: 1, 1: 1.9, 2: 2.7, 4: 3.4},
                                          150, 0.1),
    "drafts pay, batch 14, noisy, pause / 150": (14, {0: 2e-3, 1: 2.5e-3, 2: 2.6e-3, 4: 2.8e-3},
                                                 {0: 1, 1: 1.9, 2: 2.7, 4: 3.4}, 150, 0.7),
    "lease AK, batch 14 (plain best)": (14, {0: 2e-3, 1: 10e-3, 2: 10e-3, 4: 10e-3}, {0: 1, 1: 2, 2: 3, 4: 3.34}, 0, 0.1),
}


def run(model: tuple, seed: int, fixed: int | None = None, steps: int = 4000) -> float:
    """Tokens/s of a run: the policy's choices, or always `fixed` drafts."""
    batch, cost, gain, every, noise, restart = model if len(model) == 6 else (*model, 0.0)
    rng, p, tokens, seconds, after = random.Random(seed), speculation.DraftPolicy(4), 0, 0.0, None
    for _ in range(steps):
        k = p.choose(batch) if fixed is None else fixed
        s = cost[k] * rng.uniform(1 - noise, 1 + noise) + (0.1 if every and rng.random() < 1 / every else 0.0)
        s += restart if k == 0 and after != 0 else 0.0
        t = round(batch * gain[k])
        p.record(batch, k, t, s, steady=after == 0 or not restart)
        tokens, seconds, after = tokens + t, seconds + s, k
    return tokens / seconds


# Batch 1 on text whose drafts pay in phases (quoting the prompt, or not), lease BA's costs: a plain step 0.6 ms behind
# another, 1.1 ms after a verifying one; a verifying step 1.1 ms + 0.01 ms a draft. name: (per-draft acceptance while
# quoting, while not, the chance a step switches phase)
TEXTS = {
    "batch 1, quoting and not, a switch every 100 steps": (0.9, 0.05, 0.01),
    "batch 1, never quoting": (0.05, 0.05, 0.0),
    "batch 1, always quoting": (0.9, 0.9, 0.0),
}


def run_text(text: tuple, seed: int, fixed: int | None = None, steps: int = 6000, max_k: int = 8,
             slow_start: int = 0) -> float:
    """Tokens/s of a run at batch 1 on `text` (a TEXTS entry): the policy's choices (up to `max_k` drafts), or always
    `fixed` drafts; the run's first `slow_start` steps cost 25 ms more each (one-off costs of a run's first steps)."""
    quote, other, switch = text
    rng, p, tokens, seconds, after, quoting = random.Random(seed), speculation.DraftPolicy(max_k), 0, 0.0, None, True
    for step in range(steps):
        quoting ^= rng.random() < switch
        k = p.choose(1) if fixed is None else fixed
        t = 1
        while t <= k and rng.random() < (quote if quoting else other):  # drafts accepted while each is right
            t += 1
        s = ((0.6e-3 if after == 0 else 1.1e-3) if k == 0 else 1.1e-3 + 0.01e-3 * k) * rng.uniform(0.9, 1.1)
        s += 0.025 if step < slow_start else 0.0
        p.record(1, k, t, s, steady=after == 0)
        # the proposer's first guess for each token that arrived (drafted or not): right as often as a draft is
        p.record_guesses(1, sum(rng.random() < (quote if quoting else other) for _ in range(t)), t)
        tokens, seconds, after = tokens + t, seconds + s, k
    return tokens / seconds


def main() -> None:
    if len(sys.argv) > 1:
        speculation.PAUSE_RATIO = float(sys.argv[1]) or float("inf")
    print(f"PAUSE_RATIO {speculation.PAUSE_RATIO}: the policy's tokens/s / the best fixed k's, worst of six seeds "
          "(and each fixed k's tokens/s, lowest-highest over the seeds)")
    for name, model in MODELS.items():
        fixed = {k: [run(model, s, k) for s in range(6)] for k in (0, 1, 2, 4)}
        share = min(run(model, s) / max(fixed[k][s] for k in fixed) for s in range(6))
        print(f"  {name}: {share:.3f} ({', '.join(f'k={k} {min(v):,.0f}-{max(v):,.0f}' for k, v in fixed.items())})")
    for name, text in TEXTS.items():
        fixed = {k: [run_text(text, s, k) for s in range(6)] for k in (0, 1, 2, 4, 8)}
        share = min(run_text(text, s) / max(fixed[k][s] for k in fixed) for s in range(6))
        print(f"  {name}: {share:.3f} ({', '.join(f'k={k} {min(v):,.0f}-{max(v):,.0f}' for k, v in fixed.items())})")
    # (an H100 run of the quote workload at k <= 16 timed its first two steps, both k = 16, at 25 ms each)
    text, run16 = TEXTS["batch 1, quoting and not, a switch every 100 steps"], dict(max_k=16, slow_start=2)
    fixed = {k: [run_text(text, s, k, **run16) for s in range(6)] for k in (0, 4, 8, 16)}
    share = min(run_text(text, s, **run16) / max(fixed[k][s] for k in fixed) for s in range(6))
    print(f"  batch 1, quoting and not, k <= 16, the run's first two steps 25 ms longer: {share:.3f} "
          f"({', '.join(f'k={k} {min(v):,.0f}-{max(v):,.0f}' for k, v in fixed.items())})")


if __name__ == "__main__":
    main()
