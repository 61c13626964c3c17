"""Retrying a sample read that failed for a transient reason, and the budget for giving up."""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import anyio

T = TypeVar("T")
logger = logging.getLogger("aload")


@dataclass(frozen=True)
class Retry:
    """How to retry a sample read that raised a transient error.

    Args:
        attempts: reads in all, the first included (1 means no retry).
        backoff: seconds before the first retry; doubled for each later one, with jitter.
        on: the exception types that count as transient; others raise at once.
    """

    attempts: int = 3
    backoff: float = 0.05
    on: tuple[type[BaseException], ...] = (OSError, TimeoutError)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise TypeError(f"Retry attempts must be an int, got {self.attempts!r}")
        if self.attempts < 1:
            raise ValueError(f"Retry attempts must be at least 1, got {self.attempts}")
        if isinstance(self.backoff, bool) or not isinstance(self.backoff, int | float):
            raise TypeError(f"Retry backoff must be a number of seconds, got {self.backoff!r}")
        if not math.isfinite(self.backoff) or self.backoff < 0:
            raise ValueError(
                f"Retry backoff must be a finite number of seconds >= 0, got {self.backoff}"
            )
        if not isinstance(self.on, tuple) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in self.on
        ):
            raise TypeError(f"Retry on must be a tuple of exception types, got {self.on!r}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1 for the first)."""
        return self.backoff * 2 ** (retry - 1) * random.uniform(0.5, 1.5)


NO_RETRY = Retry(attempts=1)


class Reads:
    """Retry and skip accounting shared by every worker of one epoch (thread-safe)."""

    def __init__(self, retry: Retry, max_skipped: int, *, in_worker_process: bool = False) -> None:
        self.retry = retry
        self._max_skipped = max_skipped
        self._lock = threading.Lock()
        self.retries = 0
        self.skipped: list[Any] = []
        self.replaced = 0  # workers that died and were replaced (Ray actors)
        # In a worker process, skips are reported to the parent, which owns the epoch's
        # budget and logs them: the worker keeps each skip's error for its report.
        self._in_worker_process = in_worker_process
        self._unreported: list[tuple[Any, BaseException]] = []
        self._reported_retries = 0

    def retrying(self, fetch: Callable[[Any], T]) -> Callable[[Any], T]:
        """`fetch`, retried as the policy says; `fetch` itself when retries are off."""
        return fetch if self.retry.attempts == 1 else partial(self.read, fetch)

    def aretrying(self, fetch: Callable[[Any], Awaitable[T]]) -> Callable[[Any], Awaitable[T]]:
        """`retrying`, for a coroutine function."""
        return fetch if self.retry.attempts == 1 else partial(self.aread, fetch)

    def read(self, fetch: Callable[[Any], T], index: Any) -> T:
        """`fetch(index)`, retried on transient errors (blocks while backing off)."""
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fetch(index)
            except self.retry.on:
                if attempt == self.retry.attempts:
                    raise
                self._count_retry()
                time.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    async def aread(self, fetch: Callable[[Any], Awaitable[T]], index: Any) -> T:
        """`await fetch(index)`, retried on transient errors (backs off without blocking)."""
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return await fetch(index)
            except self.retry.on:
                if attempt == self.retry.attempts:
                    raise
                self._count_retry()
                await anyio.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    @property
    def skips(self) -> bool:
        """Whether a failed read may be dropped at all (a failure budget is set)."""
        return self._max_skipped > 0

    def may_skip(self, index: Any, error: BaseException) -> bool:
        """Whether the budget allows dropping sample `index` after `error`; counts it if so."""
        with self._lock:
            if len(self.skipped) >= self._max_skipped:
                return False
            self.skipped.append(index)
        if self._in_worker_process:
            self._unreported.append((index, error))
        else:
            logger.warning("aload: skipped sample %r after %r", index, error)
        return True

    def report(self) -> tuple[int, list[tuple[Any, BaseException]]] | None:
        """In a worker process: the retries and skips since the last report, for the parent's
        `absorb`; None when there were none (the common case costs nothing on the wire)."""
        retries = self.retries - self._reported_retries
        if not retries and not self._unreported:
            return None
        skipped, self._unreported = self._unreported, []
        self._reported_retries = self.retries
        return retries, skipped

    def absorb(self, report: tuple[int, list[tuple[Any, BaseException]]]) -> None:
        """In the parent: count a worker process's report against this epoch's one budget.

        Raises:
            the error of the first skip that the budget no longer allows.
        """
        retries, skipped = report
        with self._lock:
            self.retries += retries
        for index, error in skipped:
            if not self.may_skip(index, error):
                raise error

    def count_replaced(self) -> None:
        """A worker died and another took its place; its batches ran again."""
        with self._lock:
            self.replaced += 1

    def _count_retry(self) -> None:
        with self._lock:
            self.retries += 1
