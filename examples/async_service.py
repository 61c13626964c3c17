"""A web service that trains while it serves, fed by an async dataset over HTTP.

Three parts:
- a sample store: an HTTP server on 127.0.0.1, in a process of its own, that serves one
  training sample per URL (a stand-in for object storage or a feature service);
- `HttpDataset`: an aload dataset whose `__getitem__` is a coroutine that GETs one sample;
  aload awaits up to `max_concurrency` of them at once on its own event loop;
- the service: an aiohttp app with `/health` that keeps answering, on the same event loop
  as the training loop (`async for x, y in loader`), while the model trains.

    pip install -e '.[examples]'    # aiohttp, from a checkout of aload
    python examples/async_service.py             # serves on http://127.0.0.1:8080/health
    python examples/async_service.py --smoke     # trains, polls /health meanwhile, reports
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import statistics
import time
from multiprocessing.connection import wait
from typing import Any

import aiohttp
import anyio
import torch
from aiohttp import web

import aload

FEATURES = 8


def sample_store(n: int) -> web.Application:
    """Serves sample i at /samples/i: 8 features and a target, as JSON."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, FEATURES, generator=gen)
    y = x @ torch.arange(1.0, FEATURES + 1) + 0.1 * torch.randn(n, generator=gen)

    async def sample(request: web.Request) -> web.Response:
        i = int(request.match_info["i"])
        if not 0 <= i < n:
            raise web.HTTPNotFound(text=f"no sample {i}")
        return web.json_response({"x": x[i].tolist(), "y": y[i].item()})

    app = web.Application()
    app.router.add_get("/samples/{i}", sample)
    return app


class HttpDataset:
    """Sample i is fetched from `{base_url}/samples/{i}` with one shared HTTP session.

    The session is opened in `__aenter__`, which aload runs on its own event loop before the
    first read (and `__aexit__` after the epoch): sessions belong to the loop that uses them.
    """

    def __init__(self, base_url: str, n: int) -> None:
        self.base_url = base_url
        self.n = n
        self.session: aiohttp.ClientSession | None = None

    def __len__(self) -> int:
        return self.n

    async def __aenter__(self) -> HttpDataset:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), raise_for_status=True
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.session is not None
        await self.session.close()

    async def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.session is not None, "read outside the epoch"
        async with self.session.get(f"{self.base_url}/samples/{index}") as response:
            sample = await response.json()
        return torch.tensor(sample["x"]), torch.tensor(sample["y"])


async def start(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    """Run `app` on 127.0.0.1; returns its runner and the port it got."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


class Trainer:
    """Trains a linear model from the loader and keeps numbers for /health."""

    def __init__(self, loader: aload.DataLoader) -> None:
        self.loader = loader
        self.model = torch.nn.Linear(FEATURES, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.epochs_done = 0
        self.batches = 0
        self.loss = float("nan")

    async def train(self, epochs: int) -> None:
        for _ in range(epochs):
            async for x, y in self.loader:
                loss = torch.nn.functional.mse_loss(self.model(x).squeeze(1), y)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                self.batches += 1
                self.loss = loss.item()
            self.epochs_done += 1

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "epochs": self.epochs_done,
            "batches": self.batches,
            "loss": self.loss,
        }


def service(trainer: Trainer) -> web.Application:
    async def health(request: web.Request) -> web.Response:
        return web.json_response(trainer.health())

    app = web.Application()
    app.router.add_get("/health", health)
    return app


def run_store(n: int, ports: multiprocessing.Queue) -> None:
    """The sample store's process: report the port, then serve until the service's process
    ends, however it ends (even killed, it leaves nothing listening)."""
    parent = multiprocessing.parent_process()
    assert parent is not None

    async def serve() -> None:
        runner, port = await start(sample_store(n))
        ports.put(port)
        await anyio.to_thread.run_sync(wait, [parent.sentinel])
        await runner.cleanup()

    anyio.run(serve)


async def main(args: argparse.Namespace) -> None:
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    store = context.Process(target=run_store, args=(args.samples, ports), daemon=True)
    store.start()
    try:
        store_port = await anyio.to_thread.run_sync(ports.get, True, 60)
        print(f"sample store on http://127.0.0.1:{store_port}", flush=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_on_signal, tg.cancel_scope)
            await serve_and_train(args, store_port)
            tg.cancel_scope.cancel()
    finally:
        store.terminate()
        store.join()


async def stop_on_signal(scope: anyio.CancelScope) -> None:
    """SIGTERM or Ctrl-C: cancel the service, so every `finally` runs (the sample store is
    stopped, the loader's epoch is closed) before the process exits."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def serve_and_train(args: argparse.Namespace, store_port: int) -> None:
    dataset = HttpDataset(f"http://127.0.0.1:{store_port}", args.samples)
    loader = aload.DataLoader(dataset, batch_size=32, shuffle=True, max_concurrency=64)
    trainer = Trainer(loader)
    api, api_port = await start(service(trainer), 0 if args.smoke else args.port)
    print(f"health on http://127.0.0.1:{api_port}/health", flush=True)
    try:
        if args.smoke:
            await smoke(trainer, api_port, args.epochs)
        else:
            await trainer.train(args.epochs)
            print(trainer.health())
            await anyio.sleep_forever()
    finally:
        await api.cleanup()


async def smoke(trainer: Trainer, port: int, epochs: int) -> None:
    """Train while polling /health; print how fast the service answered meanwhile."""
    latencies: list[float] = []
    async with aiohttp.ClientSession() as client, anyio.create_task_group() as tg:

        async def poll() -> None:
            while True:
                started = time.perf_counter()
                async with client.get(f"http://127.0.0.1:{port}/health") as response:
                    await response.json()
                latencies.append(time.perf_counter() - started)
                await anyio.sleep(0.01)

        tg.start_soon(poll)
        started = time.perf_counter()
        await trainer.train(epochs)
        elapsed = time.perf_counter() - started
        tg.cancel_scope.cancel()
    samples = trainer.epochs_done * len(trainer.loader.dataset)
    print(
        f"trained {trainer.epochs_done} epochs, {samples / elapsed:,.0f} samples/s, "
        f"final loss {trainer.loss:.4f}"
    )
    print(
        f"/health answered {len(latencies)} times while training, "
        f"median {statistics.median(latencies) * 1e3:.1f} ms, "
        f"max {max(latencies) * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--smoke", action="store_true", help="train, poll /health, report, exit")
    anyio.run(main, parser.parse_args())
