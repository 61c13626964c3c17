"""loader.stats: exact counts, and a wait fraction that tells data-bound from compute-bound."""

from __future__ import annotations

import logging
import time

import anyio
import pytest
from conftest import Indexed, Shards

import aload


def test_counts_are_exact_per_epoch_and_over_epochs():
    loader = aload.DataLoader(Indexed(103), batch_size=10, num_workers=2)
    assert loader.stats.epoch is None
    list(loader)
    first = loader.stats.epoch
    assert (first.epoch, first.batches, first.samples, first.finished) == (0, 11, 103, True)
    list(loader)
    stats = loader.stats
    assert (stats.epochs, stats.batches, stats.samples) == (2, 22, 206)
    assert stats.epoch.epoch == 1


def test_samples_of_iterable_datasets_are_counted_from_the_batches():
    loader = aload.DataLoader(Shards(23), batch_size=4, num_workers=3)
    list(loader)
    assert loader.stats.epoch.samples == 23


def test_stats_of_an_epoch_in_progress():
    loader = aload.DataLoader(Indexed(40), batch_size=4, num_workers=2, prefetch_factor=2)
    it = iter(loader)
    next(it)
    next(it)
    time.sleep(0.1)
    epoch = loader.stats.epoch
    assert (epoch.batches, epoch.samples, epoch.finished) == (2, 8, False)
    assert 0 < epoch.in_flight <= 4
    it.close()


def test_slow_data_and_a_fast_loop_body_is_data_bound():
    loader = aload.DataLoader(Indexed(40, delay=0.005), batch_size=4, num_workers=1)
    for _ in loader:
        pass
    assert loader.stats.epoch.wait_fraction > 0.8


def test_fast_data_and_a_slow_loop_body_is_compute_bound():
    loader = aload.DataLoader(Indexed(40), batch_size=4, num_workers=2)
    for _ in loader:
        time.sleep(0.01)
    epoch = loader.stats.epoch
    assert epoch.wait_fraction < 0.2
    assert epoch.body_seconds > 0.09
    assert epoch.max_queue_depth >= 2  # batches were ready before the loop asked


@pytest.mark.anyio
async def test_async_for_is_measured_too(anyio_backend):
    loader = aload.DataLoader(Indexed(30), batch_size=5, num_workers=2)
    async for _ in loader:
        await anyio.sleep(0.01)
    epoch = loader.stats.epoch
    assert (epoch.batches, epoch.samples) == (6, 30)
    assert epoch.wait_fraction < 0.5
    assert epoch.samples_per_second > 0


def test_an_epoch_summary_is_logged_at_debug_level(caplog):
    with caplog.at_level(logging.DEBUG, logger="aload"):
        list(aload.DataLoader(Indexed(12), batch_size=4))
    assert "aload: epoch 0: 3 batches, 12 samples" in caplog.text


def test_progress_bar_shows_batches_rate_and_wait(capsys):
    list(aload.DataLoader(Indexed(12), batch_size=4, progress=True))
    shown = capsys.readouterr().err
    assert "epoch 0" in shown
    assert "3/3" in shown
    assert "samples/s" in shown
    assert "waiting" in shown


def test_no_progress_bar_unless_asked(capsys):
    list(aload.DataLoader(Indexed(12), batch_size=4))
    assert capsys.readouterr().err == ""
