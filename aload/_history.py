"""A log of a tuner's decisions that stays small over a long run.

A tuner keeps watching for as long as the loader runs, and re-probes now and then: a log of
every decision would grow without bound (and `loader.stats` copies it). `History` keeps the
first decisions, which say how the search went, and the latest, which say where it stands,
and counts those dropped between.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from itertools import chain
from typing import TypeVar, overload

T = TypeVar("T")

FIRST = 32  # decisions kept from the start: the search
LATEST = 224  # decisions kept from the end: where it stands


class History(Sequence[T]):
    """The first `first` entries and the latest `latest`, oldest first; `dropped` counts
    those left out between."""

    def __init__(self, first: int = FIRST, latest: int = LATEST) -> None:
        self._first: list[T] = []
        self._first_size = first
        self._latest: deque[T] = deque(maxlen=latest)
        self.dropped = 0

    def append(self, entry: T) -> None:
        if len(self._first) < self._first_size:
            self._first.append(entry)
            return
        if len(self._latest) == self._latest.maxlen:
            self.dropped += 1
        self._latest.append(entry)

    def __iter__(self) -> Iterator[T]:
        return chain(self._first, self._latest)

    def __reversed__(self) -> Iterator[T]:
        return chain(reversed(self._latest), reversed(self._first))

    def __len__(self) -> int:
        return len(self._first) + len(self._latest)

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[T]: ...
    def __getitem__(self, index: int | slice) -> T | Sequence[T]:
        if isinstance(index, slice):
            return tuple(self)[index]
        if index < 0:
            index += len(self)
        first = len(self._first)
        if not 0 <= index < len(self):
            raise IndexError("History index out of range")
        return self._first[index] if index < first else self._latest[index - first]
