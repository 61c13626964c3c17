"""Pinned host memory for batches bound for a GPU.

Batches are pinned by the worker that collated them, so pinning runs in parallel with the
other workers instead of in one extra thread on the hot path.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils.data._utils.pin_memory import pin_memory as _pin_nested


def pinning_enabled(requested: bool) -> bool:
    """Whether to pin: as torch, `pin_memory=True` without a GPU warns and carries on unpinned."""
    if requested and not torch.cuda.is_available():
        warnings.warn(
            "pin_memory=True but no CUDA device is available; batches stay in pageable memory",
            stacklevel=3,
        )
        return False
    return requested


def pin_batch(batch: Any) -> Any:
    """The batch in pinned memory (nested structures, and any type with a `pin_memory()`
    method, as torch pins them)."""
    return _pin_nested(batch)
