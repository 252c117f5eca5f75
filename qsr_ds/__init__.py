"""qsr-ds: local training with the Quadratic Synchronization Rule for DeepSpeed and FSDP2."""
from .averager import ReplicaAverager, ReplicaMismatchError, RoundStats
from .config import QSRConfig, QSRConfigError
from .local import LocalOptimizer
from .schedule import ScheduleError, SyncSchedule, SyncTracker
from .topology import Topology, TopologyError

__version__ = "0.1.0"


def initialize(*args, **kwargs):
    """``deepspeed.initialize`` with a "qsr" section honoured; see qsr_ds.deepspeed."""
    from .deepspeed import initialize as _initialize

    return _initialize(*args, **kwargs)


__all__ = [
    "LocalOptimizer",
    "QSRConfig",
    "QSRConfigError",
    "ReplicaAverager",
    "ReplicaMismatchError",
    "RoundStats",
    "ScheduleError",
    "SyncSchedule",
    "SyncTracker",
    "Topology",
    "TopologyError",
    "initialize",
    "__version__",
]
