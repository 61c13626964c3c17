"""Every Python block of README.md and of the documentation's pages runs, in order, as a
reader following them would: the docs cannot drift from the code. Each page continues from the
README's quickstart (its `dataset`, `loader` and imports). Blocks that need CUDA run where
there is one."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


@pytest.fixture
def sample_store() -> Iterator[str]:
    """An HTTP store on 127.0.0.1 for the async-dataset block: GET /{i} gives 16 bytes."""

    async def sample(request: web.Request) -> web.Response:
        index = int(request.match_info["index"])
        return web.Response(body=bytes([index % 256]) * 16)

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/{index}", sample)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def run_blocks(page: Path, namespace: dict) -> None:
    for number, block in enumerate(python_blocks(page)):
        if ".cuda()" in block and not torch.cuda.is_available():
            continue
        exec(compile(block, f"{page.relative_to(ROOT)} python block {number}", "exec"), namespace)


def test_the_pages_have_the_blocks_this_test_expects():
    assert len(python_blocks(ROOT / "README.md")) == 2  # the quickstart, a plan
    with_blocks = {page.name for page in PAGES if python_blocks(page)}
    assert {"index.md", "async-datasets.md", "gpu.md", "checkpoints.md", "ray.md"} <= with_blocks


# The DCP block runs in one process, which DCP warns about (the guide says so).
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_every_block_runs_and_prints_what_the_text_says(
    sample_store, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # the checkpoint block writes ckpt.pt
    for page in PAGES:
        namespace: dict = {"BASE_URL": sample_store, "__name__": "docs"}
        run_blocks(ROOT / "README.md", namespace)  # each page continues from the quickstart
        if page.name != "README.md":
            run_blocks(page, namespace)
    printed = capsys.readouterr().out
    assert "epoch 0: 10000 samples, the last batch (16, 8)" in printed
    assert "epoch 1: 10000 samples, the last batch (16, 8)" in printed
    assert "10000 samples with a plain for" in printed
    assert "the same batches as torch's loader: True" in printed
    assert "1024 samples over HTTP" in printed
    assert "147 batches left" in printed
    assert "10000 samples read by 2 Ray actors" in printed
    assert "bottleneck: collate" in printed
    assert re.search(r"bottleneck: read; map waited on the reads (9\d|100)% of its time", printed)
    if torch.cuda.is_available():
        assert re.search(r"loss [\d.]+ on cuda:0", printed)
