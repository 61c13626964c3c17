"""Drop-in fidelity: code written for torch's DataLoader sees the same samples, the same
randomness and the same per-worker state with aload, in every worker mode. Each test runs
torch's loader on the same input and compares."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.utils.data as tud
from conftest import flatten
from loop_pauses import best_pause
from torch.utils.data import Dataset, IterableDataset, TensorDataset

# Bound at import time, as user code often does: it must still answer per thread worker.
from torch.utils.data import get_worker_info as torch_get_worker_info

import aload

MODES = ["thread", "process"]


def samples(loader):
    """Every sample of an epoch, batched or not, as ints."""
    return [int(x) for b in loader for x in torch.as_tensor(b).reshape(-1)]


def aload_loader(dataset, mode, **kwargs):
    return aload.DataLoader(dataset, worker_mode=mode, **kwargs)


class TorchShardedRange(IterableDataset):
    """torch's documented recipe: shard in `__iter__` by torch's `get_worker_info()`."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        info = torch_get_worker_info()
        if info is None:
            return iter(range(self.n))
        return iter(range(info.id, self.n, info.num_workers))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("batch_size", [None, 3])
def test_sharded_iterable_dataset_gives_torchs_samples_once_each(mode, num_workers, batch_size):
    ds = TorchShardedRange(23)
    theirs = samples(tud.DataLoader(ds, batch_size=batch_size, num_workers=num_workers))
    ours = samples(aload_loader(ds, mode, batch_size=batch_size, num_workers=num_workers))
    assert sorted(ours) == sorted(theirs) == list(range(23))
    if num_workers <= 1:
        assert ours == theirs  # one stream: torch's order too


class OwnIterator(IterableDataset):
    """A dataset that is its own iterator, and starts over in `__iter__` (a common recipe):
    a loader must call iter() once per stream and next() after, as torch's fetcher does."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        info = torch_get_worker_info()
        self.position, self.step = (0, 1) if info is None else (info.id, info.num_workers)
        return self

    def __next__(self):
        if self.position >= self.n:
            raise StopIteration
        self.position += self.step
        return self.position - self.step


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_dataset_that_is_its_own_iterator_is_read_as_torch_reads_it(mode, num_workers):
    ds = OwnIterator(23)
    theirs = samples(tud.DataLoader(ds, batch_size=4, num_workers=num_workers))
    ours = samples(aload_loader(ds, mode, batch_size=4, num_workers=num_workers))
    assert ours == theirs
    assert sorted(ours) == list(range(23))


class RefusesToStart(IterableDataset):
    def __iter__(self):
        raise FileNotFoundError("shard-00.tar")


def test_a_single_process_epoch_calls_iter_on_the_dataset_when_it_starts_as_torch_does():
    with pytest.raises(FileNotFoundError, match="shard-00"):
        iter(tud.DataLoader(RefusesToStart(), batch_size=2))
    with pytest.raises(FileNotFoundError, match="shard-00"):
        iter(aload.DataLoader(RefusesToStart(), batch_size=2))


class AugmentsFromTheGlobalRng(Dataset):
    """Draws from torch's global RNG, as torchvision's random transforms do; the first batch
    is slow, so a worker that is free first would take batches out of turn."""

    def __len__(self):
        return 48

    def __getitem__(self, index):
        if index < 4:
            time.sleep(0.02)
        return index * 1000 + int(torch.randint(1000, ()))


@pytest.mark.parametrize("persistent", [False, True])
def test_worker_processes_read_torchs_batches_so_they_draw_what_torchs_draw(persistent):
    """torch deals batch k to worker k % num_workers; each process's RNG is its own, so which
    batches a worker reads decides what its augmentations draw. Persistent workers draw the
    second epoch on from the first (aload's end-of-epoch RNG reports draw nothing)."""

    def two_epochs(loader_class, **extra):
        torch.manual_seed(5)
        loader = loader_class(
            AugmentsFromTheGlobalRng(),
            batch_size=4,
            num_workers=2,
            persistent_workers=persistent,
            **extra,
        )
        epochs = [samples(loader), samples(loader)]
        if isinstance(loader, aload.DataLoader):
            loader.close()
        return epochs

    assert two_epochs(aload.DataLoader, worker_mode="process") == two_epochs(tud.DataLoader)


@pytest.mark.anyio
async def test_async_for_gives_torchs_shards_and_random_stream(anyio_backend):
    """The same samples and the same draws as torch's `for`, while the loop keeps beating."""
    torch.manual_seed(4)
    theirs_shards = samples(tud.DataLoader(TorchShardedRange(30), batch_size=4, num_workers=2))
    numbers = TensorDataset(torch.arange(40.0))
    theirs_shuffle = [b[0].tolist() for b in tud.DataLoader(numbers, batch_size=8, shuffle=True)]
    theirs_after = torch.rand(1).item()

    async def ours() -> None:
        torch.manual_seed(4)
        shards = aload.DataLoader(TorchShardedRange(30), batch_size=4, num_workers=2)
        ours_shards = [int(x) async for b in shards for x in b]
        shuffled = aload.DataLoader(numbers, batch_size=8, shuffle=True)
        ours_shuffle = [b[0].tolist() async for b in shuffled]
        assert sorted(ours_shards) == sorted(theirs_shards) == list(range(30))
        assert ours_shuffle == theirs_shuffle
        assert torch.rand(1).item() == theirs_after

    assert await best_pause(ours, 0.05, tries=2) < 0.05


def test_torchs_get_worker_info_is_none_outside_the_workers_while_they_run():
    seen_by_workers, seen_by_consumer = [], []

    class Recording(TorchShardedRange):
        def __iter__(self):
            seen_by_workers.append(torch_get_worker_info().id)
            return super().__iter__()

    for _ in aload.DataLoader(Recording(8), batch_size=2, num_workers=2):
        seen_by_consumer.append(torch_get_worker_info())
        seen_by_consumer.append(tud.get_worker_info())
    assert sorted(seen_by_workers) == [0, 1]
    assert seen_by_consumer == [None] * len(seen_by_consumer)


@pytest.mark.parametrize("mode", MODES)
def test_batches_are_in_shared_memory_only_when_they_cross_a_process(mode):
    """torch's collate writes into shared memory when it sees worker info: right for a
    process, a file descriptor per batch for nothing in a thread. (A batch of a few KiB
    comes back from a process by value: `test_batches_come_back_by_value_when_small...`.)"""
    loader = aload_loader([torch.ones(128 * 1024)] * 8, mode, batch_size=4, num_workers=2)
    batch = next(iter(loader))
    assert batch.is_shared() == (mode == "process")


class RangeDataset(IterableDataset):
    """torch's documented `worker_init_fn` example: each worker narrows start/end."""

    def __init__(self, start, end):
        self.start, self.end = start, end

    def __iter__(self):
        return iter(range(self.start, self.end))


def split_range(worker_id):
    info = tud.get_worker_info()
    dataset = info.dataset
    overall_start, overall_end = dataset.start, dataset.end
    per_worker = -(-(overall_end - overall_start) // info.num_workers)
    dataset.start = overall_start + worker_id * per_worker
    dataset.end = min(dataset.start + per_worker, overall_end)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_workers", [1, 2])
def test_worker_init_fn_narrows_its_own_dataset_and_leaves_the_callers_alone(mode, num_workers):
    theirs_ds, ours_ds = RangeDataset(3, 17), RangeDataset(3, 17)
    theirs = tud.DataLoader(theirs_ds, num_workers=num_workers, worker_init_fn=split_range)
    ours = aload_loader(ours_ds, mode, num_workers=num_workers, worker_init_fn=split_range)
    for _epoch in range(2):
        assert sorted(flatten(ours)) == sorted(flatten(theirs)) == list(range(3, 17))
    assert (ours_ds.start, ours_ds.end) == (theirs_ds.start, theirs_ds.end) == (3, 17)


class LazyHandle(Dataset):
    """Opens its 'file' on first read, in whichever worker reads it (the h5py pattern)."""

    def __init__(self, n):
        self.n = n
        self.handle = None
        self.opened = []  # shared: one entry per handle opened

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if self.handle is None:
            self.handle = object()
            self.opened.append((threading.get_ident(), id(self.handle)))
        return index


def test_each_thread_worker_opens_its_own_lazy_handle():
    ds = LazyHandle(40)
    loader = aload.DataLoader(ds, batch_size=2, num_workers=3)
    assert sorted(flatten(loader)) == list(range(40))
    threads = [thread for thread, _ in ds.opened]
    assert len(threads) == len(set(threads))  # never two handles in one worker, nor one shared
    assert ds.handle is None  # the caller's dataset was not written to


class Draws(Dataset):
    """Reports, per sample, what the worker's process-wide generators give."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        info = tud.get_worker_info()
        return {
            "index": index,
            "worker": info.id,
            "seed": info.seed,
            "torch": torch.rand(()).item(),
            "numpy": float(np.random.rand()),
        }


def by_worker(batches):
    return {
        int(w): (int(s), float(t), float(n))
        for b in batches
        for w, s, t, n in zip(b["worker"], b["seed"], b["torch"], b["numpy"], strict=True)
    }


def test_process_workers_are_seeded_as_torchs_for_the_same_global_seed():
    torch.manual_seed(11)
    theirs = list(tud.DataLoader(Draws(), batch_size=4, num_workers=2))
    torch.manual_seed(11)
    ours = list(aload.DataLoader(Draws(), batch_size=4, num_workers=2, worker_mode="process"))
    assert by_worker(ours) == by_worker(theirs)


def test_thread_workers_get_torchs_worker_seeds_for_the_same_global_seed():
    torch.manual_seed(11)
    theirs = {w: s for w, (s, _, _) in by_worker(tud.DataLoader(Draws(), 4, num_workers=2)).items()}
    torch.manual_seed(11)
    ours = {w: s for w, (s, _, _) in by_worker(aload.DataLoader(Draws(), 4, num_workers=2)).items()}
    # Threads take batches as they are free: a worker may get none, but each has torch's seed.
    assert ours
    assert ours.items() <= theirs.items()


SHUFFLED = [
    {"num_workers": 0},
    {"num_workers": 2},
    {"num_workers": 2, "persistent_workers": True},
    {"num_workers": 2, "worker_mode": "process"},
    {"num_workers": 2, "worker_mode": "process", "persistent_workers": True},
]


@pytest.mark.parametrize("kwargs", SHUFFLED)
def test_same_seed_same_batches_and_same_global_rng_every_epoch(kwargs):
    """Drawn where torch draws: nothing when built, the workers' base seed and the sampler's
    seed when an epoch starts (the base seed only once for persistent workers)."""
    torch_kwargs = {k: v for k, v in kwargs.items() if k != "worker_mode"}

    def run(make):
        torch.manual_seed(0)
        loader = make(TensorDataset(torch.arange(60.0)), batch_size=8, shuffle=True)
        trace = [torch.rand(1).item()]
        for _epoch in range(3):
            trace.append([b[0].tolist() for b in loader])
            trace.append(torch.rand(1).item())
        if isinstance(loader, aload.DataLoader):
            loader.close()  # a dropped persistent process loader leaks its pool (issue 12)
        return trace

    theirs = run(lambda *a, **k: tud.DataLoader(*a, **k, **torch_kwargs))
    ours = run(lambda *a, **k: aload.DataLoader(*a, **k, **kwargs))
    assert ours == theirs


@pytest.mark.parametrize("num_workers", [0, 2])
def test_draws_happen_when_torchs_do_between_iter_and_next(num_workers):
    def run(cls):
        torch.manual_seed(5)
        loader = cls(TensorDataset(torch.arange(20.0)), batch_size=4, shuffle=True,
                     num_workers=num_workers)  # fmt: skip
        it = iter(loader)
        between = torch.rand(1).item()
        first = next(it)[0].tolist()
        return between, first, torch.rand(1).item()

    assert run(aload.DataLoader) == run(tud.DataLoader)


def reseeding_init(worker_id):
    np.random.seed(worker_id)


def test_worker_init_fn_that_reseeds_the_process_in_a_thread_is_warned_about():
    loader = aload.DataLoader(list(range(4)), num_workers=1, worker_init_fn=reseeding_init)
    with pytest.warns(RuntimeWarning, match=r"numpy.random.seed.*numpy_rng"):
        list(loader)


def test_worker_init_fn_that_only_reads_worker_info_is_not_warned_about():
    loader = aload.DataLoader(list(range(4)), num_workers=2, worker_init_fn=split_range_safe)
    assert sorted(flatten(loader)) == [0, 1, 2, 3]  # warnings are errors in this suite


def split_range_safe(worker_id):
    info = aload.get_worker_info()
    info.numpy_rng.random()
    info.torch_generator.seed()


class TwoSpeedStreams(IterableDataset):
    """Worker 0's first item waits for a gate; worker 1's items come at once."""

    def __init__(self, gate):
        self.gate = gate

    def __iter__(self):
        info = tud.get_worker_info()
        if info.id == 0:
            self.gate.wait(10)
            return iter([-1])
        return iter(range(10))


def test_in_order_false_streams_are_not_held_back_by_one_slow_worker():
    gate = threading.Event()
    loader = aload.DataLoader(
        TwoSpeedStreams(gate), batch_size=None, num_workers=2, in_order=False, timeout=5
    )
    first_ten = []
    it = iter(loader)
    for _ in range(10):
        first_ten.append(int(next(it)))
    gate.set()
    rest = [int(x) for x in it]
    assert first_ten == list(range(10))
    assert rest == [-1]


OPEN_FILES_LIMITED = """
import resource
import torch
from torch.utils.data import Dataset
import aload

class ManyTensors(Dataset):
    def __len__(self):
        return 2_000

    def __getitem__(self, index):
        return [torch.zeros({floats}) for _ in range(20)]

if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))
    loader = aload.DataLoader(
        ManyTensors(), batch_size=None, num_workers=2, worker_mode="process"
    )
    try:
        held = list(loader)
        print("held", len(held))
    except RuntimeError as error:
        print("RuntimeError:", error)
"""


def open_files_limited(tmp_path, floats: int) -> str:
    """What a script prints that holds every sample (20 tensors of `floats` floats each) of
    an epoch read by worker processes, with 100 open files allowed."""
    script = tmp_path / "limited.py"
    script.write_text(OPEN_FILES_LIMITED.format(floats=floats))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )
    assert result.stdout, result.stderr[-2000:]
    return result.stdout


def test_open_files_limit_raises_torchs_error_instead_of_hanging(tmp_path):
    """Tensors over 256 KiB come back through shared memory, a file descriptor each."""
    printed = open_files_limited(tmp_path, 80_000)
    assert "RuntimeError:" in printed
    assert "ulimit -n" in printed
    assert "set_sharing_strategy" in printed


def test_small_tensors_come_back_by_value_and_hold_no_file_open(tmp_path):
    """torch's loader runs out of file descriptors here; small tensors come by value."""
    assert open_files_limited(tmp_path, 1).split() == ["held", "2000"]


class Crashes(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        import ctypes

        ctypes.string_at(0)  # a segmentation fault in native code


def test_a_crashed_worker_process_is_reported_in_torchs_words():
    loader = aload.DataLoader(Crashes(), num_workers=1, worker_mode="process")
    with pytest.raises(RuntimeError) as ours:
        list(loader)
    with pytest.raises(RuntimeError) as theirs:
        list(tud.DataLoader(Crashes(), num_workers=1))
    # torch says "is killed by signal: ..." or, when its queue notices first, "(pid(s) N)
    # exited unexpectedly"; aload always names the signal.
    assert theirs.match(r"DataLoader worker \(pid")
    assert ours.match(r"DataLoader worker \(pid \d+\) is killed by signal: Segmentation fault\.")


@pytest.mark.skipif(os.cpu_count() is None, reason="needs a known core count")
def test_more_worker_processes_than_cores_warn_as_torch_does():
    too_many = len(os.sched_getaffinity(0)) + 1
    with pytest.warns(UserWarning, match="worker processes in total") as theirs:
        tud.DataLoader(list(range(4)), num_workers=too_many)
    with pytest.warns(UserWarning, match="worker processes in total") as ours:
        aload.DataLoader(list(range(4)), num_workers=too_many, worker_mode="process")
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]


# -- loud differences: code that runs under torch runs under aload ----------------------------


def test_positional_arguments_mean_what_they_mean_in_torch():
    context = "spawn"
    generator = torch.Generator().manual_seed(3)
    args = (
        list(range(10)),
        2,
        True,
        None,
        None,
        1,
        None,
        False,
        False,
        0,
        None,
        context,
        generator,
    )
    ours, theirs = aload.DataLoader(*args), tud.DataLoader(*args)
    assert ours.multiprocessing_context.get_start_method() == "spawn"
    assert theirs.multiprocessing_context.get_start_method() == "spawn"
    assert ours.generator is theirs.generator is generator


@pytest.mark.parametrize("mode", MODES)
def test_torchs_keyword_arguments_and_defaults_are_accepted(mode):
    kwargs = {"num_workers": 1, "multiprocessing_context": "spawn", "pin_memory_device": ""}
    ours, theirs = aload_loader(list(range(6)), mode, **kwargs), tud.DataLoader(range(6), **kwargs)
    assert ours.prefetch_factor == theirs.prefetch_factor == 2
    assert flatten(ours) == flatten(theirs)
    zero = aload.DataLoader(list(range(6)), prefetch_factor=None)
    assert zero.prefetch_factor is tud.DataLoader(range(6), prefetch_factor=None).prefetch_factor


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prefetch_factor": 2},
        {"multiprocessing_context": "fork"},
        {"num_workers": 1, "multiprocessing_context": "no-such-method"},
        {"num_workers": 1, "prefetch_factor": -1},
        {"batch_size": "32"},
        {"batch_size": 0.5},
        {"drop_last": "no"},
    ],
)
def test_refused_where_torch_refuses_with_torchs_error(kwargs):
    with pytest.raises(Exception) as theirs:  # noqa: PT011 - compared below
        tud.DataLoader(list(range(10)), **kwargs)
    with pytest.raises(Exception) as ours:  # noqa: PT011
        aload.DataLoader(list(range(10)), **kwargs)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
    "name", ["batch_size", "batch_sampler", "sampler", "drop_last", "dataset", "persistent_workers"]
)
def test_attributes_that_decide_the_batches_cannot_change_as_in_torch(name):
    ours, theirs = aload.DataLoader(list(range(8))), tud.DataLoader(list(range(8)))
    with pytest.raises(ValueError) as theirs_error:  # noqa: PT011 - compared below
        setattr(theirs, name, getattr(theirs, name))
    with pytest.raises(ValueError) as ours_error:  # noqa: PT011
        setattr(ours, name, getattr(ours, name))
    assert str(ours_error.value) == str(theirs_error.value)


def test_other_torch_attributes_can_be_set_and_take_effect():
    loader = aload.DataLoader(list(range(8)), batch_size=4)
    loader.num_workers = 2
    loader.collate_fn = lambda samples: [s * 10 for s in samples]
    loader.timeout = 5.0
    loader.note = "free-form attributes too, as on torch's loader"
    seen = []
    loader.worker_init_fn = seen.append
    assert sorted(flatten(loader)) == [0, 10, 20, 30, 40, 50, 60, 70]
    assert sorted(seen) == [0, 1]
    assert (loader.num_workers, loader.timeout, loader.note) == (2, 5.0, loader.note)
    with pytest.raises(ValueError, match="timeout option should be non-negative"):
        loader.timeout = -1
    assert loader.timeout == 5.0  # a refused value leaves the loader as it was


class Stalls(Dataset):
    def __init__(self):
        self.release = threading.Event()

    def __len__(self):
        return 2

    def __getitem__(self, index):
        self.release.wait(5)
        return index


@pytest.mark.parametrize("caught", [RuntimeError, TimeoutError])
def test_timeout_is_caught_as_torchs_runtime_error_and_as_a_timeout(caught):
    ds = Stalls()
    it = iter(aload.DataLoader(ds, num_workers=1, timeout=0.1))
    with pytest.raises(caught, match=r"DataLoader timed out after 0\.1 seconds"):
        next(it)
    ds.release.set()
    it.close()


def test_loader_is_generic_and_its_iterator_has_torchs_length():
    annotated: aload.DataLoader[int] = aload.DataLoader(list(range(10)), batch_size=3)
    assert len(iter(annotated)) == len(iter(tud.DataLoader(range(10), batch_size=3))) == 4


class LongerThanItSays(IterableDataset):
    def __len__(self):
        return 3

    def __iter__(self):
        return iter(range(5))

    def __repr__(self):
        return "LongerThanItSays()"


def test_iterable_dataset_longer_than_its_len_warns_as_torch_does():
    def warnings_of(loader):
        len(loader)
        with pytest.warns(UserWarning, match="was reported to be 3") as record:
            list(loader)
        return sorted({str(w.message) for w in record})

    ours = warnings_of(aload.DataLoader(LongerThanItSays(), batch_size=None))
    theirs = warnings_of(tud.DataLoader(LongerThanItSays(), batch_size=None))
    assert ours == theirs
    assert len(ours) == 2  # after 4 and after 5 samples


@pytest.mark.parametrize("workers", [0, 2])
def test_a_tensor_datasets_negative_indices_count_from_the_end_as_in_torch(workers):
    """The one-op gather refuses negative indices; those batches take indexing, as torch."""
    data = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    batches = [[-1, 0], [3, -2], [4, 5]]
    expected = [[t.tolist() for t in b] for b in tud.DataLoader(data, batch_sampler=batches)]
    loader = aload.DataLoader(data, batch_sampler=batches, num_workers=workers)
    assert [[t.tolist() for t in b] for b in loader] == expected
    with pytest.raises(IndexError):  # out of range: torch's error type
        list(tud.DataLoader(data, batch_sampler=[[10]]))
    with pytest.raises(IndexError):
        list(aload.DataLoader(data, batch_sampler=[[10]], num_workers=workers))
