"""The examples run as a user runs them, and do what they say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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
