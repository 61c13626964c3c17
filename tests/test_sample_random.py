"""`aload.sample_random()`: a sample's randomness depends on the seed, the epoch and its
index, not on which worker read it or when: the same augmented epoch for any worker count,
worker mode, order, and after resume."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
import torch
from conftest import heartbeat, take_and_save
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

import aload

N = 24


class Augmented(Dataset):
    """Each item is its index and three draws from its own generators (torch, numpy, random)."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, index: int) -> torch.Tensor:
        random = aload.sample_random()
        again = aload.sample_random()  # the same generators for the whole read
        assert again is random
        return torch.tensor(
            [
                index,
                torch.rand((), generator=random.torch_generator).item(),
                random.numpy_rng.random(),
                again.rng.random(),
            ],
            dtype=torch.float64,
        )


class AsyncAugmented(Augmented):
    """The same draws from an async `__getitem__` (read on aload's loop)."""

    async def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        await anyio.lowlevel.checkpoint()
        return Augmented.__getitem__(self, index)


def jitter(sample: torch.Tensor) -> torch.Tensor:
    """A transform that draws too (it sees the same sample's generators)."""
    return sample + torch.rand((), generator=aload.sample_random().torch_generator).item() * 1e-3


def batch_noise(samples: list[torch.Tensor]) -> torch.Tensor:
    """A collate_fn that draws one number for the whole batch, from the batch's generators."""
    batch = torch.stack(samples)
    noise = aload.sample_random().numpy_rng.random()
    return torch.cat([batch, torch.full((len(samples), 1), noise, dtype=batch.dtype)], dim=1)


def by_index(batches: list[torch.Tensor]) -> dict[int, list[float]]:
    rows = torch.cat(batches)
    return {int(row[0]): row[1:].tolist() for row in rows}


def epochs(seed: int, epochs: int = 1, dataset: Dataset | None = None, **kwargs) -> list:
    torch.manual_seed(seed)
    loader = aload.DataLoader(dataset or Augmented(), batch_size=4, shuffle=True, **kwargs)
    return [[b.clone() for b in loader] for _ in range(epochs)]


def test_the_same_seed_gives_the_same_samples_for_any_worker_count_and_mode():
    reference = by_index(epochs(7)[0])
    assert len(reference) == N
    draws = [tuple(values) for values in reference.values()]
    assert len(set(draws)) == N  # every sample its own draws
    for kwargs in (
        {"num_workers": 1},
        {"num_workers": 3},
        {"num_workers": 3, "in_order": False},
        {"num_workers": 2, "worker_mode": "process"},
        {"num_workers": 2, "persistent_workers": True},
        {"num_workers": 2, "worker_mode": "process", "persistent_workers": True},
    ):
        assert by_index(epochs(7, **kwargs)[0]) == reference, kwargs


def test_another_seed_or_epoch_draws_afresh_and_the_loader_generator_counts():
    first, second = epochs(7, epochs=2)
    assert by_index(first) != by_index(second)
    assert by_index(epochs(8)[0]) != by_index(first)
    # A loader generator (not the global RNG) decides it, as it decides the order.
    made = [
        by_index(
            [b for b in aload.DataLoader(Augmented(), batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(3))]
        )
        for _ in range(2)
    ]  # fmt: skip
    assert made[0] == made[1]


def test_transforms_and_collate_draw_from_the_sample_and_the_batch():
    def run(**kwargs):
        torch.manual_seed(5)
        loader = aload.DataLoader(
            Augmented(),
            batch_size=4,
            shuffle=True,
            transform=jitter,
            collate_fn=batch_noise,
            **kwargs,
        )
        return sorted((b[:, 0].tolist(), b[:, 1:].tolist()) for b in loader)

    reference = run()
    assert run(num_workers=3) == reference
    assert run(num_workers=2, worker_mode="process") == reference
    batch_noises = [rows[0][-1] for _, rows in reference]
    assert len(set(batch_noises)) == len(reference)  # one draw per batch, each its own


@pytest.mark.anyio
async def test_an_async_dataset_draws_as_the_same_dataset_read_by_threads(anyio_backend):
    torch.manual_seed(11)
    loader = aload.DataLoader(AsyncAugmented(), batch_size=4, shuffle=True, num_workers=2)
    async with heartbeat() as beat:
        read = [[b async for b in loader] for _ in range(2)]
    assert beat.longest_gap < 0.5
    expected = epochs(11, epochs=2, num_workers=2)
    assert [by_index(e) for e in read] == [by_index(e) for e in expected]
    assert by_index(read[0]) != by_index(read[1])


@settings(max_examples=12, deadline=None)
@given(
    stop=st.integers(1, N // 4 - 1),
    workers=st.integers(0, 2),
    in_order=st.booleans(),
    process=st.booleans(),
)
def test_a_resumed_epoch_draws_what_the_whole_epoch_drew(stop, workers, in_order, process):
    def make():
        mode = "process" if process and workers else "thread"
        return aload.DataLoader(
            Augmented(),
            batch_size=4,
            shuffle=True,
            num_workers=workers,
            worker_mode=mode,
            in_order=in_order,
            generator=torch.Generator().manual_seed(stop),
        )

    whole = by_index(list(make()))
    head, state = take_and_save(make(), stop)
    resumed = make()
    resumed.load_state_dict(state)
    assert by_index(head + list(resumed)) == whole


def test_outside_a_loader_read_it_says_where_it_works():
    with pytest.raises(RuntimeError, match="while an aload DataLoader reads a sample"):
        aload.sample_random()
    with pytest.raises(RuntimeError, match="while an aload DataLoader reads a sample"):
        Augmented()[0]


def test_an_iterable_datasets_samples_have_no_index_to_seed_from():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield aload.sample_random()

    with pytest.raises(RuntimeError, match="map-style") as raised:
        list(aload.DataLoader(Stream(), batch_size=None))
    assert any("aload: raised while loading" in note for note in raised.value.__notes__)


def test_a_skipped_sample_leaves_each_other_sample_its_own_generators():
    class Flaky(Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, index):
            if index == 5:
                raise ValueError("unreadable")
            return index, aload.sample_random().seed

    def transform(sample):
        index, seed = sample
        assert aload.sample_random().seed == seed, f"sample {index} got another's generators"
        return index

    loader = aload.DataLoader(
        Flaky(), batch_size=4, sampler=[4, 5, 4, 6, 0, 1, 2, 3], transform=transform,
        max_skipped=1,
    )  # fmt: skip
    assert [b.tolist() for b in loader] == [[4, 4, 6], [0, 1, 2, 3]]
