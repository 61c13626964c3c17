"""aload: an async-first data loader for PyTorch."""

from ._errors import LoaderTimeoutError as LoaderTimeoutError
from ._retry import Retry as Retry
from ._sample_random import SampleRandom as SampleRandom
from ._sample_random import sample_random as sample_random
from ._stats import EpochStats as EpochStats
from ._stats import LoaderStats as LoaderStats
from ._tuner import Decision as Decision
from ._tuner import Tuning as Tuning
from ._version import VERSION as _VERSION
from ._worker_info import WorkerInfo as WorkerInfo
from ._worker_info import get_worker_info as get_worker_info
from .collate import Padded as Padded
from .collate import default_collate as default_collate
from .collate import default_convert as default_convert
from .collate import pad_collate as pad_collate
from .loader import DataLoader as DataLoader

__version__ = _VERSION

__all__ = [
    "DataLoader",
    "Decision",
    "EpochStats",
    "LoaderStats",
    "LoaderTimeoutError",
    "Padded",
    "Retry",
    "SampleRandom",
    "Tuning",
    "WorkerInfo",
    "default_collate",
    "default_convert",
    "get_worker_info",
    "pad_collate",
    "sample_random",
]

# Show aload's own public names as `aload.X`, not as the private module that defines them.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("aload."):
        _obj.__module__ = __name__
del _name, _obj
