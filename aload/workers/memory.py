"""The memory a worker process holds of its own, for `memory_budget`.

A forked worker shares its parent's pages until it writes to them. What it holds of its own
(pages its writes copied, such as objects whose reference counts it touched; caches it
filled; buffers it allocated) is memory the loader adds to the machine. Linux says it in
`/proc/<pid>/smaps_rollup`, whose reading walks the process's page tables (a millisecond or
more for a large one), so the pool reads it every `WATCH_SECONDS`, off the consumer's thread.
Elsewhere it is not known, and counts as 0. (`aload.bench.memory` reads the same file in a
helper that runs as a standard-library script, so it keeps a copy of its own.)
"""

from __future__ import annotations

WATCH_SECONDS = 0.5  # how often a watched pool reads its workers' memory


def private_bytes(pid: int) -> int:
    """The bytes process `pid` holds of its own (its private pages); 0 where that cannot be
    read (not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            lines = rollup.read().splitlines()
    except OSError:
        return 0
    kib = sum(int(line.split()[1]) for line in lines if line.startswith("Private_"))
    return kib * 1024
