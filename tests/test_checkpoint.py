"""Mid-epoch resume: head + resumed tail is exactly one uninterrupted epoch."""

from __future__ import annotations

import json
import pickle
import time
import warnings

import pytest
import torch
from conftest import (
    Indexed,
    PassesState,
    ProcessDraws,
    ProcessDrawsByIndex,
    Shards,
    assert_worker_rngs_resume_between_epochs,
    flatten,
    saved_and_loaded,
    take_and_save,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import (
    BatchSampler,
    RandomSampler,
    Sampler,
    WeightedRandomSampler,
)

import aload


class Jittery(Indexed):
    """Every third item is slow, so that batches finish out of order."""

    def __getitem__(self, index):
        if index % 3 == 0:
            time.sleep(0.001)
        return index


def as_lists(batches):
    return [b.tolist() for b in batches]


def head_and_state(loader, stop):
    head, state = take_and_save(loader, stop)
    return as_lists(head), state


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    batch_size=st.integers(1, 8),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    stop_fraction=st.floats(0, 1),
    workers=st.sampled_from([0, 1, 3]),
    resume_workers=st.sampled_from([0, 2]),
    in_order=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_head_plus_resumed_tail_is_one_uninterrupted_epoch(
    n, batch_size, drop_last, shuffle, stop_fraction, workers, resume_workers, in_order, seed
):
    def make(num_workers):
        return aload.DataLoader(
            Jittery(n),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=num_workers,
            in_order=in_order,
            generator=torch.Generator().manual_seed(seed),
        )

    reference = make(workers)
    whole = as_lists(reference)
    after = as_lists(reference)
    stop = int(stop_fraction * len(whole))

    head, state = head_and_state(make(workers), stop)
    resumed = make(resume_workers)
    resumed.load_state_dict(state)
    tail = as_lists(resumed)
    next_epoch = as_lists(resumed)
    if in_order:
        assert head + tail == whole
        assert next_epoch == after
    else:
        assert sorted(head + tail) == sorted(whole)
        assert sorted(next_epoch) == sorted(after)


@pytest.mark.anyio
async def test_resume_inside_async_for_counts_yielded_batches_not_prefetched(anyio_backend):
    def make():
        return aload.DataLoader(
            Indexed(100, delay=0.001),
            batch_size=5,
            shuffle=True,
            num_workers=3,
            prefetch_factor=4,
            generator=torch.Generator().manual_seed(7),
        )

    whole = as_lists(make())
    loader, head = make(), []
    async for batch in loader:
        head.append(batch.tolist())
        if len(head) == 6:
            state = saved_and_loaded(loader.state_dict())
            break
    resumed = make()
    resumed.load_state_dict(state)
    assert head + [b.tolist() async for b in resumed] == whole


def test_state_between_epochs_describes_the_next_epoch():
    def make():
        return aload.DataLoader(Indexed(20), batch_size=4, shuffle=True, num_workers=2)

    loader = make()
    list(loader)
    # A training script saves torch's RNG beside the loader; the next epoch draws from it.
    state, rng = saved_and_loaded(loader.state_dict()), torch.get_rng_state()
    second = as_lists(loader)
    fresh = make()
    fresh.load_state_dict(state)
    torch.set_rng_state(rng)
    assert as_lists(fresh) == second


def test_state_is_small_and_picklable():
    loader = aload.DataLoader(Indexed(10_000), batch_size=32, shuffle=True, num_workers=2)
    it = iter(loader)
    for _ in range(10):
        next(it)
    state = loader.state_dict()
    it.close()
    assert len(pickle.dumps(state)) < 16_384


JSON_LOADERS = {
    "the global RNG, out of order": lambda: aload.DataLoader(
        Jittery(37), batch_size=4, shuffle=True, num_workers=3, in_order=False
    ),
    "a generator, a sampler of its own": lambda: aload.DataLoader(
        Jittery(37), batch_size=4, sampler=RandomSampler(range(37), generator=torch.Generator())
    ),
    "streams with their own state": lambda: aload.DataLoader(
        EpochShuffledStream(40), batch_size=4, num_workers=2
    ),
}


@pytest.mark.parametrize("name", list(JSON_LOADERS))
def test_a_state_is_plain_data_that_json_keeps(name):
    """Plain data: a state that went through JSON (generators' states are text; the keys of
    per-worker maps come back as strings) resumes exactly."""
    make = JSON_LOADERS[name]
    loader = make()
    it = iter(loader)
    head = [next(it).tolist() for _ in range(3)]
    state = json.loads(json.dumps(loader.state_dict()))
    rest = [batch.tolist() for batch in it]
    resumed = make()
    resumed.load_state_dict(state)
    tail = as_lists(resumed)
    assert head
    if loader.in_order:
        assert tail == rest
    else:
        assert sorted(flatten(tail)) == sorted(flatten(rest))


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"batch_size": 8}, "batch_size=4, but this DataLoader has batch_size=8"),
        ({"drop_last": True}, "drop_last"),
        ({"n": 30}, "dataset_length=20, but this DataLoader has dataset_length=30"),
    ],
)
def test_state_from_another_configuration_is_refused(change, names):
    def make(n=20, **kwargs):
        return aload.DataLoader(Indexed(n), **{"batch_size": 4, "shuffle": True, **kwargs})

    state = make().state_dict()
    with pytest.raises(ValueError, match=names):
        make(**change).load_state_dict(state)


def test_something_else_than_a_state_is_refused():
    with pytest.raises(ValueError, match="state_dict"):
        aload.DataLoader(Indexed(3)).load_state_dict({"epoch": 3})


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("sampling", ["shuffle", "sampler"])
def test_global_rng_epochs_resume_exactly_and_leave_the_callers_rng_alone(num_workers, sampling):
    """Without a generator, the epoch's draws come from torch's global RNG, as in torch;
    resuming replays them from the epoch's start without drawing from the caller's RNG."""
    ds = Indexed(30)

    def make():
        if sampling == "shuffle":
            return aload.DataLoader(ds, batch_size=4, shuffle=True, num_workers=num_workers)
        return aload.DataLoader(
            ds, batch_size=4, sampler=RandomSampler(ds), num_workers=num_workers
        )

    torch.manual_seed(7)
    whole = as_lists(make())
    torch.manual_seed(7)
    loader = make()
    head, state = head_and_state(loader, 3)
    torch.manual_seed(99)
    callers = torch.get_rng_state()
    resumed = make()
    resumed.load_state_dict(saved_and_loaded(state))
    tail = as_lists(resumed)
    assert head + tail == whole
    assert torch.equal(torch.get_rng_state(), callers)


class RotatingSampler(Sampler):
    """Starts one place later every epoch; its position is its own state."""

    def __init__(self, n):
        self.n, self.offset = n, 0

    def __iter__(self):
        order = [(i + self.offset) % self.n for i in range(self.n)]
        self.offset += 1
        return iter(order)

    def __len__(self):
        return self.n

    def state_dict(self):
        return {"offset": self.offset}

    def load_state_dict(self, state):
        self.offset = state["offset"]


def test_sampler_with_its_own_state_is_asked_for_it():
    def make():
        return aload.DataLoader(Indexed(12), batch_size=3, sampler=RotatingSampler(12))

    loader = make()
    list(loader)
    head, state = head_and_state(loader, 2)
    reference = make()
    list(reference)
    expected = as_lists(reference)
    resumed = make()
    resumed.load_state_dict(state)
    assert head + as_lists(resumed) == expected


class EpochShuffledStream(Shards):
    """Shuffles its shard by an epoch its user sets; its state says that epoch and how far
    its worker's stream has gone (as torchdata asks of a stateful stream)."""

    def __init__(self, n):
        super().__init__(n)
        self.epoch = 0
        self.position = 0

    def __iter__(self):
        items = list(super().__iter__())
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(self.epoch))
        shuffled = [items[i] for i in order.tolist()]
        while self.position < len(shuffled):
            self.position += 1
            yield shuffled[self.position - 1]
        self.position = 0

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = state["epoch"], state["position"]


@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.parametrize("stop", [0, 1, 4, 7])
def test_iterable_dataset_resumes_each_worker_stream(workers, stop):
    def make():
        return aload.DataLoader(Shards(23), batch_size=3, num_workers=workers)

    whole = as_lists(make())
    head, state = head_and_state(make(), min(stop, len(whole)))
    resumed = make()
    resumed.load_state_dict(state)
    assert head + as_lists(resumed) == whole


@pytest.mark.parametrize("mode", ["thread", "process"])
@pytest.mark.parametrize("in_order", [True, False])
def test_iterable_dataset_with_its_own_state_resumes_from_it(in_order, mode):
    def make(epoch):
        dataset = EpochShuffledStream(40)
        dataset.epoch = epoch
        return aload.DataLoader(
            dataset, batch_size=4, num_workers=2, in_order=in_order, worker_mode=mode
        )

    whole = as_lists(make(epoch=3))
    head, state = head_and_state(make(epoch=3), 3)
    resumed = make(epoch=0)
    resumed.load_state_dict(state)
    if in_order:
        assert head + as_lists(resumed) == whole
    else:
        assert sorted(head + as_lists(resumed)) == sorted(whole)


def test_out_of_order_head_resumes_with_exactly_the_missing_batches():
    def make():
        return aload.DataLoader(
            Jittery(60),
            batch_size=2,
            num_workers=3,
            in_order=False,
            generator=torch.Generator().manual_seed(0),
        )

    in_sampler_order = as_lists(aload.DataLoader(Jittery(60), batch_size=2))
    head, state = head_and_state(make(), 12)
    assert head != in_sampler_order[:12]  # some batches really were delivered out of order
    resumed = make()
    resumed.load_state_dict(state)
    tail = as_lists(resumed)
    assert sorted(head + tail) == in_sampler_order


@pytest.mark.parametrize(
    "sampling",
    [
        lambda ds, g: {"batch_sampler": BatchSampler(RandomSampler(ds, generator=g), 3, False)},
        lambda ds, g: {
            "batch_size": 3,
            "sampler": WeightedRandomSampler([1.0] * 10 + [5.0] * 20, 40, generator=g),
        },
    ],
    ids=["batch_sampler", "weighted"],
)
def test_user_samplers_with_a_generator_resume_exactly(sampling):
    def make():
        ds = Indexed(30)
        return aload.DataLoader(ds, num_workers=2, **sampling(ds, torch.Generator().manual_seed(4)))

    loader = make()
    list(loader)
    head, state = head_and_state(loader, 4)
    reference = make()
    list(reference)
    resumed = make()
    resumed.load_state_dict(state)
    assert head + as_lists(resumed) == as_lists(reference)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_persistent_workers_resume_a_state_on_the_same_loader(mode):
    """The loader whose pool started with the saved epoch loads its state: the resumed epoch
    must draw the base seed again before the sampler draws, as the epoch did."""

    def make():
        return aload.DataLoader(
            Indexed(40), batch_size=4, shuffle=True, num_workers=2, worker_mode=mode,
            persistent_workers=True, generator=torch.Generator().manual_seed(1),
        )  # fmt: skip

    whole = as_lists(make())
    loader = make()
    head, state = head_and_state(loader, 3)
    loader.load_state_dict(state)
    assert head + as_lists(loader) == whole
    # ... and the epoch after it is the whole run's second epoch too.
    both = make()
    expected = [as_lists(both), as_lists(both)]
    assert as_lists(loader) == expected[1]
    both.close()
    loader.close()


class Positioned:
    """An iterator over draws from its own generator, seeded when it is made (so re-reading
    the stream gives other samples): only its `state_dict()` can resume it."""

    def __init__(self, count):
        self.count, self.position = count, 0
        self.generator = torch.Generator().manual_seed(time.time_ns() % (1 << 62))

    def __iter__(self):
        return self

    def __next__(self):
        if self.position == self.count:
            raise StopIteration
        self.position += 1
        return int(torch.randint(1 << 30, (), generator=self.generator))

    def state_dict(self):
        return {"position": self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.position = state["position"]
        self.generator.set_state(state["generator"])


class IteratorWithState(torch.utils.data.IterableDataset):
    def __iter__(self):
        return Positioned(10)


@pytest.mark.parametrize(("workers", "mode"), [(0, "thread"), (2, "thread"), (2, "process")])
def test_an_iterators_own_state_resumes_it(workers, mode):
    loader = aload.DataLoader(
        IteratorWithState(), batch_size=3, num_workers=workers, worker_mode=mode
    )
    it = iter(loader)
    head = [next(it).tolist() for _ in range(3)]
    state = saved_and_loaded(loader.state_dict())
    rest = [b.tolist() for b in it]  # the uninterrupted tail
    resumed = aload.DataLoader(
        IteratorWithState(), batch_size=3, num_workers=workers, worker_mode=mode
    )
    resumed.load_state_dict(state)
    assert as_lists(resumed) == rest
    assert len(flatten(head + rest)) == 10 * max(1, workers)


class CountingStream(torch.utils.data.IterableDataset):
    """Counts its passes in the copy its worker holds (a new pass starts at position 0), and
    yields (pass, item) numbers: a resumed worker must go on with its own count."""

    def __init__(self, n):
        self.n, self.passes, self.position = n, 0, 0

    def __iter__(self):
        if self.position == 0:
            self.passes += 1
        info = aload.get_worker_info()
        items = list(range(info.id, self.n, info.num_workers))
        while self.position < len(items):
            self.position += 1
            yield self.passes * 1000 + items[self.position - 1]
        self.position = 0

    def state_dict(self):
        return {"passes": self.passes, "position": self.position}

    def load_state_dict(self, state):
        self.passes, self.position = state["passes"], state["position"]


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_persistent_workers_state_in_their_own_copy_resumes(mode):
    def make():
        return aload.DataLoader(
            CountingStream(24), batch_size=4, num_workers=2, worker_mode=mode,
            persistent_workers=True,
        )  # fmt: skip

    reference = make()
    as_lists(reference)
    second = as_lists(reference)
    reference.close()
    assert second[0][0] // 1000 == 2  # the workers' own copies count passes
    loader = make()
    as_lists(loader)
    head, state = head_and_state(loader, 2)
    loader.close()
    resumed = make()
    resumed.load_state_dict(state)
    assert head + as_lists(resumed) == second
    resumed.close()


class StateAfterIter(torch.utils.data.IterableDataset):
    """Its state exists only once `__iter__` ran."""

    def __iter__(self):
        for self.position in range(10):
            yield self.position

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


@pytest.mark.parametrize(("workers", "mode"), [(0, "thread"), (1, "thread"), (1, "process")])
def test_a_state_that_exists_only_after_iter_is_not_asked_for_before(workers, mode):
    loader = aload.DataLoader(StateAfterIter(), batch_size=4, num_workers=workers, worker_mode=mode)
    assert flatten(as_lists(loader)) == list(range(10))
    assert flatten(as_lists(loader)) == list(range(10))


def test_a_state_of_another_format_is_refused_naming_the_version_that_saved_it():
    loader = aload.DataLoader(Indexed(8), batch_size=2)
    state = saved_and_loaded(loader.state_dict())
    assert state["aload"] == aload.__version__
    state["format"], state["aload"] = 99, "9.9.9"
    with pytest.raises(
        ValueError, match=r"saved by aload 9\.9\.9 in state format 99.*reads formats 1 and 2"
    ):
        loader.load_state_dict(state)
    with pytest.raises(ValueError, match=r"returned by aload's DataLoader\.state_dict"):
        loader.load_state_dict({"epoch": 3})


def test_a_state_saved_in_format_1_still_resumes():
    def make():
        generator = torch.Generator().manual_seed(5)
        return aload.DataLoader(Indexed(30), batch_size=4, shuffle=True, generator=generator)

    whole = as_lists(make())
    head, state = head_and_state(make(), 3)
    (part,) = state["ranks"]
    older = {"format": 1, "aload": "0.4.0", "fingerprint": state["fingerprint"], **part}
    resumed = make()
    resumed.load_state_dict(older)
    assert head + as_lists(resumed) == whole


def dcp_round_trip(loader, fresh, path):
    """Save `loader` with torch.distributed.checkpoint and load the checkpoint into `fresh`,
    as a training job hands its loaders to DCP: the loader itself is the `Stateful`."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # DCP warns that it runs without a process group
        warnings.simplefilter("ignore")
        dcp.save({"loader": loader}, checkpoint_id=str(path))
        dcp.load({"loader": fresh}, checkpoint_id=str(path))


DCP_LOADERS = {
    "shuffled, a generator": lambda: aload.DataLoader(
        Jittery(37), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3)
    ),
    "global RNG, out of order": lambda: aload.DataLoader(
        Jittery(37), batch_size=4, shuffle=True, num_workers=3, in_order=False
    ),
    "a stream with its own state": lambda: aload.DataLoader(
        EpochShuffledStream(40), batch_size=4, num_workers=2
    ),
    "an iterator with its own state, processes": lambda: aload.DataLoader(
        IteratorWithState(), batch_size=3, num_workers=2, worker_mode="process"
    ),
}


@pytest.mark.parametrize("name", list(DCP_LOADERS))
def test_torch_distributed_checkpoint_saves_and_loads_the_loader(name, tmp_path):
    """DCP loads into the keys of the fresh loader's state: they must not depend on how far
    the saved epoch got, or what it saved would be dropped without a word."""
    make = DCP_LOADERS[name]
    loader = make()
    it = iter(loader)
    head = [next(it).tolist() for _ in range(4)]
    fresh = make()
    dcp_round_trip(loader, fresh, tmp_path)
    rest = [batch.tolist() for batch in it]  # the uninterrupted epoch's tail
    tail = as_lists(fresh)
    assert head
    assert rest
    if loader.in_order:
        assert tail == rest
    else:
        assert sorted(flatten(tail)) == sorted(flatten(rest))


class Drawing(torch.utils.data.Dataset):
    """A map-style dataset that draws from its own generator on every read and checkpoints
    it (item i is i * 1000 + a draw): a resumed tail matches only if its state resumes."""

    def __init__(self, n):
        self.n = n
        self.generator = torch.Generator().manual_seed(1)

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return index * 1000 + int(torch.randint(1000, (), generator=self.generator))

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


DRAWING_SETUPS = [(0, "thread", False), (1, "thread", False), (1, "thread", True)]
DRAWING_SETUPS += [(1, "process", False), (1, "process", True)]


@pytest.mark.parametrize(("workers", "mode", "persistent"), DRAWING_SETUPS)
@pytest.mark.parametrize("stop", [0, 3])
def test_a_map_style_datasets_own_state_resumes(workers, mode, persistent, stop):
    def make(loader_class=aload.DataLoader, **extra):
        return loader_class(
            Drawing(30),
            batch_size=4,
            shuffle=True,
            num_workers=workers,
            persistent_workers=persistent,
            generator=torch.Generator().manual_seed(2),
            **extra,
        )

    def two_epochs(loader):
        return [as_lists(loader), as_lists(loader)]

    whole = two_epochs(make(worker_mode=mode))
    if mode == "process" or workers == 0:  # a thread's replica shares the caller's generator
        assert whole == two_epochs(make(torch.utils.data.DataLoader))
    loader = make(worker_mode=mode)
    as_lists(loader)  # the second epoch is saved: persistent copies have drawn in the first
    between = saved_and_loaded(loader.state_dict())
    head, state = take_and_save(loader, stop, settle=0.05)  # workers read ahead of the head
    resumed = make(worker_mode=mode)
    resumed.load_state_dict(state)
    assert as_lists(head) + as_lists(resumed) == whole[1]
    # Persistent workers take a state on the loader they run in, too.
    loader.load_state_dict(state)
    assert as_lists(head) + as_lists(loader) == whole[1]
    resumed = make(worker_mode=mode)  # a state saved between the epochs: the next one whole
    resumed.load_state_dict(between)
    assert as_lists(resumed) == whole[1]


def test_a_dataset_that_is_a_module_is_not_asked_for_its_weights():
    class Embedded(torch.nn.Module, torch.utils.data.Dataset):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(10, 2)

        def __len__(self):
            return 10

        def __getitem__(self, index):
            return index

    loader = aload.DataLoader(Embedded(), batch_size=5)
    head, state = take_and_save(loader, 1)
    assert "table.weight" not in repr(state)
    resumed = aload.DataLoader(Embedded(), batch_size=5)
    resumed.load_state_dict(state)
    assert as_lists(head) + as_lists(resumed) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


class RestartingStream(PassesState, torch.utils.data.IterableDataset):
    """Workers read their own slice, of different sizes; a stream that ended resets its
    position, and counts its passes, so its state after the end says "start a new pass": a
    resume must know the stream ended, and persistent copies must go on counting."""

    def __init__(self, sizes):
        self.sizes, self.position, self.passes = sizes, 0, 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, sizes = (0, [sum(self.sizes)]) if info is None else (info.id, self.sizes)
        start = sum(sizes[:worker])
        while self.position < sizes[worker]:
            self.position += 1
            yield self.passes * 1000 + start + self.position - 1
        self.position = 0
        self.passes += 1


@pytest.mark.parametrize("mode", ["thread", "process"])
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("stop", [0, 3, 5, 9])
def test_a_stream_that_ended_is_not_read_again_and_persistent_copies_go_on(mode, persistent, stop):
    def make():
        return aload.DataLoader(
            RestartingStream([10, 30]),
            batch_size=4,
            num_workers=2,
            worker_mode=mode,
            persistent_workers=persistent,
        )

    loader = make()
    whole = [as_lists(loader) for _ in range(3)]
    if persistent:  # each worker's copy counts its own passes
        assert {i // 1000 for i in flatten(whole[2])} == {2}
    loader = make()
    as_lists(loader)
    between = saved_and_loaded(loader.state_dict())
    head, state = take_and_save(loader, stop)
    resumed = make()
    resumed.load_state_dict(state)
    assert as_lists(head) + as_lists(resumed) == whole[1]
    assert as_lists(resumed) == whole[2]
    resumed = make()
    resumed.load_state_dict(between)
    assert as_lists(resumed) == whole[1]


class GlobalDraws(torch.utils.data.Dataset):
    """Draws from torch's global RNG on each read and checkpoints that RNG as its own state
    (as torchdata's own test datasets do): its reads must resume right after the epoch's draws."""

    def __len__(self):
        return 30

    def __getitem__(self, index):
        return index * 1000 + int(torch.randint(1000, ()))

    def state_dict(self):
        return {"rng": torch.get_rng_state()}

    def load_state_dict(self, state):
        torch.set_rng_state(state["rng"])


class GlobalDrawsStream(torch.utils.data.IterableDataset):
    """The same, for a stream whose iterator holds the state."""

    def __iter__(self):
        return GlobalDrawsIterator()


class GlobalDrawsIterator:
    def __init__(self):
        self.position = 0

    def __next__(self):
        if self.position == 20:
            raise StopIteration
        self.position += 1
        return int(torch.randint(1000, ()))

    def state_dict(self):
        return {"position": self.position, "rng": torch.get_rng_state()}

    def load_state_dict(self, state):
        self.position = state["position"]
        torch.set_rng_state(state["rng"])


def global_draws_loader(kind: str) -> aload.DataLoader:
    if kind == "stream":
        return aload.DataLoader(GlobalDrawsStream(), batch_size=4)
    if kind == "sampler drawing from the global RNG":  # its seed, at the first batch
        return aload.DataLoader(GlobalDraws(), batch_size=4, shuffle=True)
    order = RandomSampler(range(30), generator=torch.Generator().manual_seed(1))
    return aload.DataLoader(GlobalDraws(), batch_size=4, sampler=order)


@pytest.mark.parametrize("kind", ["stream", "own generator", "sampler drawing from the global RNG"])
@pytest.mark.parametrize("stop", [0, 2])
def test_a_single_process_epoch_of_a_dataset_that_checkpoints_the_global_rng_resumes(kind, stop):
    """Its state is taken where its reads start (after the epoch's own draws; for a stream,
    at iter(loader), when torch calls iter(dataset)), so the resumed reads draw the same;
    saved before the first batch, the sampler's draw (torch makes it then) is replayed on
    the RNG the dataset brings back."""
    torch.manual_seed(5)
    loader = global_draws_loader(kind)
    it = iter(loader)
    for _ in range(stop):
        next(it)
    state = loader.state_dict()
    rest = [batch.tolist() for batch in it]
    torch.manual_seed(99)  # the resumed run's RNG is elsewhere: the state brings it back
    resumed = global_draws_loader(kind)
    resumed.load_state_dict(state)
    assert as_lists(resumed) == rest


def test_a_state_loaded_into_running_persistent_workers_is_resumed_by_new_ones():
    """Running workers have drawn from their own RNGs past what the state describes: the
    state is resumed as a fresh loader resumes it."""
    loader = aload.DataLoader(
        GlobalDraws(),
        batch_size=4,
        num_workers=2,
        worker_mode="process",
        persistent_workers=True,
        generator=torch.Generator().manual_seed(4),
    )
    state = saved_and_loaded(loader.state_dict())
    expected = as_lists(loader)
    it = iter(loader)
    next(it)
    loader.load_state_dict(state)
    assert as_lists(loader) == expected


@pytest.mark.parametrize("dataset", [ProcessDraws, ProcessDrawsByIndex])
def test_persistent_worker_processes_rngs_resume_with_a_state_saved_between_epochs(dataset):
    """A persistent worker process draws its next epoch from where its RNGs stood after the
    last: the resumed loader's new workers start from there too."""
    assert_worker_rngs_resume_between_epochs(
        lambda: aload.DataLoader(
            dataset(),
            batch_size=2,
            num_workers=2,
            worker_mode="process",
            persistent_workers=True,
            generator=torch.Generator().manual_seed(3),
            shuffle=None if dataset is ProcessDraws else True,
        )
    )
