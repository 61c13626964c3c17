"""A dataset on its way to Ray's object store with its tensors' bytes out of band.

`ray.put` pickles a torch tensor in band: torch copies its storage into the pickle with the
GIL held, in pieces of 10-15 ms for a 16 MB tensor on a 2-core machine (and 3-4x that while
the actors import torch on the same cores), which pauses the caller's event loop although the
put runs on another thread. A numpy array Ray keeps out of band: it copies the bytes into the
store without the GIL. `OutOfBand` gives Ray the dataset's tensors as numpy views of their
storages; the actor rebuilds each storage once, as a private copy (what torch's own pickling
gives), and each tensor over it, sharing storages as they were shared.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import torch


def _storage(data: np.ndarray) -> torch.Tensor:
    """A private, writable copy of a storage's bytes (the store's are read-only)."""
    return torch.from_numpy(data.copy())


def _tensor(
    storage: torch.Tensor,
    dtype: torch.dtype,
    offset: int,
    size: torch.Size,
    stride: tuple[int, ...],
) -> torch.Tensor:
    return torch.empty(0, dtype=dtype).set_(storage.untyped_storage(), offset, size, stride)


class _Storage:
    """One storage's bytes, pickled once however many tensors view it (pickle's memo)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return _storage, (self.data,)


def _travels_out_of_band(value: Any) -> bool:
    """Plain dense CPU tensors; the rest (parameters, grads, GPU, sparse, quantized, lazy
    conjugates) pickle as torch pickles them."""
    return (
        type(value) is torch.Tensor
        and value.device.type == "cpu"
        and value.layout == torch.strided
        and not value.requires_grad
        and not value.is_quantized
        and not value.is_conj()
        and not value.is_neg()
    )


def _unpack(data: bytes, buffers: list[np.ndarray]) -> Any:
    return pickle.loads(data, buffers=buffers)


class OutOfBand:
    """Wraps what goes to Ray's object store; it arrives as the object itself."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        # Runs inside Ray's own pickling, on its thread: object refs and actor handles in the
        # dataset are counted by Ray's reducers as in a plain put (they are in the dispatch
        # table of Ray's pickler, which this one extends).
        from ray import cloudpickle

        storages: dict[int, _Storage] = {}

        class _Pickler(cloudpickle.CloudPickler):
            def reducer_override(self, value: Any) -> Any:
                if not _travels_out_of_band(value):
                    return super().reducer_override(value)
                storage = value.untyped_storage()
                key = storage.data_ptr()
                held = storages.get(key) if key else None
                if held is None:
                    held = _Storage(torch.empty(0, dtype=torch.uint8).set_(storage).numpy())
                    if key:
                        storages[key] = held
                return _tensor, (
                    held,
                    value.dtype,
                    value.storage_offset(),
                    value.size(),
                    value.stride(),
                )

        buffers: list[pickle.PickleBuffer] = []
        out = io.BytesIO()
        _Pickler(out, protocol=5, buffer_callback=buffers.append).dump(self.value)
        # As numpy arrays, which Ray copies out of band (a memoryview it would copy in band).
        arrays = [np.frombuffer(buffer.raw(), dtype=np.uint8) for buffer in buffers]
        return _unpack, (out.getvalue(), arrays)
