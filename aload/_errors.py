"""The loader's own exception types."""

from __future__ import annotations


class LoaderTimeoutError(TimeoutError, RuntimeError):
    """A batch was not ready within the loader's `timeout`.

    Both a `TimeoutError` and, as torch's DataLoader raises, a `RuntimeError`: code written
    for torch (`except RuntimeError`) and code written for timeouts (`except TimeoutError`)
    both catch it.
    """
