"""DeepSpeed's model-parallel unit (mpu) for one replica: its data-parallel group is the shard group.

Handed to deepspeed.initialize and to zero.Init so that gradient reduction, ZeRO partitioning
and DeepSpeedConfig's batch-size arithmetic see the replica's S ranks as the data-parallel world.
"""
from __future__ import annotations

import torch.distributed as dist

from ..topology import Topology


class ReplicaMPU:
    """DeepSpeed's model-parallel unit for one replica: data parallel = the shard group."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._model_parallel_group = None

    def get_data_parallel_group(self):
        return self.topology.shard_group

    def get_data_parallel_rank(self) -> int:
        return self.topology.shard_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topology.ranks_per_replica

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.topology.shard_ranks

    def get_model_parallel_group(self):
        if self._model_parallel_group is None:  # one rank; only its member takes part in creating it
            self._model_parallel_group = dist.new_group([self.topology.rank], use_local_synchronization=True)
        return self._model_parallel_group

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1
