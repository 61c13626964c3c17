"""Which samples arrive, in which order, from every kind of dataset and sampler."""

from __future__ import annotations

import collections
import itertools
import time

import numpy as np
import pytest
import torch
import torch.utils.data as tud
from conftest import Indexed, Shards, flatten
from torch.utils.data import (
    BatchSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
    WeightedRandomSampler,
)

import aload


async def collect_async(loader):
    return [batch async for batch in loader]


@pytest.mark.parametrize("num_workers", [0, 1, 3])
@pytest.mark.parametrize("in_order", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_sample_exactly_once_per_epoch(num_workers, in_order, drop_last, shuffle):
    n, batch_size = 103, 10
    loader = aload.DataLoader(
        Indexed(n),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        in_order=in_order,
    )
    expected = n // batch_size * batch_size if drop_last else n
    for _epoch in range(2):
        seen = flatten(list(loader))
        assert len(seen) == expected
        assert len(set(seen)) == expected
        assert set(seen) <= set(range(n))


@pytest.mark.asyncio
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("in_order", [True, False])
async def test_async_for_gives_every_sample_exactly_once(num_workers, in_order):
    loader = aload.DataLoader(
        Indexed(57), batch_size=4, shuffle=True, num_workers=num_workers, in_order=in_order
    )
    for _epoch in range(2):
        assert sorted(flatten(await collect_async(loader))) == list(range(57))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_seeded_generator_gives_torchs_batches_every_epoch(num_workers):
    ours = aload.DataLoader(
        Indexed(50),
        batch_size=7,
        shuffle=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(3),
    )
    theirs = tud.DataLoader(
        Indexed(50), batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    for _epoch in range(3):
        assert [b.tolist() for b in ours] == [b.tolist() for b in theirs]


def test_each_epoch_is_a_new_shuffle():
    loader = aload.DataLoader(Indexed(64), batch_size=8, shuffle=True, num_workers=2)
    first, second = flatten(list(loader)), flatten(list(loader))
    assert sorted(first) == sorted(second) == list(range(64))
    assert first != second


@pytest.mark.parametrize("num_workers", [0, 3])
def test_in_order_keeps_sampler_order_when_batches_finish_out_of_order(num_workers):
    class SlowFirst(Indexed):
        def __getitem__(self, index):
            if index == 0:
                import time

                time.sleep(0.1)
            return index

    loader = aload.DataLoader(SlowFirst(40), batch_size=4, num_workers=num_workers)
    assert flatten(list(loader)) == list(range(40))


def test_in_order_false_lets_fast_batches_pass_a_slow_one():
    class SlowFirst(Indexed):
        def __getitem__(self, index):
            if index == 0:
                import time

                time.sleep(0.3)
            return index

    loader = aload.DataLoader(SlowFirst(40), batch_size=4, num_workers=3, in_order=False)
    batches = [b.tolist() for b in loader]
    assert batches[0] != [0, 1, 2, 3]
    assert sorted(flatten(batches)) == list(range(40))


def test_plain_list_is_a_map_style_dataset():
    assert [b.tolist() for b in aload.DataLoader([10, 20, 30], batch_size=2)] == [[10, 20], [30]]


def test_getitems_is_used_once_per_batch_instead_of_getitem():
    class Batched(Indexed):
        def __init__(self, n):
            super().__init__(n)
            self.calls = []

        def __getitems__(self, indices):
            self.calls.append(list(indices))
            return [i * 10 for i in indices]

    ds = Batched(10)
    batches = [b.tolist() for b in aload.DataLoader(ds, batch_size=4, num_workers=2)]
    assert batches == [[0, 10, 20, 30], [40, 50, 60, 70], [80, 90]]
    assert sorted(ds.calls) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert ds.reads == 0


def torch_and_aload_batches(dataset, **kwargs):
    theirs = tud.DataLoader(dataset, generator=torch.Generator().manual_seed(0), **kwargs)
    ours = aload.DataLoader(
        dataset, generator=torch.Generator().manual_seed(0), num_workers=2, **kwargs
    )
    return list(theirs), list(ours)


def assert_same_batches(theirs, ours):
    assert len(theirs) == len(ours)
    for a, b in zip(theirs, ours, strict=True):
        for x, y in zip(
            a if isinstance(a, list) else [a], b if isinstance(b, list) else [b], strict=True
        ):
            assert x.dtype == y.dtype
            assert x.shape == y.shape
            assert torch.equal(x, y)


@pytest.mark.parametrize(
    "dataset",
    [
        TensorDataset(torch.randn(100, 3), torch.randint(0, 5, (100,))),
        TensorDataset(torch.arange(100)),
        torch.randn(100, 4, 2),
        torch.arange(100),
        np.random.default_rng(0).random((100, 6)).astype(np.float32),
        np.arange(300).reshape(100, 3),
        np.random.default_rng(0).random((100, 2)) > 0.5,
        Subset(TensorDataset(torch.randn(200, 3)), list(range(0, 200, 2))),
    ],
    ids=[
        "tensors",
        "one-tensor",
        "3d-tensor",
        "1d-tensor",
        "f32-array",
        "int-array",
        "bool-array",
        "subset",
    ],
)
def test_in_memory_tensors_and_arrays_give_the_batches_torch_gives(dataset):
    theirs, ours = torch_and_aload_batches(dataset, batch_size=16, shuffle=True)
    assert_same_batches(theirs, ours)


def test_tensor_dataset_subclass_with_its_own_getitem_is_read_item_by_item():
    class Doubled(TensorDataset):
        def __getitem__(self, index):
            return tuple(t[index] * 2 for t in self.tensors)

    ds = Doubled(torch.arange(20))
    assert flatten([b[0] for b in aload.DataLoader(ds, batch_size=8)]) == list(range(0, 40, 2))


def test_default_collate_handles_nested_structures_like_torch():
    Point = collections.namedtuple("Point", "x y")

    class Rich(Indexed):
        def __getitem__(self, i):
            return {
                "point": Point(i, float(i)),
                "pair": (np.array([i, i]), torch.tensor([i])),
                "name": f"item{i}",
            }

    theirs = list(tud.DataLoader(Rich(6), batch_size=4))
    ours = list(aload.DataLoader(Rich(6), batch_size=4, num_workers=2))
    for a, b in zip(theirs, ours, strict=True):
        assert isinstance(b["point"], Point)
        assert torch.equal(a["point"].x, b["point"].x)
        assert torch.equal(a["point"].y, b["point"].y)
        assert all(torch.equal(p, q) for p, q in zip(a["pair"], b["pair"], strict=True))
        assert a["name"] == b["name"]


def test_batch_size_none_yields_converted_samples():
    ds = [np.array([1, 2]), np.array([3, 4])]
    out = list(aload.DataLoader(ds, batch_size=None, num_workers=1))
    assert [o.tolist() for o in out] == [[1, 2], [3, 4]]
    assert all(isinstance(o, torch.Tensor) for o in out)


def test_custom_batch_sampler_decides_the_batches():
    sampler = BatchSampler(SequentialSampler(range(10)), batch_size=3, drop_last=True)
    loader = aload.DataLoader(Indexed(10), batch_sampler=sampler, num_workers=2)
    assert [b.tolist() for b in loader] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_weighted_random_sampler_draws_what_the_sampler_draws():
    weights = [0.01] * 90 + [1.0] * 10

    def sampler():
        return WeightedRandomSampler(
            weights, num_samples=500, replacement=True, generator=torch.Generator().manual_seed(1)
        )

    loader = aload.DataLoader(Indexed(100), batch_size=32, sampler=sampler(), num_workers=2)
    seen = flatten(list(loader))
    assert seen == list(sampler())
    rare = sum(1 for i in seen if i < 90)
    assert rare < 100


def test_iterable_dataset_shards_by_worker_and_batches_round_robin_like_torch():
    batches = [b.tolist() for b in aload.DataLoader(Shards(20), batch_size=3, num_workers=2)]
    assert batches == [
        [0, 2, 4],
        [1, 3, 5],
        [6, 8, 10],
        [7, 9, 11],
        [12, 14, 16],
        [13, 15, 17],
        [18],
        [19],
    ]


@pytest.mark.parametrize("num_workers", [0, 1, 3])
@pytest.mark.parametrize("in_order", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_iterable_dataset_gives_every_sample_once(num_workers, in_order, drop_last):
    loader = aload.DataLoader(
        Shards(50), batch_size=4, num_workers=num_workers, in_order=in_order, drop_last=drop_last
    )
    seen = flatten(list(loader))
    assert len(seen) == len(set(seen))
    if drop_last:
        per_worker = [len(range(w, 50, max(1, num_workers))) for w in range(max(1, num_workers))]
        assert len(seen) == sum(n // 4 * 4 for n in per_worker)
    else:
        assert sorted(seen) == list(range(50))


def test_one_shot_iterator_is_shared_by_workers_without_loss_or_duplicates():
    loader = aload.DataLoader((i for i in range(100)), batch_size=7, num_workers=3)
    assert sorted(flatten(list(loader))) == list(range(100))


def test_plain_reiterable_object_is_an_iterable_dataset():
    class Lines:
        def __iter__(self):
            return iter(["a", "b", "c"])

    loader = aload.DataLoader(Lines(), batch_size=2)
    assert list(loader) == [["a", "b"], ["c"]]
    assert list(loader) == [["a", "b"], ["c"]]


def test_iterable_dataset_without_batching_yields_single_samples():
    loader = aload.DataLoader(Shards(5), batch_size=None, num_workers=1)
    assert [int(x) for x in loader] == [0, 1, 2, 3, 4]


def test_batches_stay_bounded_with_a_slow_consumer():
    ds = Indexed(100)
    loader = aload.DataLoader(ds, batch_size=1, num_workers=2, prefetch_factor=3)
    it = iter(loader)
    next(it)
    time.sleep(0.3)
    assert ds.reads == 1 + 2 * 3
    it.close()


def test_num_workers_zero_loads_on_demand_in_the_calling_thread():
    import threading

    threads = []

    class Where(Indexed):
        def __getitem__(self, index):
            threads.append(threading.current_thread())
            return index

    ds = Where(6)
    it = iter(aload.DataLoader(ds, batch_size=2))
    assert next(it).tolist() == [0, 1]
    assert len(threads) == 2
    assert set(threads) == {threading.current_thread()}
    assert [b.tolist() for b in it] == [[2, 3], [4, 5]]


def test_loaders_epochs_can_interleave_with_itertools():
    loader = aload.DataLoader(Indexed(9), batch_size=3, num_workers=2)
    pairs = list(itertools.islice(zip(loader, loader, strict=True), 2))
    assert [a.tolist() for a, _ in pairs] == [[0, 1, 2], [3, 4, 5]]


def test_small_in_memory_batches_keep_a_worker_init_fn_and_torchs_batches():
    """Batches gathered from memory in a few KiB are read on the consumer's thread, where a
    worker thread would cost more than the read; a `worker_init_fn` still gets its workers,
    and the batches are torch's either way."""
    data = TensorDataset(torch.arange(64.0))
    started = []

    def make(cls, **kwargs):
        torch.manual_seed(1)
        loader = cls(data, batch_size=8, shuffle=True, num_workers=2, **kwargs)
        return [b[0].tolist() for b in loader]

    assert make(aload.DataLoader) == make(tud.DataLoader)
    assert make(aload.DataLoader, worker_init_fn=started.append) == make(
        torch.utils.data.DataLoader
    )
    assert sorted(started) == [0, 1]


def test_a_bad_index_in_a_small_in_memory_batch_raises_torchs_error_and_the_epoch_goes_on():
    """Read on the consumer's thread, a batch with an index out of range raises what torch's
    loader raises, naming the batch's indices; the batches after it still come."""
    data = TensorDataset(torch.arange(10.0))
    order = [0, 1, 2, 99, 3, 4]
    with pytest.raises(IndexError) as theirs:
        list(tud.DataLoader(data, sampler=order, batch_size=2))
    loader = aload.DataLoader(data, sampler=order, batch_size=2, num_workers=2)
    assert loader._engine._gathers_in_place  # the path under test
    it = iter(loader)
    assert next(it)[0].tolist() == [0.0, 1.0]
    with pytest.raises(type(theirs.value)) as ours:
        next(it)
    assert "indices [2, 99]" in str(ours.value.__notes__)
    assert next(it)[0].tolist() == [3.0, 4.0]
    with pytest.raises(StopIteration):
        next(it)
