"""A progress line for loading weights, on stderr, only where someone watches: an interactive terminal and the
slipstream logger at INFO (the CLI's default; `--quiet`, or library use without logging configured, show nothing)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int, what: str = "weights") -> Iterator[T]:
    if not (sys.stderr.isatty() and logging.getLogger("slipstream").isEnabledFor(logging.INFO)):
        yield from items
        return
    started = shown = time.monotonic()
    done = 0
    try:
        for item in items:
            yield item
            done += 1
            now = time.monotonic()
            if now - shown > 0.2 or done == total:  # a few redraws a second
                shown = now
                filled = 30 * done // max(total, 1)
                sys.stderr.write(f"\r[slipstream] {what} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} tensors, "
                                 f"{now - started:.1f} s")
                sys.stderr.flush()
    finally:
        sys.stderr.write("\r\033[K")  # the line goes; the log line that follows says how it ended
        sys.stderr.flush()
