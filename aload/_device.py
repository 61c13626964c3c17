"""The device stage: batches copied to the GPU on a side stream, ahead of the loop body.

A batch is copied with `non_blocking=True` on a copy stream that the stage owns, from the
pinned memory the workers left it in. An event recorded after the copy (and after any
`device_transform`, which runs on the same stream) is what the consumer's current stream
waits for when the batch is handed over; each of the batch's tensors is then marked as used by
that stream (`record_stream`), so the caching allocator does not give its memory to a later
copy while the step still reads it. Issuing and handing over run on the consumer's thread and
only enqueue work: neither blocks it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

ToDevice = Callable[[Any, torch.device], Any]


def resolve_device(device: str | int | torch.device | None) -> torch.device | None:
    """The device batches are delivered on (None: where the workers made them).

    Raises:
        TypeError: for a device that is not a str, int or torch.device.
        ValueError: for a name torch does not know, or a CUDA device this machine lacks.
    """
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, str | int | torch.device):
        raise TypeError(
            f"device must be a str, an int or a torch.device, got {type(device).__name__}"
        )
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device={device!r} is not a device torch knows: {error}") from None
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        raise ValueError(
            f"device={str(resolved)!r} needs CUDA, but torch.cuda.is_available() is False "
            "on this machine; leave device=None (or 'cpu') to keep batches on the CPU"
        )
    index = torch.cuda.current_device() if resolved.index is None else resolved.index
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"device={str(resolved)!r}, but this machine has {torch.cuda.device_count()} "
            "CUDA device(s)"
        )
    return torch.device("cuda", index)


def move(batch: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """The batch with every tensor on `device`, its structure kept.

    Walks mappings, named tuples, tuples, lists and dataclasses; any other object with a
    `to(device, non_blocking=...)` method is moved by it; other values are returned as they are.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, str | bytes):
        return batch
    if isinstance(batch, Mapping):
        moved = {key: move(value, device, non_blocking) for key, value in batch.items()}
        try:
            return type(batch)(moved)  # type: ignore[call-arg]
        except TypeError:
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move(value, device, non_blocking) for value in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(move(value, device, non_blocking) for value in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        fields = {
            f.name: move(getattr(batch, f.name), device, non_blocking)
            for f in dataclasses.fields(batch)
            if f.init
        }
        return dataclasses.replace(batch, **fields)
    to = getattr(batch, "to", None)
    if callable(to):
        return to(device, non_blocking=non_blocking)
    return batch


def tensors_in(batch: Any, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor a batch holds: in its containers, dataclasses and objects' attributes
    (each object visited once, so a structure that refers to itself is walked once)."""
    if isinstance(batch, torch.Tensor):
        yield batch
        return
    seen = set() if seen is None else seen
    if id(batch) in seen:
        return
    seen.add(id(batch))
    if isinstance(batch, Mapping):
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, list | tuple):
        values = batch
    elif hasattr(batch, "__dict__") and not isinstance(batch, type):
        values = vars(batch).values()
    else:
        return
    for value in values:
        yield from tensors_in(value, seen)


@dataclasses.dataclass(slots=True)
class Staged:
    """A batch whose copy has been enqueued, and the event that marks the copy's end."""

    batch: Any
    copied: torch.cuda.Event | None


class DeviceStage:
    """Moves finished batches to `device`: on a side CUDA stream for a CUDA device, with a
    plain `to(device)` otherwise. `to_device(batch, device)` replaces the default walk (for
    batch types it cannot see into); `transform(batch)` runs on the moved batch, on the copy
    stream for CUDA: tensors it takes from elsewhere (a mean, a std) must be ready by then,
    so make them before the loop. Used from one thread, the consumer's."""

    def __init__(
        self,
        device: torch.device,
        to_device: ToDevice | None = None,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.device = device
        self._to_device = to_device or move
        self._transform = transform
        self._stream: torch.cuda.Stream | None = None

    def issue(self, batch: Any) -> Staged:
        """Start the batch's copy (and transform) and return at once."""
        if self.device.type != "cuda":
            return Staged(self._moved(batch), None)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            moved = self._moved(batch)
            copied = torch.cuda.Event()
            copied.record(self._stream)
        return Staged(moved, copied)

    def hand_over(self, staged: Staged) -> Any:
        """The batch, safe to use on the caller's current stream: that stream waits (on the
        GPU, not here) for the copy, and the allocator keeps the memory until it is done."""
        if staged.copied is None:
            return staged.batch
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(staged.copied)
        for tensor in tensors_in(staged.batch):
            if tensor.device == self.device:
                tensor.record_stream(stream)
        return staged.batch

    def _moved(self, batch: Any) -> Any:
        moved = self._to_device(batch, self.device)
        return moved if self._transform is None else self._transform(moved)
