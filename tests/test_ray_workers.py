"""worker_mode="ray": batches read by Ray actors on a real local cluster, with the contract of
process workers: torch's samplers and order, exactly once, resume, errors, retries, and an
actor that dies mid-epoch."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
import torch.utils.data as tud
from conftest import (
    Indexed,
    ProcessDraws,
    ProcessDrawsByIndex,
    assert_resumes_exactly,
    assert_worker_rngs_resume_between_epochs,
    flatten,
    take_and_save,
)
from loop_pauses import best_pause
from torch.utils.data import Dataset, IterableDataset, TensorDataset

import aload
from aload.workers import ray_actors
from aload.workers._out_of_band import OutOfBand

ray = pytest.importorskip("ray")


def test_without_a_cluster_it_says_how_to_start_or_join_one(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    loader = aload.DataLoader(Indexed(8), batch_size=2, num_workers=2, worker_mode="ray")
    with pytest.raises(RuntimeError, match=r"ray\.init\(\).*ray\.init\(address='auto'\)"):
        list(loader)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for this module's tests, stopped after them."""
    # The actors import this module's datasets by name: they find them as the tests do.
    tests = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield
    ray.shutdown()


def loader_on_ray(dataset, **kwargs):
    return aload.DataLoader(dataset, num_workers=2, worker_mode="ray", **kwargs)


@pytest.mark.usefixtures("cluster")
@pytest.mark.parametrize("in_order", [True, False])
def test_the_samples_of_torchs_sampler_once_each_epoch(in_order):
    data = TensorDataset(torch.arange(90))

    def epochs(loader):
        return [[int(i) for b in loader for i in b[0]] for _ in range(2)]

    ours = loader_on_ray(
        data,
        batch_size=8,
        shuffle=True,
        in_order=in_order,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(4),
    )
    theirs = tud.DataLoader(
        data,
        batch_size=8,
        shuffle=True,
        num_workers=2,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(4),
    )
    got, expected = epochs(ours), epochs(theirs)
    ours.close()
    if in_order:
        assert got == expected
    else:
        assert [sorted(epoch) for epoch in got] == [sorted(epoch) for epoch in expected]


class Sharded(IterableDataset):
    """torch's recipe: each worker reads its share, by torch's `get_worker_info()`."""

    def __iter__(self):
        info = tud.get_worker_info()
        return iter(range(info.id, 23, info.num_workers))


@pytest.mark.usefixtures("cluster")
def test_an_iterable_dataset_is_sharded_by_torchs_worker_info_on_the_actors():
    theirs = flatten(tud.DataLoader(Sharded(), batch_size=3, num_workers=2))
    ours = flatten(loader_on_ray(Sharded(), batch_size=3))
    assert ours == theirs
    assert sorted(ours) == list(range(23))


@pytest.mark.usefixtures("cluster")
def test_a_state_saved_mid_epoch_resumes_exactly():
    def make():
        return loader_on_ray(
            Indexed(40), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)
        )

    assert_resumes_exactly(make, stop=3)


class FailsAt(Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, index):
        if index == 13:
            raise KeyError(f"no sample {index}")
        return index


@pytest.mark.usefixtures("cluster")
def test_an_error_keeps_its_type_and_names_the_batch_and_the_actor():
    with pytest.raises(KeyError, match="no sample 13") as raised:
        list(loader_on_ray(FailsAt(), batch_size=4))
    notes = "\n".join(raised.value.__notes__)
    assert "aload Ray actor" in notes
    assert "__getitem__" in notes  # the actor's traceback
    assert "indices [12, 13, 14, 15]" in notes


class Flaky(Dataset):
    """Every index fails once with a transient error, then reads; index 7 always fails."""

    def __init__(self):
        self.failed: set[int] = set()

    def __len__(self):
        return 16

    def __getitem__(self, index):
        if index == 7:
            raise ValueError("index 7 is broken")
        if index not in self.failed:
            self.failed.add(index)
            raise ConnectionError("try again")
        return index


@pytest.mark.usefixtures("cluster")
def test_retries_and_the_failure_budget_count_across_actors():
    loader = loader_on_ray(
        Flaky(),
        batch_size=4,
        retry=aload.Retry(attempts=2, backoff=0, on=(ConnectionError,)),
        max_skipped=1,
    )
    assert sorted(flatten(loader)) == [i for i in range(16) if i != 7]
    assert loader.stats.epoch.retries == 15
    assert loader.stats.epoch.skipped == 1


class SlowWithPid(Dataset):
    """Each sample is (index, the reading process's pid), read in 20 ms."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        time.sleep(0.02)
        return index, os.getpid()


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("cluster")
def test_an_actor_killed_mid_epoch_loses_no_sample_and_is_replaced():
    loader = loader_on_ray(SlowWithPid(), batch_size=4, shuffle=True)
    seen = []
    for number, (indices, pids) in enumerate(loader):
        seen += indices.tolist()
        if number == 2:
            os.kill(int(pids[0]), signal.SIGKILL)  # the actor's process, mid-epoch
    assert sorted(seen) == list(range(64))
    assert loader.stats.epoch.workers_replaced == 1


@pytest.mark.anyio
@pytest.mark.usefixtures("cluster")
async def test_async_for_over_ray_actors_keeps_the_loop_running(anyio_backend, monkeypatch):
    """The dataset (16 MB here) goes to the object store, and the actors start, off the
    caller's thread: on it, they paused the loop 36-58 ms on a fast machine. Off it, torch's
    pickling still copied the tensors' storage with the GIL held, in pieces of 10-15 ms on an
    idle 2-core machine and 46 ms on CI's; out of band, Ray copies them without it (a put's
    longest pause 5 ms, median). The actors' start (each imports torch) still competes for
    the two cores, so the loop may miss a beat or two."""
    data = TensorDataset(torch.arange(1024), torch.zeros(1024, 4096))
    put_on = []

    def put(ray, dataset):
        put_on.append(threading.current_thread())
        return put_to_the_store(ray, dataset)

    put_to_the_store = ray_actors._put
    monkeypatch.setattr(ray_actors, "_put", put)

    async def one_epoch():
        loader = loader_on_ray(data, batch_size=64, shuffle=True)
        got = [int(i) for batch in [b async for b in loader] for i in batch[0]]
        assert sorted(got) == list(range(1024))

    # The better of two tries, as the other loop-pause tests: what aload causes happens each
    # time; a collection of this long suite's heap, or a busy machine, does not.
    pause = await best_pause(one_epoch, 0.035, tries=2)
    assert put_on
    assert threading.current_thread() not in put_on
    assert pause < 0.035, f"{pause * 1000:.1f} ms"


@pytest.mark.usefixtures("cluster")
def test_the_datasets_tensors_reach_the_store_as_they_were_shared_and_writable():
    """Tensors go to the object store out of band (`OutOfBand`); each comes back as torch's
    own pickling gives it: same values, dtype, strides and views, a private writable copy."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    weight = torch.nn.Parameter(torch.ones(3))
    sent = {
        "base": base,
        "transposed": base.t(),  # a view of the same storage
        "row": base[2],  # a view with an offset
        "halves": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "flags": torch.tensor([True, False, True]),
        "complex": torch.tensor([1 + 2j], dtype=torch.complex64),
        "scalar": torch.tensor(7),
        "empty": torch.empty(0, 5),
        "array": np.arange(6).reshape(2, 3),
        "weight": weight,
        "grad": torch.ones(2, requires_grad=True),
    }
    got = ray.get(ray.put(OutOfBand(sent)))
    for name, value in sent.items():
        if isinstance(value, torch.Tensor):
            assert type(got[name]) is type(value), name
            assert got[name].dtype == value.dtype, name
            assert got[name].stride() == value.stride(), name
            assert torch.equal(got[name].detach(), value.detach()), name
            assert got[name].requires_grad == value.requires_grad, name
        else:
            np.testing.assert_array_equal(got[name], value)
    got["base"][2, 0] = 100.0  # the views still share their storage, and it is writable
    assert got["row"][0] == 100.0
    assert got["transposed"][0, 2] == 100.0
    assert base[2, 0] == 12.0  # and it is a copy, not the sender's memory


def test_a_datasets_tensor_bytes_travel_beside_its_pickle_not_in_it():
    """The bytes Ray would copy with the GIL held (the pickle) hold no tensor's storage."""
    data = TensorDataset(torch.arange(1024), torch.zeros(1024, 4096))
    rebuild, (pickled, buffers) = OutOfBand(data).__reduce__()
    assert len(pickled) < 4096
    assert sum(buffer.nbytes for buffer in buffers) == 1024 * 8 + 1024 * 4096 * 4
    assert all(isinstance(buffer, np.ndarray) for buffer in buffers)  # Ray's out-of-band kind
    back = rebuild(pickled, buffers)
    assert torch.equal(back.tensors[0], data.tensors[0])
    assert torch.equal(back.tensors[1], data.tensors[1])


@pytest.mark.usefixtures("cluster")
def test_an_object_ref_inside_the_dataset_is_kept_alive_by_the_put():
    """Ray's own reducers still count the refs a dataset holds: the inner object outlives
    the caller's ref to it for as long as the put dataset lives."""
    inner = ray.put(torch.arange(5))
    outer = ray.put(OutOfBand({"inner": inner, "weights": torch.ones(4)}))
    del inner
    gc.collect()
    time.sleep(0.2)
    assert torch.equal(ray.get(ray.get(outer)["inner"]), torch.arange(5))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_workers": 0}, ValueError, "num_workers > 0"),
        ({"worker_mode": "thread", "ray_options": {}}, ValueError, "ray_options is for"),
        ({"ray_options": 4}, TypeError, "ray_options must be a mapping"),
    ],
)
def test_ray_arguments_are_checked_when_the_loader_is_made(kwargs, error, message):
    arguments = {"num_workers": 2, "worker_mode": "ray", **kwargs}
    with pytest.raises(error, match=message):
        aload.DataLoader(Indexed(8), **arguments)


@pytest.mark.usefixtures("cluster")
def test_a_dataset_the_actors_cannot_import_says_how_to_ship_it(tmp_path, monkeypatch):
    (tmp_path / "only_here.py").write_text(
        "class Numbers:\n"
        "    def __len__(self):\n        return 8\n"
        "    def __getitem__(self, index):\n        return index\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from only_here import Numbers

    with pytest.raises(RuntimeError, match=r"could not start.*importable on the cluster"):
        list(loader_on_ray(Numbers(), batch_size=2))


class HoldsALock(Dataset):
    def __init__(self):
        self.lock = threading.Lock()

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return index


@pytest.mark.usefixtures("cluster")
def test_a_dataset_that_cannot_be_pickled_is_named_with_a_way_out():
    with pytest.raises(TypeError, match=r"object store, but it could not be pickled.*'thread'"):
        list(loader_on_ray(HoldsALock(), batch_size=2))


@pytest.mark.anyio
@pytest.mark.usefixtures("cluster")
async def test_an_async_epoch_left_before_it_waits_starts_no_actor(anyio_backend):
    """`async for` starts the actors when it first waits: an epoch dropped before that
    puts nothing in the object store and leaves no actor behind."""
    before = len(ray.util.list_named_actors(all_namespaces=True))
    loader = loader_on_ray(Indexed(8), batch_size=2)
    epoch = aiter(loader)
    pool = epoch._epoch._pool
    del epoch
    assert pool.join(5)
    assert pool._actors == []
    assert sorted(flatten([b async for b in loader])) == list(range(8))
    assert len(ray.util.list_named_actors(all_namespaces=True)) == before


@pytest.mark.usefixtures("cluster")
@pytest.mark.parametrize("in_order", [True, False])
def test_resume_mid_epoch_gives_each_sample_once_in_either_order(in_order):
    def make():
        return loader_on_ray(
            Indexed(64),
            batch_size=4,
            shuffle=True,
            in_order=in_order,
            generator=torch.Generator().manual_seed(3),
        )

    head, state = take_and_save(make(), stop=5)
    resumed = make()
    resumed.load_state_dict(state)
    tail = flatten(resumed)
    assert sorted(flatten(head) + tail) == list(range(64))
    if in_order:
        assert flatten(head) + tail == flatten(make())


@pytest.mark.usefixtures("cluster")
def test_an_iterable_dataset_resumes_on_new_actors():
    def make():
        return loader_on_ray(Sharded(), batch_size=3)

    assert_resumes_exactly(make, stop=3)


@pytest.mark.usefixtures("cluster")
@pytest.mark.parametrize("dataset", [ProcessDraws, ProcessDrawsByIndex])
def test_persistent_actors_rngs_resume_with_a_state_saved_between_epochs(dataset):
    assert_worker_rngs_resume_between_epochs(
        lambda: loader_on_ray(
            dataset(),
            batch_size=2,
            persistent_workers=True,
            generator=torch.Generator().manual_seed(3),
            shuffle=None if dataset is ProcessDraws else True,
        )
    )


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("cluster")
def test_actors_waiting_for_room_on_the_cluster_are_reported(monkeypatch, caplog):
    """Another loader's persistent actors hold both CPUs: the new actors wait, and the
    loader says why instead of waiting without a word; they start once the CPUs are free."""
    monkeypatch.setattr(ray_actors, "_START_PATIENCE_SECONDS", 0.5)
    holder = loader_on_ray(Indexed(8), batch_size=2, persistent_workers=True)
    assert sorted(flatten(holder)) == list(range(8))
    waiting = loader_on_ray(Indexed(8), batch_size=2)
    samples: list[int] = []
    reader = threading.Thread(target=lambda: samples.extend(flatten(waiting)))
    with caplog.at_level("WARNING", logger="aload"):
        reader.start()
        deadline = time.monotonic() + 30
        while "have not started" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "2 of aload's 2 Ray actors have not started" in caplog.text
        assert "close() that loader" in caplog.text
        assert samples == []
        holder.close()
        reader.join(60)
    assert sorted(samples) == list(range(8))


class KillsItsReader(Dataset):
    """Index 5 ends the process that reads it, as an out-of-memory kill would."""

    def __len__(self):
        return 16

    def __getitem__(self, index):
        if index == 5:
            os._exit(1)
        return index


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("cluster")
def test_a_batch_that_kills_two_actors_raises_naming_both():
    loader = loader_on_ray(KillsItsReader(), batch_size=4)
    with pytest.raises(RuntimeError, match=r"indices \[4, 5, 6, 7\]\) failed on two actors") as got:
        list(loader)
    message = str(got.value)
    assert message.count("aload Ray actor") == 2
    assert loader.stats.epoch.workers_replaced == 2


class ReadsItsEnvironment(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return os.environ.get("ALOAD_TEST_MARK", "unset")


@pytest.mark.usefixtures("cluster")
def test_ray_options_reach_the_actors_in_rays_own_words():
    """`ray_options` is passed to each actor's `.options()`: here a `runtime_env` and a
    fraction of a CPU, as Ray spells them."""
    tests = os.path.dirname(os.path.abspath(__file__))
    options = {
        "num_cpus": 0.5,
        "runtime_env": {"env_vars": {"ALOAD_TEST_MARK": "from ray_options", "PYTHONPATH": tests}},
    }
    loader = loader_on_ray(ReadsItsEnvironment(), batch_size=2, ray_options=options)
    assert [x for batch in loader for x in batch] == ["from ray_options"] * 4
    assert loader.ray_options == options


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("cluster")
@pytest.mark.parametrize("leave", ["break", "drop the loader"])
def test_leaving_an_epoch_early_stops_every_actor(leave):
    """The actors' processes end when an epoch is left (or its loader dropped) mid-way:
    nothing of the pool keeps running on the cluster."""
    loader = loader_on_ray(SlowWithPid(), batch_size=4, persistent_workers=leave != "break")
    pids = set()
    epoch = iter(loader)
    for _ in range(4):
        pids.update(int(pid) for pid in next(epoch)[1])
    pool = epoch._epoch._pool
    if leave == "break":
        epoch.close()
    else:
        del epoch, loader
    assert pool.join(30)
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(pid) for pid in pids)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
