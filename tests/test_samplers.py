"""The fast path for torch's default samplers draws exactly what torch's samplers draw, at the
same points of the iteration: same batches, same generator (and global RNG) state after each."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.utils.data as tud
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler, TensorDataset

import aload
from aload._samplers import fast_index_batches

SIZES = [1, 7, 16, 50]
CUTS = [(1, False), (4, False), (4, True), (16, True), (64, False), (64, True)]


def interleaved(batches, generator):
    """Each batch, with a draw from `generator` after it: the draw shows when the sampler
    drew (before or after that point), not only what."""
    return [(list(batch), torch.randint(1 << 30, (1,), generator=generator).item())
            for batch in batches]  # fmt: skip


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize(("batch_size", "drop_last"), CUTS)
@pytest.mark.parametrize("num_samples", [None, 3, 50, 100, 123])
def test_random_batches_and_draws_match_torchs(n, batch_size, drop_last, num_samples):
    def run(fast):
        generator = torch.Generator().manual_seed(n * 1000 + batch_size)
        sampler = RandomSampler(range(n), num_samples=num_samples, generator=generator)
        batches = BatchSampler(sampler, batch_size, drop_last)
        source = fast_index_batches(batches, as_tensors=fast == "tensors") if fast else batches
        assert source is not None
        got = interleaved(source, generator)
        return got, generator.get_state()

    theirs, their_state = run(None)
    for fast in ("tensors", "lists"):
        ours, our_state = run(fast)
        assert ours == theirs
        assert torch.equal(our_state, their_state)


@pytest.mark.parametrize(("batch_size", "drop_last"), CUTS)
@pytest.mark.parametrize("num_samples", [None, 100, 123])
def test_global_rng_and_sequential_batches_match_torchs(batch_size, drop_last, num_samples):
    # Without a generator, torch's last (possibly empty) permutation comes from a private
    # generator: skipping it must change neither the batches nor the global RNG.
    for make in (
        lambda: RandomSampler(range(50), num_samples=num_samples),
        lambda: SequentialSampler(range(50)),
    ):
        torch.manual_seed(3)
        theirs = [list(b) for b in BatchSampler(make(), batch_size, drop_last)]
        their_next = torch.rand(1).item()
        torch.manual_seed(3)
        fast = fast_index_batches(BatchSampler(make(), batch_size, drop_last), as_tensors=True)
        assert fast is not None
        assert [b.tolist() for b in fast] == theirs
        assert torch.rand(1).item() == their_next


def test_other_samplers_keep_their_own_iteration():
    class Reversed(SequentialSampler):
        def __iter__(self):
            return reversed(range(len(self.data_source)))

    class MyBatches(BatchSampler):
        def __iter__(self):
            yield [0]

    data = range(10)
    assert fast_index_batches(BatchSampler(Reversed(data), 2, False), True) is None
    assert fast_index_batches(MyBatches(SequentialSampler(data), 2, False), True) is None
    assert fast_index_batches(BatchSampler(RandomSampler(data, True), 2, False), True) is None
    assert fast_index_batches(RandomSampler(data), True) is None  # unbatched
    loader = aload.DataLoader(TensorDataset(torch.arange(10)), sampler=Reversed(data), batch_size=4)
    assert [b[0].tolist() for b in loader] == [[9, 8, 7, 6], [5, 4, 3, 2], [1, 0]]


class Items(tud.Dataset):
    """Read item by item (no gather): its indices arrive as Python ints, as in torch."""

    def __len__(self):
        return 40

    def __getitem__(self, index):
        assert type(index) is int
        return index


@pytest.mark.parametrize("dataset", [TensorDataset(torch.arange(40)), Items()],
                         ids=["gathered", "per-item"])  # fmt: skip
@pytest.mark.parametrize("kwargs", [
    {"num_workers": 0},
    {"num_workers": 2},
    {"num_workers": 2, "worker_mode": "process"},
    {"num_workers": 0, "drop_last": True, "batch_size": 6},
])  # fmt: skip
def test_loader_over_default_samplers_gives_torchs_batches(dataset, kwargs):
    kwargs = {"batch_size": 8, **kwargs}
    torch_kwargs = {k: v for k, v in kwargs.items() if k != "worker_mode"}

    def run(cls, **kw):
        generator = torch.Generator().manual_seed(11)
        sampler = RandomSampler(dataset, num_samples=57, generator=generator)
        loader = cls(dataset, sampler=sampler, generator=generator, **kw)
        epochs = [[torch.as_tensor(b[0] if isinstance(b, list) else b).tolist() for b in loader]
                  for _ in range(2)]  # fmt: skip
        return epochs, generator.get_state()

    (ours, our_state), (theirs, their_state) = (
        run(aload.DataLoader, **kwargs),
        run(tud.DataLoader, **torch_kwargs),
    )
    assert ours == theirs
    assert torch.equal(our_state, their_state)


def test_negative_indices_from_a_sampler_read_as_torch_reads_them():
    data = TensorDataset(torch.arange(10), torch.arange(10) * 2)
    sampler = [[-1, 0], [-10, 9]]
    ours = [[t.tolist() for t in b] for b in aload.DataLoader(data, batch_sampler=sampler)]
    theirs = [[t.tolist() for t in b] for b in tud.DataLoader(data, batch_sampler=sampler)]
    assert ours == theirs
    with pytest.raises(IndexError):
        list(aload.DataLoader(data, batch_sampler=[[10]]))


def test_batch_spanning_two_permutations_is_cut_like_torchs():
    generator = torch.Generator().manual_seed(0)
    sampler = RandomSampler(range(5), num_samples=12, generator=generator)
    fast = fast_index_batches(BatchSampler(sampler, 4, False), as_tensors=True)
    assert fast is not None
    batches = [b.tolist() for b in fast]
    assert [len(b) for b in batches] == [4, 4, 4]
    flat = list(itertools.chain(*batches))
    assert sorted(flat[:5]) == sorted(flat[5:10]) == list(range(5))
