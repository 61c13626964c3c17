"""Every Python block of README.md runs, in order, in one namespace, as a reader following it
would: the docs cannot drift from the code. Blocks that need CUDA run where there is one."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from aiohttp import web

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


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


def test_readme_has_the_blocks_this_test_expects():
    assert len(python_blocks()) >= 5


def test_every_readme_block_runs_and_prints_what_the_text_says(
    sample_store, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # the checkpoint block writes ckpt.pt
    namespace: dict = {"BASE_URL": sample_store, "__name__": "readme"}
    for number, block in enumerate(python_blocks()):
        if ".cuda()" in block and not torch.cuda.is_available():
            continue
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "epoch 0: 10000 samples, the last batch (16, 8)" in printed
    assert "epoch 1: 10000 samples, the last batch (16, 8)" in printed
    assert "10000 samples with a plain for" in printed
    assert "1024 samples over HTTP" in printed
    assert "147 batches left" in printed
    if torch.cuda.is_available():
        assert re.search(r"loss [\d.]+ on cuda:0", printed)
