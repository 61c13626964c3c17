"""An async dataset reading a real HTTP server on 127.0.0.1 (the example's dataset)."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

import aload

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
_spec = importlib.util.spec_from_file_location("async_service", EXAMPLES / "async_service.py")
service = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(service)


class Watched:
    """Wraps the sample store: counts requests in flight, and can fail some with 503."""

    def __init__(self, n: int, unavailable_first: int = 0) -> None:
        self.app = service.sample_store(n)
        self.in_flight = self.peak = self.requests = 0
        self.unavailable_first = unavailable_first

        @web.middleware
        async def watch(request, handler):
            self.requests += 1
            number = self.requests
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                await asyncio.sleep(0.002)  # a store takes time: requests overlap here
                if number <= self.unavailable_first:
                    raise web.HTTPServiceUnavailable()
                return await handler(request)
            finally:
                self.in_flight -= 1

        self.app.middlewares.append(watch)


@pytest_asyncio.fixture
async def store():
    runners = []

    async def start(n, **kwargs):
        watched = Watched(n, **kwargs)
        runner, port = await service.start(watched.app)
        runners.append(runner)
        return watched, f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_every_sample_comes_over_http_once_with_bounded_concurrency(store):
    watched, url = await store(300)
    loader = aload.DataLoader(
        service.HttpDataset(url, 300), batch_size=16, shuffle=True, max_concurrency=24
    )
    targets = []
    async for x, y in loader:
        assert x.shape[1] == service.FEATURES
        targets.extend(y.tolist())
    assert len(targets) == 300
    assert watched.requests == 300
    assert watched.peak <= 24
    assert watched.peak > 1


@pytest.mark.asyncio
async def test_unavailable_server_is_retried(store):
    _, url = await store(40, unavailable_first=5)
    loader = aload.DataLoader(
        service.HttpDataset(url, 40),
        batch_size=8,
        max_concurrency=4,
        retry=aload.Retry(attempts=3, backoff=0.01, on=(aiohttp.ClientResponseError,)),
    )
    batches = [x async for x, _ in loader]
    assert sum(len(x) for x in batches) == 40
    assert loader.stats.retries == 5


@pytest.mark.asyncio
async def test_missing_sample_raises_the_http_error_naming_the_index(store):
    _, url = await store(10)
    loader = aload.DataLoader(service.HttpDataset(url, 12), batch_size=4)
    with pytest.raises(aiohttp.ClientResponseError, match="404") as caught:
        async for _ in loader:
            pass
    assert "indices [8, 9, 10, 11]" in "\n".join(caught.value.__notes__)


def test_service_keeps_answering_health_while_it_trains():
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "async_service.py"),
            "--smoke",
            "--samples",
            "512",
            "--epochs",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    answered = re.search(
        r"/health answered (\d+) times while training, median ([\d.]+) ms", result.stdout
    )
    assert answered, result.stdout
    assert int(answered.group(1)) >= 5
    assert float(answered.group(2)) < 50
    loss = float(re.search(r"final loss ([\d.]+)", result.stdout).group(1))
    assert loss < 5


def test_service_stops_its_sample_store_on_sigterm():
    command = [sys.executable, str(EXAMPLES / "async_service.py"), "--port", "0", "--epochs", "1"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            line = process.stdout.readline()
            store = re.search(r"sample store on http://127.0.0.1:(\d+)", line)
            assert store, "the service did not report its sample store"
            assert "health on" in process.stdout.readline()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0
        finally:
            process.kill()
    with socket.socket() as probe:  # nothing listens on the store's port any more
        assert probe.connect_ex(("127.0.0.1", int(store.group(1)))) != 0
