"""The examples run as a user runs them, and do what they say."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("flags", [[], ["--sync"]])
def test_linear_regression_prints_a_falling_loss_every_epoch(flags):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "linear_regression.py"), "--epochs", "4", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    losses = [float(x) for x in re.findall(r"epoch \d+: loss ([\d.]+)", result.stdout)]
    assert len(losses) == 4
    assert losses[-1] < losses[0] / 10


def torchrun(*args: str, cwd: Path) -> str:
    # A free port and loopback for gloo: never the fixed default port another run may hold.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            str(EXAMPLES / "ddp_train.py"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
        env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout


@pytest.mark.timeout(240)
def test_ddp_example_resumes_a_preempted_epoch_on_every_rank(tmp_path):
    # 4096 samples over 2 ranks is 2048 each: 64 steps of 32 an epoch. Step 70 is in epoch 2.
    stopped = torchrun("--stop-after", "70", cwd=tmp_path)
    assert stopped.count("preempted after 70 steps") == 2
    resumed = torchrun("--resume", "--epochs", "3", cwd=tmp_path)
    for rank in (0, 1):
        # The resumed epoch keeps its number and its remaining 58 steps; no extra epoch runs.
        assert f"rank {rank}: epoch 1 loss" not in resumed
        assert re.search(rf"rank {rank}: epoch 2 loss [\d.]+ over 1856 samples", resumed)
        assert re.search(rf"rank {rank}: epoch 3 loss [\d.]+ over 2048 samples", resumed)
        assert f"rank {rank}: epoch 4" not in resumed


def test_gpu_example_learns_with_batches_delivered_on_the_device():
    """On CPU here (device="cpu" runs the same stage); on a GPU machine it trains on CUDA."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "gpu_train.py"),
            "--epochs",
            "3",
            "--samples",
            "2048",
            "--device",
            device,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.count(f"on {device}") == 3
    accuracy = float(re.search(r"accuracy in the last epoch: ([\d.]+)", result.stdout)[1])
    assert accuracy > 0.9


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_gpu_example_says_when_it_falls_back_to_the_cpu():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "gpu_train.py"), "--epochs", "1", "--samples", "256"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "no CUDA device (torch.cuda.is_available() is False): training on the CPU" in (
        result.stdout
    )
    assert "on cpu" in result.stdout


@pytest.mark.timeout(240)
def test_ray_train_example_resumes_a_failed_run_exactly():
    """Ray Train's workers fail mid-epoch and restart from the last checkpoint; the example
    itself checks that every sample was trained on once per epoch."""
    pytest.importorskip("ray.train.torch")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "ray_train.py")],
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
        # Ray Train's controller looks at its workers every 2 s; here, every 0.2 s.
        env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "every sample trained on once per epoch" in result.stdout


@pytest.mark.parametrize(
    ("reads", "plan"),
    [
        ("loop", "read on aload's loop (64 at once) -> map decode on 2 worker processes"),
        ("threads", "read on 16 worker threads -> map decode on 2 worker processes"),
    ],
)
def test_decode_pipeline_trains_through_its_two_executors(reads, plan):
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "decode_pipeline.py"),
            *("--reads", reads, "--epochs", "3", "--samples", "1024"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.startswith(plan)
    losses = [float(x) for x in re.findall(r"epoch \d+: loss ([\d.]+)", result.stdout)]
    assert len(losses) == 3
    assert losses[-1] < losses[0] / 10
    stages = re.findall(r"^  (\w+): \d+ at once on ([\w' ]+), \d+% busy$", result.stdout, re.M)
    assert [name for name, _ in stages] == ["read", "map", "collate", "map_batch"]
    assert stages[1][1] == "worker processes"
