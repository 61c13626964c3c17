"""worker_mode="process": the same samples as threads, from worker processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.utils.data
from conftest import Indexed, assert_resumes_exactly, flatten

import aload


class Described(torch.utils.data.Dataset):
    """Each sample says which process read it, with that process's worker info."""

    def __len__(self):
        return 24

    def __getitem__(self, index):
        info = aload.get_worker_info()
        theirs = torch.utils.data.get_worker_info()
        return {
            "index": index,
            "pid": os.getpid(),
            "id": info.id,
            "seed": info.seed,
            "mode": info.mode,
            "torch_id": theirs.id,
            "initialised": INITIALISED.get(os.getpid(), -1),
        }


INITIALISED: dict[int, int] = {}


def record_init(worker_id):
    INITIALISED[os.getpid()] = worker_id


class DiesAt(Indexed):
    def __getitem__(self, index):
        if index == 13:
            os.kill(os.getpid(), signal.SIGKILL)
        return index


class RaisesAt(Indexed):
    def __getitem__(self, index):
        if index == 6:
            raise KeyError(f"sample {index} is corrupt")
        return index


class TorchShards(torch.utils.data.IterableDataset):
    """Shards with torch's own get_worker_info, as torch users write it."""

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(range(start, 30, step))


def no_children_left():
    deadline = time.monotonic() + 5
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return multiprocessing.active_children() == []


@pytest.mark.parametrize("in_order", [True, False])
def test_same_samples_as_thread_workers(in_order):
    def make(mode):
        return aload.DataLoader(
            Indexed(50),
            batch_size=4,
            shuffle=True,
            drop_last=True,
            num_workers=2,
            worker_mode=mode,
            in_order=in_order,
            generator=torch.Generator().manual_seed(9),
        )

    threads = [b.tolist() for b in make("thread")]
    processes = [b.tolist() for b in make("process")]
    assert processes == threads if in_order else sorted(processes) == sorted(threads)
    assert no_children_left()


def test_each_process_knows_itself_and_ran_worker_init_fn_once():
    expected_base = int(
        torch.empty((), dtype=torch.int64).random_(generator=torch.Generator().manual_seed(3))
    )
    loader = aload.DataLoader(
        Described(),
        batch_size=3,
        num_workers=2,
        worker_mode="process",
        worker_init_fn=record_init,
        generator=torch.Generator().manual_seed(3),
    )
    batches = list(loader)
    pids = {int(p) for b in batches for p in b["pid"]}
    assert os.getpid() not in pids
    for b in batches:
        assert b["mode"] == ["process"] * len(b["index"])
        assert torch.equal(b["id"], b["torch_id"])
        assert torch.equal(b["seed"], expected_base + b["id"])
        assert torch.equal(b["initialised"], b["id"])
    assert sorted(int(i) for b in batches for i in b["index"]) == list(range(24))


def test_iterable_dataset_shards_with_torchs_get_worker_info():
    loader = aload.DataLoader(TorchShards(), batch_size=4, num_workers=2, worker_mode="process")
    assert sorted(flatten(list(loader))) == list(range(30))


def test_error_in_a_worker_process_keeps_type_message_and_traceback_text():
    loader = aload.DataLoader(RaisesAt(12), batch_size=4, num_workers=2, worker_mode="process")
    with pytest.raises(KeyError, match="sample 6 is corrupt") as caught:
        list(loader)
    notes = "\n".join(caught.value.__notes__)
    assert "indices [4, 5, 6, 7]" in notes
    assert "Traceback" in notes
    assert "in __getitem__" in notes
    assert no_children_left()


def test_killed_worker_is_reported_within_seconds_naming_worker_and_batch():
    loader = aload.DataLoader(
        DiesAt(40), batch_size=4, num_workers=2, worker_mode="process", in_order=False
    )
    started = time.monotonic()
    with pytest.raises(
        RuntimeError,
        match=r"DataLoader worker \(pid \d+\) is killed by signal: Killed\. It was aload worker \d",
    ):
        list(loader)
    assert time.monotonic() - started < 10
    assert no_children_left()


def test_forked_workers_take_what_cannot_be_pickled_as_torchs_do():
    """Under fork (Linux's default) the workers inherit the dataset and functions: a lambda
    on the dataset, a lambda collate_fn, a local worker_init_fn work as they do in torch."""
    ds = Indexed(12)
    ds.hook = lambda: None
    started = []

    def note_start(worker_id):
        started.append(worker_id)

    kwargs = {
        "batch_size": 4,
        "num_workers": 2,
        "collate_fn": lambda batch: [sample * 10 for sample in batch],
        "worker_init_fn": note_start,
        "multiprocessing_context": "fork",
    }
    theirs = list(torch.utils.data.DataLoader(ds, **kwargs))
    loader = aload.DataLoader(ds, worker_mode="process", persistent_workers=True, **kwargs)
    assert list(loader) == theirs
    assert list(loader) == theirs  # a second epoch of the same (persistent) workers
    loader.close()
    assert no_children_left()


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
@pytest.mark.parametrize(
    ("argument", "named"),
    [
        ({"dataset": "unpicklable"}, "the dataset"),
        ({"collate_fn": lambda batch: batch}, "collate_fn"),
        ({"worker_init_fn": lambda worker_id: None}, "worker_init_fn"),
        ({"transform": lambda sample: sample}, "transform"),
    ],
)
def test_a_start_method_that_pickles_names_what_cannot_be_pickled_when_built(
    method, argument, named
):
    ds, argument = Indexed(4), dict(argument)
    if argument.pop("dataset", None):
        ds.hook = lambda: None
    with pytest.raises(TypeError, match=f"sends {named} to each worker process.*module level"):
        aload.DataLoader(
            ds, num_workers=1, worker_mode="process", multiprocessing_context=method, **argument
        )
    assert no_children_left()


class ArrayRows(torch.utils.data.Dataset):
    """Rows of a 512 KiB numpy array: pickled, its data is a buffer written out of band."""

    def __init__(self):
        self.array = np.arange(256 * 256, dtype=np.float64).reshape(256, 256)

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.from_numpy(self.array[index].copy())


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_start_method_that_pickles_sends_a_dataset_holding_a_large_array(method):
    """The check that names what cannot be pickled took a large buffer for an error."""
    theirs = list(torch.utils.data.DataLoader(ArrayRows(), batch_size=4))
    loader = aload.DataLoader(
        ArrayRows(), batch_size=4, num_workers=1, worker_mode="process",
        multiprocessing_context=method,
    )  # fmt: skip
    ours = list(loader)
    assert len(ours) == len(theirs) == 2
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert no_children_left()


def test_break_leaves_no_process_and_no_shared_memory_behind():
    shm_before = set(os.listdir("/dev/shm"))
    for _ in aload.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(512, 3, 32, 32)),
        batch_size=32,
        num_workers=2,
        worker_mode="process",
    ):
        break
    assert no_children_left()
    assert set(os.listdir("/dev/shm")) <= shm_before


def test_persistent_worker_processes_serve_every_epoch_until_close():
    loader = aload.DataLoader(
        Described(), batch_size=6, num_workers=2, worker_mode="process", persistent_workers=True
    )
    pids = [{int(p) for b in loader for p in b["pid"]} for _ in range(3)]
    assert pids[0] == pids[1] == pids[2]
    loader.close()
    assert no_children_left()


def test_resume_in_process_mode():
    def make():
        return aload.DataLoader(
            Indexed(40),
            batch_size=4,
            shuffle=True,
            num_workers=2,
            worker_mode="process",
            generator=torch.Generator().manual_seed(1),
        )

    assert_resumes_exactly(make, stop=3)


class Slow(Indexed):
    def __getitem__(self, index):
        if index == 2:
            time.sleep(3)
        return index


def test_timeout_in_process_mode_names_the_batch():
    loader = aload.DataLoader(
        Slow(8), batch_size=2, num_workers=1, worker_mode="process", timeout=1.5
    )
    with pytest.raises(TimeoutError, match=r"batch 1 \(indices \[2, 3\]\)"):
        list(loader)
    assert no_children_left()


@pytest.mark.parametrize(
    ("context", "error"),
    [("threads", ValueError), (42, TypeError)],
)
def test_bad_multiprocessing_context_is_refused(context, error):
    with pytest.raises(error, match="multiprocessing_context"):
        aload.DataLoader(
            Indexed(4), num_workers=1, worker_mode="process", multiprocessing_context=context
        )


class DiesOnce(Indexed):
    """Kills its worker at index 13, the first time only (a file remembers across processes)."""

    def __init__(self, n, marker):
        super().__init__(n)
        self.marker = marker

    def __getitem__(self, index):
        if index == 13 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return index


def test_persistent_workers_are_replaced_after_one_died(tmp_path):
    loader = aload.DataLoader(
        DiesOnce(40, str(tmp_path / "died")),
        batch_size=4,
        num_workers=2,
        worker_mode="process",
        persistent_workers=True,
    )
    with pytest.raises(RuntimeError, match="is killed by signal: Killed"):
        list(loader)
    assert sorted(flatten(list(loader))) == list(range(40))
    assert len(multiprocessing.active_children()) == 2  # a full pool again, not a survivor
    loader.close()
    assert no_children_left()


class Broken(torch.utils.data.Dataset):
    """Samples 3, 9, 14 and 20 are gone; the others read on their first try, or (with
    `flaky`) on their second, each worker process keeping its own count of tries."""

    def __init__(self, flaky=False):
        self.flaky = flaky
        self.tried = set()

    def __len__(self):
        return 24

    def __getitem__(self, index):
        if index in {3, 9, 14, 20}:
            raise OSError(f"sample {index} is gone")
        if self.flaky and index not in self.tried:
            self.tried.add(index)
            raise TimeoutError(f"slow read of {index}")
        return index


@pytest.mark.parametrize("worker_mode", ["thread", "process"])
def test_the_failure_budget_is_one_per_epoch_across_all_workers(worker_mode, caplog):
    def make(max_skipped, flaky=False):
        return aload.DataLoader(
            Broken(flaky),
            batch_size=4,
            num_workers=2,
            worker_mode=worker_mode,
            max_skipped=max_skipped,
            retry=aload.Retry(attempts=2, backoff=0, on=(TimeoutError,)),
        )

    loader = make(4, flaky=True)
    assert flatten(list(loader)) == [i for i in range(24) if i not in {3, 9, 14, 20}]
    assert sorted(loader.stats.skipped_indices) == [3, 9, 14, 20]
    assert loader.stats.retries == 20  # every readable sample, once
    assert "skipped sample 9" in caplog.text
    # Two workers, two skips each would fit a budget per worker; the epoch's is 3.
    with pytest.raises(OSError, match=r"sample (3|9|14|20) is gone"):
        list(make(3))
    assert no_children_left()


NO_MAIN_GUARD = """
import asyncio
import sys
import torch.utils.data
import aload

class Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return index * index

loader = aload.DataLoader(
    Squares(), batch_size=4, num_workers=2, worker_mode="process",
    multiprocessing_context=sys.argv[1] if len(sys.argv) > 1 else None,
)
if sys.argv[2:] == ["async"]:
    async def main():
        return [batch.tolist() async for batch in loader]
    print(asyncio.run(main()))
else:
    print([batch.tolist() for batch in loader])
"""


@pytest.mark.skipif(multiprocessing.get_all_start_methods()[0] != "fork", reason="fork default")
def test_a_script_without_a_main_guard_runs_as_under_torch(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(NO_MAIN_GUARD)
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[[0, 1, 4, 9], [16, 25, 36, 49]]"


@pytest.mark.parametrize("loop", ["for", "async"])
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_script_without_a_main_guard_gets_one_error_that_says_the_fix(tmp_path, method, loop):
    script = tmp_path / "train.py"
    script.write_text(NO_MAIN_GUARD)
    done = subprocess.run(
        [sys.executable, script, method, loop], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert f"with the '{method}' start method each worker runs your main module" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr
    assert "bootstrapping phase" not in done.stderr  # multiprocessing's own, once per worker
    assert done.stderr.count("Traceback") == 1


KILLED_MID_EPOCH = r"""
import multiprocessing, os, signal, sys
import aload
sys.path.insert(0, sys.argv[1])
from conftest import Indexed

loader = aload.DataLoader(Indexed(400, delay=0.01), batch_size=4, num_workers=2,
                          worker_mode="process")
it = iter(loader)
next(it)
print(*[p.pid for p in multiprocessing.active_children()], flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would: no cleanup runs
"""


def running(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_workers_of_a_killed_loader_process_exit_on_their_own(tmp_path):
    """Siblings forked with copies of each other's pipe ends keep every pipe open, so a
    worker must notice by itself that its parent is gone (torch's use a watchdog too)."""
    script = tmp_path / "killed.py"
    script.write_text(KILLED_MID_EPOCH)
    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
        [sys.executable, str(script), tests], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    workers = [int(pid) for pid in done.stdout.split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 10
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [pid for pid in workers if running(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert alive == []


def sent_to_a_worker(value):
    """`value` as a worker process unpickles what the parent sends it."""
    import pickle

    from aload.workers.process import wire_bytes

    return pickle.loads(wire_bytes(value))


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(16, dtype=torch.float32),
        torch.arange(24, dtype=torch.int64).reshape(4, 6)[:, ::2],  # a strided view
        torch.tensor([True, False]),
        torch.ones(3, dtype=torch.float16),
        torch.zeros(0, 5),
    ],
    ids=["float32", "view", "bool", "float16", "empty"],
)
def test_small_samples_reach_a_worker_by_value_and_unchanged(tensor):
    """Samples an async dataset's CPU stage sends go by value when small: a file
    descriptor through shared memory per tensor cost more than the copy."""
    (received,) = sent_to_a_worker([tensor])
    assert received.dtype == tensor.dtype
    assert torch.equal(received, tensor)
    assert not received.is_shared()


@pytest.mark.parametrize(
    "tensor",
    [
        torch.zeros(128 * 1024),  # 512 KiB: shared memory beats a copy
        torch.ones(4, dtype=torch.bfloat16),  # numpy has no bfloat16
        torch.ones(3, requires_grad=True),
    ],
    ids=["large", "bfloat16", "requires_grad"],
)
def test_other_tensors_reach_a_worker_as_torch_sends_them(tensor):
    received = sent_to_a_worker(tensor)
    assert received.dtype == tensor.dtype
    assert received.requires_grad == tensor.requires_grad
    assert torch.equal(received.detach(), tensor.detach())
    assert received.is_shared()


@pytest.mark.parametrize(("floats", "shared"), [(16, False), (128 * 1024, True)])
def test_batches_come_back_by_value_when_small_and_through_shared_memory_when_large(floats, shared):
    """A file descriptor passed per tensor cost more than copying a small batch: 32 items
    of a remote-decode epoch went from 50 to 36 us of the parent's CPU each."""
    samples = [torch.full((floats,), float(i)) for i in range(8)]
    loader = aload.DataLoader(samples, batch_size=4, num_workers=2, worker_mode="process")
    batches = list(loader)
    assert [batch.is_shared() for batch in batches] == [shared, shared]
    assert torch.equal(torch.cat(batches), torch.stack(samples))


class DiesInsideATensorsStart(Indexed):
    """At index 5 its worker is killed between naming a shared-memory file and removing the
    name, where torch's file_descriptor strategy keeps a name for a moment (as an
    out-of-files error or the OOM killer can catch it)."""

    def __getitem__(self, index):
        if index == 5:
            with open(f"/dev/shm/torch_{os.getpid()}_aload_test_{index}", "wb"):
                os.kill(os.getpid(), signal.SIGKILL)
        return index


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="shared memory files live in /dev/shm")
def test_a_killed_workers_shared_memory_names_are_removed():
    loader = aload.DataLoader(
        DiesInsideATensorsStart(16), batch_size=4, num_workers=2, worker_mode="process"
    )
    with pytest.raises(RuntimeError, match="is killed by signal: Killed"):
        list(loader)
    loader.close()
    assert [name for name in os.listdir("/dev/shm") if "_aload_test_" in name] == []
