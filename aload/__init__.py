"""aload: an async-first data loader for PyTorch."""

from types import FunctionType as _FunctionType

from ._errors import LoaderTimeoutError as LoaderTimeoutError
from ._mode import ModeChoice as ModeChoice
from ._mode import WorkerModeTuning as WorkerModeTuning
from ._read_ahead import ReadAhead as ReadAhead
from ._retry import Retry as Retry
from ._sample_random import SampleRandom as SampleRandom
from ._sample_random import sample_random as sample_random
from ._stats import EpochStats as EpochStats
from ._stats import LoaderStats as LoaderStats
from ._stats import StageStats as StageStats
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
from .plan import CONSUMER as CONSUMER
from .plan import Executor as Executor
from .plan import Plan as Plan
from .plan import Stage as Stage
from .plan import loop as loop
from .plan import processes as processes
from .plan import ray_actors as ray_actors
from .plan import threads as threads

__version__ = _VERSION

__all__ = [
    "CONSUMER",
    "DataLoader",
    "Decision",
    "EpochStats",
    "Executor",
    "LoaderStats",
    "LoaderTimeoutError",
    "ModeChoice",
    "Padded",
    "Plan",
    "ReadAhead",
    "Retry",
    "SampleRandom",
    "Stage",
    "StageStats",
    "Tuning",
    "WorkerInfo",
    "WorkerModeTuning",
    "default_collate",
    "default_convert",
    "get_worker_info",
    "loop",
    "pad_collate",
    "processes",
    "ray_actors",
    "sample_random",
    "threads",
]

# Show aload's own public names as `aload.X`, not as the private module that defines them.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type | _FunctionType) and _obj.__module__.startswith("aload."):
        _obj.__module__ = __name__
del _name, _obj, _FunctionType
