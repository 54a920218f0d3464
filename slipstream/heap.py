"""The garbage collector in the processes slipstream owns: the server's API front end and its engine core."""
from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Take everything alive now (modules, tokenizer, model, grammar engine: 250K objects in the front end) out of
    the collector's scans; returns how many. Python's full collections walk every tracked object: in the front end
    each one paused all streams for 140-170 ms on the 2-core CPU machine, and frozen the output path costs 6 us a
    token instead of 10-11 (scripts/frontend_costs.py). Only where slipstream owns the process: frozen cyclic garbage
    is never freed, so a library call inside a user's program (`LLM`) must not do this."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw_startup_heap() -> None:
    """Give the frozen objects back to the collector as the process ends: frozen ones are never freed, and extensions
    that check for leaks at exit (Triton's nanobind bindings) printed dozens of lines about them at every shutdown."""
    gc.unfreeze()
