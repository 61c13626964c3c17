"""The datasets people bring, and a training run, through aload and through torch's loader:
the same samples (each exactly once), the same loss curve."""

from __future__ import annotations

import io

import pytest
import torch
import torch.utils.data as tud
from torch.utils.data import TensorDataset

import aload

datasets = pytest.importorskip("datasets")
wds = pytest.importorskip("webdataset")

# torch warns when worker processes outnumber the cores (4 on this 2-core CI), and aload
# with it: the same warning from both loaders, not what these tests compare.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

WORKERS = [0, 1, 2, 4]
MODES = ["thread", "process"]


def hf_stream():
    """A Hugging Face `datasets` IterableDataset in 4 shards: it shards by torch's worker info."""
    table = datasets.Dataset.from_dict({"x": list(range(40))})
    return table.to_iterable_dataset(num_shards=4)


def hf_samples(loader):
    return sorted(int(x) for batch in loader for x in batch["x"])


def write_shards(directory, shards=4, per_shard=10):
    urls = []
    for shard in range(shards):
        path = directory / f"shard-{shard:02d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                key = shard * per_shard + i
                sink.write({"__key__": f"{key:06d}", "cls": key})
        urls.append(str(path))
    return urls


def webdataset_pipeline(urls):
    """webdataset's recipe: shards split by `split_by_worker` (torch's worker info)."""
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.decode(),
        wds.to_tuple("cls"),
    )


def wds_samples(loader):
    return sorted(int(x) for (batch,) in loader for x in batch)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_workers", WORKERS)
def test_hugging_face_iterable_dataset_gives_torchs_samples_once_each(mode, num_workers):
    theirs = tud.DataLoader(hf_stream(), batch_size=4, num_workers=num_workers)
    ours = aload.DataLoader(hf_stream(), batch_size=4, num_workers=num_workers, worker_mode=mode)
    assert hf_samples(ours) == hf_samples(theirs) == list(range(40))


# webdataset leaves its shard files for the garbage collector, under torch's loader too.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_workers", WORKERS)
def test_webdataset_pipeline_gives_torchs_samples_once_each(tmp_path, mode, num_workers):
    urls = write_shards(tmp_path)
    theirs = tud.DataLoader(webdataset_pipeline(urls), batch_size=5, num_workers=num_workers)
    ours = aload.DataLoader(
        webdataset_pipeline(urls), batch_size=5, num_workers=num_workers, worker_mode=mode
    )
    assert wds_samples(ours) == wds_samples(theirs) == list(range(40))


def regression_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


def loss_curve(make_loader, seed):
    """Seed, build the loader, then the model (after it, as scripts do), train two epochs
    with dropout: every draw the loader makes from torch's RNG shows in the curve."""
    torch.manual_seed(seed)
    loader = make_loader(regression_data(), batch_size=32, shuffle=True)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    curve = []
    for _epoch in range(2):
        for x, y in loader:
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
    return curve


@pytest.mark.parametrize(("num_workers", "mode"), [(0, "thread"), (2, "thread"), (2, "process")])
def test_training_run_has_torchs_loss_curve_for_the_same_seed(num_workers, mode):
    theirs = loss_curve(lambda *a, **k: tud.DataLoader(*a, **k, num_workers=num_workers), 3)
    ours = loss_curve(
        lambda *a, **k: aload.DataLoader(*a, **k, num_workers=num_workers, worker_mode=mode), 3
    )
    assert len(ours) == 16
    assert ours == theirs


def test_a_checkpoint_through_torch_save_resumes_the_hugging_face_stream_exactly():
    """torch.save/torch.load of a mid-epoch state, with a real third-party stream."""
    loader = aload.DataLoader(hf_stream(), batch_size=4, num_workers=2)
    it = iter(loader)
    head = [batch["x"].tolist() for batch in (next(it), next(it), next(it))]
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)
    it.close()
    buffer.seek(0)
    resumed = aload.DataLoader(hf_stream(), batch_size=4, num_workers=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    tail = [batch["x"].tolist() for batch in resumed]
    whole = [batch["x"].tolist() for batch in aload.DataLoader(hf_stream(), 4, num_workers=2)]
    assert head + tail == whole
