"""The datasets the benchmark suite reads: stand-ins for I/O, numeric work, Python work, images."""

from __future__ import annotations

import multiprocessing
import threading
import time

import anyio
import numpy as np
import torch
import torch.utils.data as tud


class SleepDataset(tud.Dataset):
    """An I/O stand-in: each item blocks for `seconds` (a file read, a network fetch)."""

    def __init__(self, n: int, seconds: float) -> None:
        self.n, self.seconds = n, seconds

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(self.seconds)
        return torch.full((16,), index, dtype=torch.float32)


class JitteryDataset(tud.Dataset):
    """Reads that wait `seconds`, and `slow_seconds` for one item in `one_in` (a cache miss,
    a slow replica): the same items each epoch, spread over the index range."""

    def __init__(self, n: int, seconds: float, slow_seconds: float, one_in: int) -> None:
        self.n, self.seconds, self.slow_seconds, self.one_in = n, seconds, slow_seconds, one_in

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        slow = (index * 2654435761) % self.one_in == 0  # a fixed, scattered choice
        time.sleep(self.slow_seconds if slow else self.seconds)
        return torch.full((16,), index, dtype=torch.float32)


class StoreDataset(tud.Dataset):
    """Reads from a store that serves `slots` requests at once, each taking `seconds`: more
    reads in flight help up to `slots`, then only queue (an object store's connection limit,
    a disk's queue depth)."""

    def __init__(self, n: int, seconds: float, slots: int) -> None:
        self.n, self.seconds = n, seconds
        self.slots = threading.BoundedSemaphore(slots)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        with self.slots:
            time.sleep(self.seconds)
        return torch.full((16,), index, dtype=torch.float32)


class AsyncStoreDataset:
    """The async form of StoreDataset: each read awaits one of `slots` (made on the loop that
    reads) for `seconds`."""

    def __init__(self, n: int, seconds: float, slots: int) -> None:
        self.n, self.seconds, self.slots = n, seconds, slots
        self._slots: anyio.Semaphore | None = None

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> torch.Tensor:
        if self._slots is None:
            self._slots = anyio.Semaphore(self.slots)
        async with self._slots:
            await anyio.sleep(self.seconds)
        return torch.full((16,), index, dtype=torch.float32)


class RateLimit:
    """A store's limit on requests a second (S3's SlowDown): bursts of `burst` seconds' worth,
    and every request counts, refused ones too (the store answers them all), so clients that
    retry too often keep it refusing. Its state is in shared memory: worker processes forked
    from the maker share one limit."""

    def __init__(self, rate: float, burst: float = 0.01) -> None:
        self.rate, self.capacity = rate, max(1.0, rate * burst)
        self._state = multiprocessing.Array("d", [self.capacity, 0.0])  # tokens, last request

    def admit(self) -> bool:
        """A request: whether the store serves it (else it is refused, and still counted)."""
        with self._state.get_lock():
            tokens, last = self._state[0], self._state[1]
            now = time.monotonic()
            if last:
                tokens = min(self.capacity, tokens + (now - last) * self.rate)
            self._state[0], self._state[1] = max(-self.capacity, tokens - 1), now
            return tokens >= 1


class ShiftingStore(tud.Dataset):
    """Reads from a rate-limited store whose latency shifts: items before `switch` take
    `fast`, the rest `slow` (a cache gone cold, a far replica). A refused read waits `backoff`
    and tries again. The best concurrency is the rate times the latency, so it moves."""

    def __init__(
        self, n: int, switch: int, fast: float, slow: float, limit: RateLimit, backoff: float
    ) -> None:
        self.n, self.switch, self.fast, self.slow = n, switch, fast, slow
        self.limit, self.backoff = limit, backoff

    def __len__(self) -> int:
        return self.n

    def latency(self, index: int) -> float:
        return self.fast if index < self.switch else self.slow

    def __getitem__(self, index: int) -> torch.Tensor:
        while not self.limit.admit():
            time.sleep(self.backoff)
        time.sleep(self.latency(index))
        return torch.full((16,), index, dtype=torch.float32)


class AsyncShiftingStore(ShiftingStore):
    """The awaited form of ShiftingStore, for aload's loop."""

    async def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        while True:  # a retry after a refusal waits `backoff`, as a client backs off
            if self.limit.admit():
                break
            await anyio.sleep(self.backoff)
        await anyio.sleep(self.latency(index))
        return torch.full((16,), index, dtype=torch.float32)


def shifting_stores(n: int) -> tuple[AsyncShiftingStore, ShiftingStore]:
    """The `auto-shift` workload's store, awaited and blocking, sharing one limit of 8,000
    requests a second: 1 ms reads for the first half of `n` items, 10 ms for the rest, 20 ms
    before a retry."""
    args = (n, n // 2, 0.001, 0.010, RateLimit(8000), 0.02)
    return AsyncShiftingStore(*args), ShiftingStore(*args)


class AwaitingDataset:
    """The async form of SleepDataset: each item awaits `seconds` (a remote read)."""

    def __init__(self, n: int, seconds: float) -> None:
        self.n, self.seconds = n, seconds

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> torch.Tensor:
        await anyio.sleep(self.seconds)
        return torch.full((16,), index, dtype=torch.float32)


class NumpyDataset(tud.Dataset):
    """CPU work that releases the GIL: a sort and two ufuncs over a float32 array per item."""

    def __init__(self, n: int, size: int) -> None:
        self.n = n
        self.base = np.random.default_rng(0).random(size).astype(np.float32)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> np.ndarray:
        return np.sort(self.base * 1.5 + float(index))[:64]


class MatmulDataset(tud.Dataset):
    """Numeric work on the BLAS (numpy's matrix product of a `size` x `size` matrix), which
    runs a team of threads on every core unless told otherwise."""

    def __init__(self, n: int, size: int) -> None:
        self.n = n
        self.matrix = np.random.default_rng(0).random((size, size))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy((self.matrix @ (self.matrix + index))[0, :16].copy())


class PythonDataset(tud.Dataset):
    """Pure-Python work that holds the GIL (a tokenizer, a parser): `rounds` of arithmetic."""

    def __init__(self, n: int, rounds: int) -> None:
        self.n, self.rounds = n, rounds

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        total = index
        for i in range(self.rounds):
            total = (total * 31 + i) % 1_000_003
        return torch.tensor([total, index])


class IndexDataset(tud.Dataset):
    """No work at all: each item is its index, so a batch's cost is the loader's own."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def python_decode(sample: torch.Tensor, rounds: int) -> torch.Tensor:
    """Pure-Python work on a sample that holds the GIL (a parser, a tokenizer): `rounds`."""
    total = int(sample[0])
    for i in range(rounds):
        total = (total * 31 + i) % 1_000_003
    return torch.tensor([total, int(sample[0])])


class Decode:
    """`python_decode` as a picklable transform, for worker processes."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    def __call__(self, sample: torch.Tensor) -> torch.Tensor:
        return python_decode(sample, self.rounds)

    def index(self, index: int) -> int:
        """The decode of the sample an awaited read of `index` gives (for the limit: ints
        in and out, so that its pool moves no tensors)."""
        sample = torch.full((16,), index, dtype=torch.float32)
        return int(self(sample)[0])


class ServiceCall:
    """A per-sample transform that waits `seconds` on another service (a feature store, a
    tokenizer server), releasing the GIL: threads overlap it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, sample: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return sample


class ReadThenCall(tud.Dataset):
    """The blocking form of a read from `store` then a `call` per sample."""

    def __init__(self, store: tud.Dataset, call: ServiceCall) -> None:
        self.store, self.call = store, call

    def __len__(self) -> int:
        return len(self.store)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.call(self.store[index])


class ReadThenDecode(tud.Dataset):
    """The blocking form of a remote read then a decode: sleep `seconds`, then `decode`."""

    def __init__(self, n: int, seconds: float, decode: Decode) -> None:
        self.n, self.seconds, self.decode = n, seconds, decode

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.decode(torch.full((16,), index, dtype=torch.float32))


class ImageDataset(tud.Dataset):
    """Image-sized samples, 3 x 224 x 224 float32, copied out of a small in-memory pool."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pool = torch.randn(8, 3, 224, 224)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.pool[index % 8].clone()


class RecordsDataset(tud.Dataset):
    """Metadata held as Python objects: one `(id, score, label)` tuple per item, 4 objects.

    The classic copy-on-read case: a forked worker that reads an object writes its reference
    count, so the page holding it is copied, and each worker ends up with its own copy.
    """

    def __init__(self, n: int) -> None:
        self.records = [(i, i * 0.5, f"item-{i}") for i in range(n)]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[int, float]:
        record_id, score, _label = self.records[index]
        return record_id, score


def _calibrate(make_item_reader: type, start: int, seconds: float) -> int:
    """The size parameter at which one item of `make_item_reader(1, size)` takes `seconds`."""
    size = start
    for _ in range(3):
        dataset = make_item_reader(1, size)
        started = time.perf_counter()
        for _ in range(50):
            dataset[0]
        per_item = (time.perf_counter() - started) / 50
        size = max(1, int(size * seconds / per_item))
    return size


def python_rounds_for(seconds: float) -> int:
    """The loop length whose pure-Python work takes about `seconds` per item here."""
    return _calibrate(PythonDataset, 10_000, seconds)


def numpy_size_for(seconds: float) -> int:
    """The array size whose per-item numpy work takes about `seconds` here."""
    return _calibrate(NumpyDataset, 100_000, seconds)
