"""The seconds Python's garbage collector has stopped this process for, summed.

A full collection holds the GIL for as long as it walks the heap: 100 ms where torch is
imported, every second or so where an async dataset keeps hundreds of reads in flight
(their objects outlive two young collections and pile up in the old generation). The tuner
takes those pauses out of its windows: one in a tenth of a second halves what that window
reads, at any concurrency, and a step judged on it (or a shift of the data's cost seen in
it) is judged on the collector, not on the readers.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

_lock = threading.Lock()
_installed = False
_total = 0.0  # seconds of the collections that ended
_began: float | None = None  # when the collection under way began (one at a time: GIL)


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    global _total, _began
    if phase == "start":
        _began = time.perf_counter()
    elif _began is not None:
        _total += time.perf_counter() - _began
        _began = None


def paused_seconds() -> float:
    """The seconds collections have taken since the first call (which starts the count:
    a callback on `gc.callbacks`, two calls a collection, kept for the process's life)."""
    global _installed
    if not _installed:
        with _lock:
            if not _installed:
                gc.callbacks.append(_on_collection)
                _installed = True
    return _total
