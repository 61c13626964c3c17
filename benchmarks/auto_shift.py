"""`max_concurrency="auto"` on the `auto-shift` workload, over time: samples/s and the
concurrency it chose, beside static settings. Writes a PNG (needs matplotlib).

The store serves 8,000 requests a second (refused ones count too, and a retry waits 20 ms);
reads take 1 ms for the first half of the epoch and 10 ms for the second, so the best
concurrency moves from about 8 to about 80 mid-epoch.

    python benchmarks/auto_shift.py --out docs/auto-shift.png
"""

from __future__ import annotations

import argparse
import time

import aload
from aload.bench.datasets import shifting_stores

BIN_SECONDS = 0.1


def timeline(
    max_concurrency: int | str, items: int
) -> tuple[list[float], list[int], aload.DataLoader]:
    """Each batch's arrival (seconds from the loader's start) and the samples so far."""
    store, _ = shifting_stores(items)
    loader = aload.DataLoader(store, batch_size=16, max_concurrency=max_concurrency)
    started, times, samples, total = time.perf_counter(), [], [], 0
    for batch in loader:
        total += len(batch)
        times.append(time.perf_counter() - started)
        samples.append(total)
    return times, samples, loader


def rates(times: list[float], samples: list[int]) -> tuple[list[float], list[float]]:
    """Samples/s in bins of BIN_SECONDS."""
    centers, values, edge, before = [], [], BIN_SECONDS, 0
    for at, total in zip(times, samples, strict=True):
        if at >= edge:
            centers.append(edge - BIN_SECONDS / 2)
            values.append((total - before) / BIN_SECONDS)
            edge, before = edge + BIN_SECONDS, total
    return centers, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="auto-shift.png")
    parser.add_argument("--items", type=int, default=12_000)
    parser.add_argument("--static", type=int, nargs="+", default=[16, 64])
    args = parser.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("needs matplotlib: pip install 'aload[bench]'") from None

    figure, (speed, chosen) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for setting in [*args.static, "auto"]:
        times, samples, loader = timeline(setting, args.items)
        label = f"max_concurrency={setting!r}: {samples[-1] / times[-1]:,.0f} samples/s"
        print(label)
        speed.plot(*rates(times, samples), label=label, linewidth=2 if setting == "auto" else 1)
        if setting == "auto":
            switch = next(t for t, s in zip(times, samples, strict=True) if s >= args.items // 2)
            for axis in (speed, chosen):
                axis.axvline(switch, color="grey", linestyle=":")
            history = loader.stats.tuning.history
            steps = [(0.0, 32)] + [(d.seconds, d.concurrency) for d in history]
            steps.append((times[-1], steps[-1][1]))
            chosen.step([t for t, _ in steps], [c for _, c in steps], where="post")
    speed.set_ylabel("samples/s (0.1 s bins)")
    speed.legend(fontsize=8)
    speed.set_title("reads of 1 ms, then 10 ms (dotted), from a store limited to 8,000 requests/s")
    chosen.set_ylabel("reads at once ('auto')")
    chosen.set_xlabel("seconds from the loader's start")
    figure.tight_layout()
    figure.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
