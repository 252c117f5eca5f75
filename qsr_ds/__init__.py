"""qsr-ds: local training with the Quadratic Synchronization Rule for DeepSpeed and FSDP2."""
from .config import QSRConfig, QSRConfigError
from .schedule import ScheduleError, SyncSchedule, SyncTracker

__version__ = "0.1.0"
__all__ = ["QSRConfig", "QSRConfigError", "ScheduleError", "SyncSchedule", "SyncTracker", "__version__"]
