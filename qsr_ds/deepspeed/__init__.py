"""QSR on DeepSpeed: ``initialize`` and the engine hook (hook.py), which tensors each ZeRO stage
averages (state.py), the loader over all ranks (data.py), ``zero_init`` (partition.py), checkpoint
layouts (checkpoint.py) and the replica model-parallel unit (mpu.py)."""
from .hook import QSRHook, initialize
from .partition import zero_init

__all__ = ["QSRHook", "initialize", "zero_init"]
