"""QSR on FSDP2: the (replicate, shard) mesh and sharding (mesh.py), the optimizer hook that runs
rounds (hook.py), and checkpoints through torch.distributed.checkpoint (checkpoint.py)."""
from .hook import FSDPQSR
from .mesh import (MESH_DIMS, FSDPSetupError, check_mesh, check_sharded, default_blocks, init_mesh, local_tensors,
                   shard_model, topology_of)

__all__ = ["FSDPQSR", "FSDPSetupError", "MESH_DIMS", "check_mesh", "check_sharded", "default_blocks", "init_mesh",
           "local_tensors", "shard_model", "topology_of"]
