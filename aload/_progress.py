"""A tqdm progress bar per epoch, fed by the epoch's meter (only when asked for)."""

from __future__ import annotations

import importlib.util

from ._stats import EpochMeter


def progress_available(requested: bool) -> bool:
    """Whether to show bars; asking without tqdm installed is an error, not silence."""
    if requested and importlib.util.find_spec("tqdm") is None:
        raise ImportError("progress=True needs tqdm: pip install tqdm (or aload[progress])")
    return bool(requested)


def watch_progress(meter: EpochMeter, total: int | None) -> None:
    """Show the epoch's batches on a bar, with samples/s, the wait share and the bottleneck
    stage in its postfix."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"epoch {meter.epoch}", unit="batch", leave=True)

    def on_batch(meter: EpochMeter) -> None:
        stats = meter.snapshot()
        bar.set_postfix_str(
            f"{stats.samples_per_second:,.0f} samples/s, waiting {stats.wait_fraction:.0%}, "
            f"bottleneck: {stats.bottleneck}",
            refresh=False,
        )
        bar.update(1)

    meter.on_batch = on_batch
    meter.on_end.append(bar.close)
