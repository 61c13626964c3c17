"""A map-style dataset's blocking reads, awaited on aload's loop: a batch on a thread.

What lets a plan read a plain dataset on threads and map its samples on processes: seen as
an async dataset, its batches' reads overlap on aload's loop (`threads` batches at once),
and their samples go to the CPU workers as an async dataset's do.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread


class ThreadedReads:
    """`dataset` as an async dataset whose `__getitems__` reads a whole batch on one of
    `threads` threads, as torch's fetcher reads it: the dataset's `__getitems__` where it
    has one, else `__getitem__` per index. A thread hop costs ~30-60 us of CPU: one a batch,
    not one a sample."""

    def __init__(self, dataset: Any, threads: int) -> None:
        self.dataset = dataset
        self.threads = threads
        self._limiter: tuple[object, anyio.CapacityLimiter] | None = None
        getitems = getattr(dataset, "__getitems__", None)
        self._read_batch = getitems or self._each

    def __len__(self) -> int:
        return len(self.dataset)

    async def __getitem__(self, index: Any) -> Any:
        return await anyio.to_thread.run_sync(
            self.dataset.__getitem__, index, limiter=self._threads()
        )

    async def __getitems__(self, indices: list[Any]) -> list[Any]:
        return await anyio.to_thread.run_sync(self._read_batch, indices, limiter=self._threads())

    def _each(self, indices: list[Any]) -> list[Any]:
        return [self.dataset[index] for index in indices]

    def _threads(self) -> anyio.CapacityLimiter:
        """`threads` tokens, for the running loop (aload's loop is new each epoch)."""
        token = anyio.lowlevel.current_token()
        if self._limiter is None or self._limiter[0] is not token:
            self._limiter = (token, anyio.CapacityLimiter(self.threads))
        return self._limiter[1]

    def __repr__(self) -> str:
        return f"ThreadedReads({self.dataset!r}, threads={self.threads})"
