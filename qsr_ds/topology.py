"""Replicas of sharded models: the shard group and the replica group of this rank.

world = R replicas x S ranks per replica. Replica r holds ranks [r*S, (r+1)*S); the
replica group of shard rank k is {k, S+k, 2S+k, ...}: the ranks that hold the same shard
in every replica, which average with each other at a boundary.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


class TopologyError(ValueError):
    """A world that cannot be split into replicas of ranks_per_replica ranks."""


@dataclass(frozen=True, kw_only=True)
class Topology:
    """This rank's place in an R x S world and its two process groups."""

    world_size: int
    """All ranks, R * S."""
    rank: int
    """This rank in the default group."""
    ranks_per_replica: int
    """S: ranks inside one replica (ZeRO / FSDP shard over them)."""
    shard_group: dist.ProcessGroup | None
    """The S ranks of this rank's replica (gradients are reduced here every step)."""
    replica_group: dist.ProcessGroup | None
    """Rank k of every replica (averaged here at QSR boundaries only)."""
    world_group: dist.ProcessGroup | None = None
    """All ranks, with the QSR timeout; used only on the pre-check's error path (to name the culprit)
    and by checkpoint agreement. None uses the default group."""

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.ranks_per_replica

    @property
    def replica_index(self) -> int:
        return self.rank // self.ranks_per_replica

    @property
    def shard_rank(self) -> int:
        return self.rank % self.ranks_per_replica

    @property
    def shard_ranks(self) -> list[int]:
        """Global ranks of this rank's replica (its shard group)."""
        return ranks_of_replica(self.replica_index, self.ranks_per_replica)

    @property
    def replica_group_ranks(self) -> list[int]:
        """Global ranks of this rank's replica group: shard rank k of every replica."""
        return list(range(self.shard_rank, self.world_size, self.ranks_per_replica))

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: replica {self.replica_index} of {self.num_replicas}, "
            f"shard {self.shard_rank} of {self.ranks_per_replica}"
        )

    @classmethod
    def create(
        cls, ranks_per_replica: int, *, timeout_s: float | None = None, backend: str | None = None
    ) -> Topology:
        """Build both groups; every rank must call this, in the same order as other new_group calls."""
        if not dist.is_available() or not dist.is_initialized():
            raise TopologyError(
                "torch.distributed is not initialized: call dist.init_process_group (or launch with "
                "torchrun / the deepspeed launcher) before building the QSR topology"
            )
        world_size, rank = dist.get_world_size(), dist.get_rank()
        check_divides(world_size, ranks_per_replica)
        timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
        num_replicas = world_size // ranks_per_replica
        world_group = dist.new_group(list(range(world_size)), timeout=timeout, backend=backend)
        shard_group = replica_group = None
        for r in range(num_replicas):
            group = dist.new_group(ranks_of_replica(r, ranks_per_replica), timeout=timeout, backend=backend)
            if r == rank // ranks_per_replica:
                shard_group = group
        for k in range(ranks_per_replica):
            group = dist.new_group(list(range(k, world_size, ranks_per_replica)), timeout=timeout, backend=backend)
            if k == rank % ranks_per_replica:
                replica_group = group
        return cls(
            world_size=world_size,
            rank=rank,
            ranks_per_replica=ranks_per_replica,
            shard_group=shard_group,
            replica_group=replica_group,
            world_group=world_group,
        )


def ranks_of_replica(replica_index: int, ranks_per_replica: int) -> list[int]:
    """Global ranks of one replica."""
    start = replica_index * ranks_per_replica
    return list(range(start, start + ranks_per_replica))


def check_divides(world_size: int, ranks_per_replica: int) -> None:
    if isinstance(ranks_per_replica, bool) or not isinstance(ranks_per_replica, int) or ranks_per_replica < 1:
        raise TopologyError(f"ranks_per_replica must be an integer >= 1, got {ranks_per_replica!r}")
    if world_size % ranks_per_replica:
        raise TopologyError(
            f"world size {world_size} is not a multiple of ranks_per_replica={ranks_per_replica}: "
            f"cannot split it into replicas of {ranks_per_replica} ranks"
        )
