"""Collate functions: torch's own, and padding for variable-length sequences.

`default_collate` and `default_convert` are torch's, re-exported so `aload` alone is enough
to import. `pad_collate` is `default_collate` that pads sequences of different lengths (token
ids of sentences, frames of audio) instead of failing to stack them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data._utils.collate import default_collate, default_convert

__all__ = ["Padded", "default_collate", "default_convert", "pad_collate"]


class Padded(NamedTuple):
    """A batch of sequences padded to the longest: `values[i, :lengths[i]]` is sequence i."""

    values: torch.Tensor
    lengths: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """Boolean `(batch, longest)` mask, True at real elements and False at padding."""
        positions = torch.arange(self.values.shape[1], device=self.lengths.device)
        return positions < self.lengths[:, None]


def pad_collate(batch: Sequence[Any], *, padding_value: float = 0) -> Any:
    """Collate like `default_collate`, padding every sequence field into a `Padded`.

    A sequence field is a 1-D tensor, a 1-D numeric numpy array, or a *list* of numbers
    (what tokenizers return); it becomes `Padded(values, lengths)` with `values` of shape
    `(batch, longest)`, padded at the end with `padding_value`. Tuples are structure, as in
    `default_collate` (a sample `(tokens, label)` gives `[Padded, labels]`); dicts and named
    tuples keep their keys. Everything else is collated by `default_collate`.

    Use `functools.partial(pad_collate, padding_value=-100)` to pick the padding value.
    """
    first = batch[0]
    if _is_sequence(first):
        tensors = [torch.as_tensor(sample) for sample in batch]
        dtype = next((t.dtype for t in tensors if len(t)), tensors[0].dtype)
        tensors = [t.to(dtype) for t in tensors]
        lengths = torch.tensor([len(t) for t in tensors], dtype=torch.long)
        return Padded(pad_sequence(tensors, batch_first=True, padding_value=padding_value), lengths)
    if isinstance(first, Mapping):
        collated = {
            key: pad_collate([s[key] for s in batch], padding_value=padding_value) for key in first
        }
        mapping_type: Any = type(first)
        try:
            return mapping_type(collated)
        except TypeError:
            return collated
    if isinstance(first, tuple):
        fields = [
            pad_collate(list(group), padding_value=padding_value)
            for group in zip(*batch, strict=True)
        ]
        return type(first)(*fields) if hasattr(first, "_fields") else fields
    return default_collate(batch)


def _is_sequence(sample: Any) -> bool:
    if isinstance(sample, torch.Tensor | np.ndarray):
        return sample.ndim == 1
    return isinstance(sample, list) and all(isinstance(x, int | float) for x in sample)
