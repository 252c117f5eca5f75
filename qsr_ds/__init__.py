"""qsr-ds: local training with the Quadratic Synchronization Rule for DeepSpeed and FSDP2.

Names are imported lazily so that `qsr-ds plan` and the pure schedule need no torch import.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "LocalOptimizer": "local",
    "QSRConfig": "config",
    "QSRConfigError": "config",
    "ReplicaAverager": "sync.averager",
    "ReplicaMismatchError": "sync.averager",
    "RoundStats": "sync.averager",
    "ScheduleError": "schedule",
    "SyncSchedule": "schedule",
    "SyncTracker": "schedule",
    "Topology": "topology",
    "TopologyError": "topology",
    "fingerprint": "fingerprints",
    "initialize": "deepspeed",
    "zero_init": "deepspeed",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qsr_ds' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
