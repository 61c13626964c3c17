"""`pin_memory=True`: pinned batches with CUDA, a warning and plain batches without."""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

import aload

Pair = collections.namedtuple("Pair", "x y")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_pin_memory_warns_once_and_loads_normally():
    with pytest.warns(UserWarning, match="pin_memory=True but no CUDA device") as warned:
        loader = aload.DataLoader(
            TensorDataset(torch.arange(10)), batch_size=4, pin_memory=True, num_workers=2
        )
    assert len(warned) == 1
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        for _epoch in range(2):
            assert [b[0].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert later == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs a CUDA device")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_come_back_pinned_through_nested_structures(num_workers):
    class Nested(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"pair": Pair(torch.full((3,), i), torch.tensor(i)), "name": str(i)}

    loader = aload.DataLoader(Nested(), batch_size=4, pin_memory=True, num_workers=num_workers)
    for batch in loader:
        assert isinstance(batch["pair"], Pair)
        assert batch["pair"].x.is_pinned()
        assert batch["pair"].y.is_pinned()
        assert batch["name"] == [str(i) for i in batch["pair"].y.tolist()]
