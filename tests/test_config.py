"""Arguments are checked as torch checks them, with torch's errors."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.utils.data as tud
from torch.utils.data import BatchSampler, IterableDataset, SequentialSampler, TensorDataset

import aload


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(10))


MAP = list(range(10))
SAMPLER = SequentialSampler(MAP)

SAME_ERRORS_AS_TORCH = [
    {"dataset": MAP, "num_workers": -1},
    {"dataset": MAP, "timeout": -1},
    {"dataset": MAP, "persistent_workers": True},
    {"dataset": MAP, "shuffle": True, "sampler": SAMPLER},
    {"dataset": MAP, "batch_sampler": BatchSampler(SAMPLER, 2, False), "batch_size": 4},
    {"dataset": MAP, "batch_sampler": BatchSampler(SAMPLER, 2, False), "shuffle": True},
    {"dataset": MAP, "batch_sampler": BatchSampler(SAMPLER, 2, False), "sampler": SAMPLER},
    {"dataset": MAP, "batch_sampler": BatchSampler(SAMPLER, 2, False), "drop_last": True},
    {"dataset": MAP, "batch_size": None, "drop_last": True},
    {"dataset": MAP, "batch_size": 0},
    {"dataset": Stream(), "shuffle": True},
    {"dataset": Stream(), "sampler": SAMPLER},
    {"dataset": Stream(), "batch_sampler": BatchSampler(SAMPLER, 2, False)},
]


@pytest.mark.parametrize("kwargs", SAME_ERRORS_AS_TORCH)
def test_conflicting_or_bad_arguments_raise_torchs_value_error(kwargs):
    with pytest.raises(ValueError) as theirs:  # noqa: PT011 - the message is compared below
        tud.DataLoader(**kwargs)
    with pytest.raises(ValueError) as ours:  # noqa: PT011
        aload.DataLoader(**kwargs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"prefetch_factor": 0}, ValueError, "prefetch_factor"),
        ({"worker_mode": "fibers"}, ValueError, "worker_mode"),
        ({"num_workers": 2.5}, TypeError, "num_workers"),
        ({"batch_size": "32"}, ValueError, "batch_size"),
        ({"drop_last": "no"}, ValueError, "drop_last"),
        ({"pin_memory": "no"}, TypeError, "pin_memory"),
        ({"in_order": "no"}, TypeError, "in_order"),
        ({"persistent_workers": "no", "num_workers": 1}, TypeError, "persistent_workers"),
        ({"timeout": float("nan")}, ValueError, "timeout"),
        ({"sampler": 5}, TypeError, "sampler"),
        ({"batch_sampler": 5}, TypeError, "batch_sampler"),
        ({"timeout": "1"}, TypeError, "timeout"),
        ({"shuffle": "yes"}, TypeError, "shuffle"),
        ({"collate_fn": 3}, TypeError, "collate_fn"),
        ({"worker_init_fn": "init"}, TypeError, "worker_init_fn"),
        ({"generator": 42}, TypeError, "generator"),
        ({"transform": 3}, TypeError, "transform"),
        ({"retry": 3}, TypeError, "retry"),
        ({"max_skipped": -1}, ValueError, "max_skipped"),
        ({"max_concurrency": 0}, ValueError, "max_concurrency"),
    ],
)
def test_bad_argument_error_names_the_argument(kwargs, error, names):
    with pytest.raises(error, match=names):
        aload.DataLoader(MAP, **kwargs)


def test_dataset_that_is_neither_map_style_nor_iterable_is_rejected():
    with pytest.raises(TypeError, match="dataset must be map-style"):
        aload.DataLoader(42)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 3},
        {"batch_size": 3, "drop_last": True},
        {"batch_size": None},
        {"batch_size": 4, "shuffle": True},
        {"batch_sampler": BatchSampler(SequentialSampler(range(10)), 4, True)},
    ],
)
def test_len_matches_torch_for_map_style(kwargs):
    assert len(aload.DataLoader(MAP, **kwargs)) == len(tud.DataLoader(MAP, **kwargs))


class SizedStream(IterableDataset):
    def __iter__(self):
        return iter(range(10))

    def __len__(self):
        return 10


@pytest.mark.parametrize(
    "kwargs", [{"batch_size": 3}, {"batch_size": 3, "drop_last": True}, {"batch_size": None}]
)
def test_len_matches_torch_for_iterable_datasets(kwargs):
    ds = SizedStream()
    assert len(aload.DataLoader(ds, **kwargs)) == len(tud.DataLoader(ds, **kwargs))


def _collate(batch):
    return batch


def _init(worker_id):
    pass


def _unchanged(sample):
    return sample


def test_every_argument_reads_back_from_its_attribute_as_in_torch():
    """Each argument given (none at its default) is what the loader's attribute of that name
    says: torch's as torch's loader says it, aload's own as given."""
    data = TensorDataset(torch.zeros(8, 2))
    torchs = {
        "batch_size": 4,
        "num_workers": 2,
        "collate_fn": _collate,
        "pin_memory": True,
        "drop_last": True,
        "timeout": 5.0,
        "worker_init_fn": _init,
        "multiprocessing_context": "spawn",
        "generator": torch.Generator(),
        "prefetch_factor": 3,
        "persistent_workers": True,
        "in_order": False,
        "pin_memory_device": "cpu",
    }
    ours_only = {
        "worker_mode": "process",
        "transform": _unchanged,
        "batch_transform": _unchanged,
        "retry": aload.Retry(attempts=2),
        "max_skipped": 1,
        "max_concurrency": 8,
        "device": torch.device("cpu"),
        "memory_budget": 1 << 20,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pinning without CUDA
        ours = aload.DataLoader(data, **torchs, **ours_only)
        theirs = tud.DataLoader(data, **torchs)
    for name in torchs:
        mine, its = getattr(ours, name), getattr(theirs, name)
        if name == "multiprocessing_context":
            mine, its = mine.get_start_method(), its.get_start_method()
        assert mine == its, name
    for name, given in ours_only.items():
        assert getattr(ours, name) == given, name
    # Every argument is covered: those above, and those read back otherwise (the dataset and
    # the samplers, below and in the tests of setting them) or not attributes in torch either.
    elsewhere = {"dataset", "shuffle", "sampler", "batch_sampler", "progress", "distributed"}
    elsewhere |= {"to_device", "device_transform", "ray_options"}
    signature = inspect.signature(aload.DataLoader).parameters
    assert set(signature) == set(torchs) | set(ours_only) | elsewhere


def test_torch_attributes_are_readable():
    ds = TensorDataset(torch.zeros(8, 2))
    loader = aload.DataLoader(ds, batch_size=4, num_workers=2, drop_last=True)
    assert (loader.dataset, loader.batch_size, loader.num_workers, loader.drop_last) == (
        ds,
        4,
        2,
        True,
    )
    assert isinstance(loader.batch_sampler, BatchSampler)
