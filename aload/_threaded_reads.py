"""A map-style dataset's blocking reads, awaited on aload's loop: each runs on a thread.

What lets a plan read a plain dataset on threads and map its samples on processes: seen as
an async dataset, its reads overlap on aload's loop (`threads` at once), and the batches'
samples go to the CPU workers as an async dataset's do.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread


class ThreadedReads:
    """`dataset`'s `__getitem__` as a coroutine that runs it on one of `threads` threads.

    Item by item, `threads` at once, whether or not the dataset has `__getitems__` (one call
    per batch would keep a thread per batch in flight, not per read).
    """

    def __init__(self, dataset: Any, threads: int) -> None:
        self.dataset = dataset
        self.threads = threads
        self._limiter: tuple[object, anyio.CapacityLimiter] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    async def __getitem__(self, index: Any) -> Any:
        return await anyio.to_thread.run_sync(
            self.dataset.__getitem__, index, limiter=self._threads()
        )

    def _threads(self) -> anyio.CapacityLimiter:
        """`threads` tokens, for the running loop (aload's loop is new each epoch)."""
        token = anyio.lowlevel.current_token()
        if self._limiter is None or self._limiter[0] is not token:
            self._limiter = (token, anyio.CapacityLimiter(self.threads))
        return self._limiter[1]

    def __repr__(self) -> str:
        return f"ThreadedReads({self.dataset!r}, threads={self.threads})"
