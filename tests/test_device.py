"""`device=`: batches delivered on a device, copied ahead of the loop body.

Without a GPU the stage runs its structure, ordering, copy-ahead bound and clean-up with
device="meta" (tensors without data) or "cpu"; the CUDA tests need a GPU.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import pytest
import torch
from conftest import Indexed, Shards, aload_threads, assert_resumes_exactly, wait_for_no_workers
from torch.utils.data import Dataset, TensorDataset

import aload

Pair = collections.namedtuple("Pair", "x y")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@dataclasses.dataclass
class Example:
    image: torch.Tensor
    label: torch.Tensor
    name: str


class Box:
    """A custom batch type that knows how to move itself, as torch's pinning expects."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def to(self, device, non_blocking=False):
        return Box(self.data.to(device, non_blocking=non_blocking))


def structured(batch):
    ids = torch.tensor(batch)
    return {
        "pair": Pair(ids.float(), ids),
        "example": Example(ids[:, None].float(), ids, "names stay"),
        "box": Box(ids),
        "padded": aload.Padded(ids[:, None], ids),
        "list": [ids, 7, "text"],
    }


def test_no_device_and_cpu_deliver_the_same_batches():
    data = TensorDataset(torch.arange(20.0))
    plain = [b[0] for b in aload.DataLoader(data, batch_size=6, num_workers=2)]
    on_cpu = aload.DataLoader(data, batch_size=6, num_workers=2, device="cpu")
    assert on_cpu.device == torch.device("cpu")
    assert all(torch.equal(a[0], b) for a, b in zip(on_cpu, plain, strict=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_a_cuda_device_without_cuda_is_refused_at_construction(device):
    with pytest.raises(ValueError, match=r"device='cuda.*torch\.cuda\.is_available\(\) is False"):
        aload.DataLoader(range(4), device=device)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"device": 1.5}, TypeError, "device must be a str, an int or a torch.device, got float"),
        ({"device": "gpu"}, ValueError, "device='gpu' is not a device torch knows"),
        ({"device": "cpu", "to_device": 3}, TypeError, "to_device must be callable, got int"),
        ({"device": "cpu", "device_transform": "x"}, TypeError, "device_transform must be"),
        ({"to_device": lambda b, d: b}, ValueError, "need a device="),
        ({"device_transform": abs}, ValueError, "need a device="),
    ],
)
def test_bad_device_arguments_name_themselves(kwargs, error, message):
    with pytest.raises(error, match=message):
        aload.DataLoader(range(4), **kwargs)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_tensor_of_a_nested_batch_is_moved_and_the_structure_kept(num_workers):
    loader = aload.DataLoader(
        range(8), batch_size=4, collate_fn=structured, num_workers=num_workers, device="meta"
    )
    for batch in loader:
        assert isinstance(batch["pair"], Pair)
        assert isinstance(batch["example"], Example)
        assert isinstance(batch["box"], Box)
        assert isinstance(batch["padded"], aload.Padded)
        assert batch["example"].name == "names stay"
        assert batch["list"][1:] == [7, "text"]
        moved = [
            *batch["pair"],
            batch["example"].image,
            batch["example"].label,
            batch["box"].data,
            *batch["padded"],
            batch["list"][0],
        ]
        assert {t.device.type for t in moved} == {"meta"}
        assert batch["pair"].x.dtype == torch.float32
        assert batch["pair"].x.shape == (4,)


def test_device_transform_sees_the_moved_batch():
    seen = []

    def normalize(batch):
        seen.append(batch[0].device.type)
        return [(batch[0] - 10) * 2]

    loader = aload.DataLoader(
        TensorDataset(torch.arange(20.0)),
        batch_size=10,
        device="cpu",
        to_device=lambda batch, device: [batch[0].to(device) * 1],
        device_transform=normalize,
    )
    assert [b[0].tolist()[:2] for b in loader] == [[-20.0, -18.0], [0.0, 2.0]]
    assert seen == ["cpu", "cpu"]


class CopyLog:
    """A `to_device` that records which batch was issued when."""

    def __init__(self) -> None:
        self.issued: list[int] = []

    def __call__(self, batch, device):
        self.issued.append(int(batch[0]) // 4)
        return batch.to(device)


@pytest.mark.parametrize("prefetch_factor", [1, 2, 3])
def test_copies_run_ahead_of_the_loop_body_by_at_most_prefetch_factor(prefetch_factor):
    log = CopyLog()
    loader = aload.DataLoader(
        range(48),
        batch_size=4,
        num_workers=2,
        prefetch_factor=prefetch_factor,
        device="cpu",
        to_device=log,
    )
    leads = []
    for k, batch in enumerate(loader):
        assert batch.tolist() == list(range(4 * k, 4 * k + 4))
        assert log.issued == list(range(len(log.issued)))  # issued in order, once each
        leads.append(len(log.issued) - 1 - k)
        time.sleep(0.05)  # a slow step: the workers get ahead
    assert log.issued == list(range(12))
    assert max(leads) == prefetch_factor  # later copies started before this batch's step


def test_without_workers_a_plain_for_copies_only_the_batch_it_yields():
    log = CopyLog()
    loader = aload.DataLoader(range(16), batch_size=4, device="cpu", to_device=log)
    for k, _batch in enumerate(loader):
        assert log.issued == list(range(k + 1))


def test_an_error_in_to_device_names_the_batch_and_iteration_goes_on():
    def fragile(batch, device):
        if 8 in batch.tolist():
            raise RuntimeError("cannot move this one")
        return batch.to(device)

    it = iter(
        aload.DataLoader(range(16), batch_size=4, num_workers=2, device="cpu", to_device=fragile)
    )
    assert next(it).tolist() == [0, 1, 2, 3]
    assert next(it).tolist() == [4, 5, 6, 7]
    with pytest.raises(RuntimeError, match="cannot move") as raised:
        next(it)
    assert "batch 2 (indices [8, 9, 10, 11])" in raised.value.__notes__[-1]
    assert [b.tolist() for b in it] == [[12, 13, 14, 15]]


def test_break_with_copies_staged_stops_the_workers():
    loader = aload.DataLoader(Indexed(400), batch_size=4, num_workers=3, device="meta")
    for k, _batch in enumerate(loader):
        if k == 2:
            break
    wait_for_no_workers()
    assert aload_threads() == []


def test_a_checkpoint_counts_yielded_batches_not_staged_ones():
    def make():
        return aload.DataLoader(
            range(40),
            batch_size=4,
            shuffle=True,
            num_workers=2,
            device="cpu",
            generator=torch.Generator().manual_seed(3),
        )

    assert_resumes_exactly(make, stop=3, settle=0.05)


@pytest.mark.anyio
async def test_async_for_delivers_on_the_device(anyio_backend):
    loader = aload.DataLoader(range(10), batch_size=4, num_workers=2, device="meta")
    shapes = [batch.shape[0] async for batch in loader]
    assert shapes == [4, 4, 2]


class Images(Dataset):
    def __init__(self, n: int) -> None:
        self.data = torch.randn(n, 3, 16, 16)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.data[i], i


@needs_cuda
@pytest.mark.parametrize(
    ("num_workers", "worker_mode"), [(0, "thread"), (2, "thread"), (2, "process")]
)  # process mode needs workers
@pytest.mark.parametrize("tensors", [False, True], ids=["per-item", "gathered"])
def test_cuda_batches_equal_the_host_data(num_workers, worker_mode, tensors):
    images = Images(64)
    # A TensorDataset is gathered with one index operation, straight into pinned memory.
    data = TensorDataset(images.data, torch.arange(64)) if tensors else images
    loader = aload.DataLoader(
        data,
        batch_size=8,
        shuffle=True,
        num_workers=num_workers,
        worker_mode=worker_mode,
        device="cuda",
    )
    for _epoch in range(2):
        seen = []
        for batch, ids in loader:
            assert batch.is_cuda
            assert ids.is_cuda
            torch.testing.assert_close(batch.cpu(), images.data[ids.cpu()])
            seen += ids.tolist()
        assert sorted(seen) == list(range(64))


@needs_cuda
def test_cuda_copies_are_pinned_first_and_go_on_a_side_stream():
    streams = []

    def to_device(batch, device):
        assert batch.is_pinned()
        streams.append(torch.cuda.current_stream(device))
        return batch.to(device, non_blocking=True)

    loader = aload.DataLoader(
        TensorDataset(torch.arange(32.0)),
        batch_size=8,
        num_workers=2,
        device="cuda",
        collate_fn=lambda b: torch.stack([x[0] for x in b]),
        to_device=to_device,
    )
    assert [b.sum().item() for b in loader] == [28.0, 92.0, 156.0, 220.0]
    assert all(s != torch.cuda.default_stream() for s in streams)


@needs_cuda
def test_cuda_memory_is_not_reused_while_the_consumer_stream_reads_it():
    """A slow kernel on the consumer's stream reads each batch while later copies land: with
    the stage's event and record_stream, every read sees its own batch's values."""
    n, size = 48, 1 << 18  # every partial sum is an integer below 2**24: exact in float32
    data = TensorDataset(torch.arange(n, dtype=torch.float32)[:, None].expand(n, size).clone())
    loader = aload.DataLoader(
        data,
        batch_size=1,
        num_workers=3,
        prefetch_factor=4,
        device="cuda",
        collate_fn=lambda b: b[0][0],
    )
    consumer = torch.cuda.Stream()
    sums = []
    with torch.cuda.stream(consumer):
        for _epoch in range(3):
            for batch in loader:
                torch.cuda._sleep(2_000_000)  # keep the consumer's stream busy
                sums.append(batch.sum())
                del batch
    torch.cuda.synchronize()
    expected = [float(i * size) for i in range(n)] * 3
    assert [s.item() for s in sums] == expected


@needs_cuda
def test_device_transform_runs_on_the_gpu():
    mean = torch.tensor(0.5, device="cuda")
    loader = aload.DataLoader(
        TensorDataset(torch.ones(8, 4)),
        batch_size=4,
        num_workers=2,
        device="cuda",
        device_transform=lambda batch: [batch[0] - mean],
    )
    for (x,) in loader:
        assert x.is_cuda
        assert torch.equal(x.cpu(), torch.full((4, 4), 0.5))


class FakeCuda:
    """Stands in for torch.cuda's streams and events, recording what the stage asks of them,
    so the CUDA control flow is checked on machines without a GPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.current = "consumer"
        fake = self

        class Stream:
            def __init__(self, device=None, name="copy"):
                self.name = name
                if name == "copy":
                    fake.calls.append(("new stream", str(device)))

            def wait_event(self, event):
                fake.calls.append(("wait", self.name, event.name))

        class Event:
            count = 0

            def __init__(self):
                Event.count += 1
                self.name = f"event {Event.count}"

            def record(self, stream):
                fake.calls.append(("record", self.name, stream.name))

        class Context:
            def __init__(self, stream):
                self.stream, self.before = stream, None

            def __enter__(self):
                self.before, fake.current = fake.current, self.stream.name
                fake.calls.append(("enter", self.stream.name))

            def __exit__(self, *exc):
                fake.current = self.before
                fake.calls.append(("exit", self.stream.name))

        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "stream", Context)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream(name=fake.current))


class FakeCudaTensor(torch.Tensor):
    """A tensor that says it is on cuda:0 and logs `record_stream`."""

    @property
    def device(self):
        return torch.device("cuda", 0)

    def record_stream(self, stream):
        self.fake.calls.append(("record_stream", self.label, stream.name))


def fake_cuda_tensor(fake: FakeCuda, name: str) -> FakeCudaTensor:
    tensor = torch.zeros(1).as_subclass(FakeCudaTensor)
    tensor.fake, tensor.label = fake, name
    return tensor


def test_cuda_stage_copies_on_its_stream_then_the_consumer_waits_and_records(monkeypatch):
    from aload._device import DeviceStage  # the stage alone: no CUDA device to load onto here

    fake = FakeCuda(monkeypatch)

    def to_device(batch, device):
        fake.calls.append(("copy", batch, fake.current))
        return {
            "x": fake_cuda_tensor(fake, f"x{batch}"),
            "y": [fake_cuda_tensor(fake, f"y{batch}")],
        }

    def transform(batch):
        fake.calls.append(("transform", fake.current))
        return batch

    stage = DeviceStage(torch.device("cuda", 0), to_device, transform)
    first, second = stage.issue(0), stage.issue(1)
    assert fake.calls == [
        ("new stream", "cuda:0"),  # one copy stream, made once
        ("enter", "copy"),
        ("copy", 0, "copy"),
        ("transform", "copy"),
        ("record", "event 1", "copy"),  # the event marks the end of copy and transform
        ("exit", "copy"),
        ("enter", "copy"),
        ("copy", 1, "copy"),
        ("transform", "copy"),
        ("record", "event 2", "copy"),
        ("exit", "copy"),
    ]
    fake.calls.clear()
    batch = stage.hand_over(first)
    assert batch["x"].label == "x0"
    assert fake.calls == [
        ("wait", "consumer", "event 1"),  # the consumer's stream waits, on the GPU
        ("record_stream", "x0", "consumer"),
        ("record_stream", "y0", "consumer"),
    ]
    fake.calls.clear()
    fake.current = "user stream"  # whatever stream is current when the batch is taken
    stage.hand_over(second)
    assert fake.calls[0] == ("wait", "user stream", "event 2")


@pytest.mark.parametrize("in_order", [True, False])
def test_iterable_datasets_and_any_order_pass_through_the_stage_whole(in_order):
    log = CopyLog()
    loader = aload.DataLoader(
        Shards(40), batch_size=4, num_workers=3, in_order=in_order, device="cpu", to_device=log
    )
    for _epoch in range(2):
        log.issued.clear()
        batches = [b.tolist() for b in loader]
        assert sorted(x for b in batches for x in b) == list(range(40))
        assert len(log.issued) == len(batches)  # each batch copied once, end markers never
