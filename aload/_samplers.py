"""Index batches of torch's default samplers, cut from one permutation instead of per index.

torch's `BatchSampler(RandomSampler(...))` yields one Python int at a time through two
generators (20-40 µs for a batch of 256); the same batches are slices of the `randperm` it
draws. `fast_index_batches` draws exactly what torch's samplers draw from the generator (or
the global RNG), at the same points of the iteration, so batches, the generator's state after
them, and so resume, stay identical to torch's for the same seed. Any other sampler, or a
subclass that changes iteration, is left to its own `__iter__`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

from ._intra_op import on_one_thread

# Run on the consumer's thread, beside the workers: on one intra-op thread (`_intra_op`).
_randperm = on_one_thread(torch.randperm)
_SLICE = 4096


def fast_index_batches(index_sampler: Any, as_tensors: bool) -> Iterator[Any] | None:
    """The batches `index_sampler` yields, as int64 tensors (`as_tensors`) or lists of ints;
    None when it is not torch's `BatchSampler` over its `SequentialSampler` or its
    `RandomSampler` without replacement."""
    if type(index_sampler).__iter__ is not BatchSampler.__iter__:
        return None
    sampler = index_sampler.sampler
    kind = type(sampler)
    if kind.__iter__ is SequentialSampler.__iter__:
        chunks = _sequential(sampler)
    elif kind.__iter__ is RandomSampler.__iter__ and not sampler.replacement:
        chunks = _permutations(sampler)
    else:
        return None
    batches = _cut(chunks, index_sampler.batch_size, index_sampler.drop_last)
    return batches if as_tensors else (batch.tolist() for batch in batches)


def _sequential(sampler: SequentialSampler) -> Iterator[torch.Tensor]:
    """0 to n - 1, a slice at a time (one `arange` of the whole would be a parallel op)."""
    n = len(sampler.data_source)
    for start in range(0, n, _SLICE):
        yield torch.arange(start, min(n, start + _SLICE))


def _permutations(sampler: RandomSampler) -> Iterator[torch.Tensor]:
    """`RandomSampler.__iter__`'s draws, each permutation drawn when torch's would be: the
    seed when iteration starts, the next permutation when the last one is used up.

    torch always draws a last permutation for the remainder of `num_samples`, even an empty
    one. From the caller's generator it is drawn too (it moves the generator's state); from
    the private generator torch seeds when there is none, nobody can see it: skipped."""
    n = len(sampler.data_source)
    generator = sampler.generator
    private = generator is None
    if generator is None:
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        generator = torch.Generator()
        generator.manual_seed(seed)
    for _ in range(sampler.num_samples // n):
        yield _randperm(n, generator=generator)
    remainder = sampler.num_samples % n
    if remainder or not private:
        yield _randperm(n, generator=generator)[:remainder]


def _cut(
    chunks: Iterator[torch.Tensor], batch_size: int, drop_last: bool
) -> Iterator[torch.Tensor]:
    """Batches of `batch_size` from a stream of index chunks (a batch may span two), the
    last one short unless `drop_last`; each chunk is pulled only when a batch needs it."""
    carry: torch.Tensor | None = None
    for chunk in chunks:
        if carry is not None:
            need = batch_size - len(carry)
            if len(chunk) < need:
                carry = torch.cat((carry, chunk))
                continue
            yield torch.cat((carry, chunk[:need]))
            chunk, carry = chunk[need:], None
        whole = len(chunk) - len(chunk) % batch_size
        if whole:  # one call makes every view (half the cost of slicing them one by one)
            yield from chunk[:whole].view(-1, batch_size).unbind()
        if whole < len(chunk):
            carry = chunk[whole:]
    if carry is not None and len(carry) and not drop_last:
        yield carry
