"""Workers are stopped and joined before the interpreter finalizes.

A loop left with `return` (or an epoch dropped just before the program ends) asks its workers
to stop but does not wait for them. Worker threads are daemons, so without this hook the
interpreter would tear down torch while one of them is still inside it, and the process can
abort ("terminate called without an active exception"). At exit every pool still referenced
is shut down, and every worker thread is given `EXIT_GRACE` seconds to finish its current job.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import Any

EXIT_GRACE = 5.0

_pools: weakref.WeakSet[Any] = weakref.WeakSet()
_threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def stop_at_exit(pool: Any = None, thread: threading.Thread | None = None) -> None:
    """Have `pool` shut down, and `thread` joined, when the interpreter exits (held weakly:
    a pool that is collected before then has stopped itself)."""
    if pool is not None:
        _pools.add(pool)
    if thread is not None:
        _threads.add(thread)


@atexit.register
def _stop_all() -> None:
    for pool in list(_pools):
        pool.shutdown()
    deadline = time.monotonic() + EXIT_GRACE
    for thread in list(_threads):
        if thread.is_alive():
            thread.join(max(0.0, deadline - time.monotonic()))
