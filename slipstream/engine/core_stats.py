"""The engine core's counters and gauges (torch-free, so the API front end can read them)."""
from __future__ import annotations

import msgspec


class CoreStats(msgspec.Struct, array_like=True):
    """Counters and gauges for /metrics, sent with every step (a few integers)."""

    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    cache_query_tokens: int = 0
    cache_hit_tokens: int = 0
    cache_evicted_blocks: int = 0
    cache_blocks: int = -1  # -1: no prefix cache
    draft_tokens: int = 0  # speculative decoding: drafts verified, and of those accepted
    accepted_draft_tokens: int = 0
    drafts: int = 0  # a sequence's verifying steps (each yields 1 + its accepted drafts)
    # Steps read, by kind (a decode step: one token per sequence, plus drafts; a mixed step carries prompt tokens), and
    # their time on the device (runner.Launched.device_seconds; 0 on a CPU)
    decode_steps: int = 0
    decode_device_seconds: float = 0.0
    mixed_steps: int = 0
    mixed_device_seconds: float = 0.0
    # host time in the proposer (a head's or draft model's forwards, launched and read back, included)
    draft_seconds: float = 0.0
