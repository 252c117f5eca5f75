"""The training loader of qsr_ds.initialize: DeepSpeed's own loader, sharded over all R x S ranks.

DeepSpeed builds the loader of ``deepspeed.initialize(training_data=...)`` with a
DistributedSampler over the mpu's data-parallel world. With replicas that world is the
replica's S ranks, so rank k of every replica would read the same samples and R - 1
replicas' compute would be wasted. Here the loader is rebuilt the way plain DeepSpeed over
the whole world builds it: the same DeepSpeedDataLoader (micro batch of the JSON, the
engine's collate_fn, dataloader_drop_last, tput timer), with a
``DistributedSampler(dataset, num_replicas=world, rank=global rank)``: every rank reads
distinct samples, exactly the ones plain DeepSpeed over R x S ranks gives that rank.
Epochs work as in DeepSpeed: call ``loader.data_sampler.set_epoch(epoch)`` before each.

DeepSpeed internals used (deepspeed 0.19.8): DeepSpeedEngine.deepspeed_io(dataset,
data_sampler=...) (route train: micro batch, collate_fn, drop_last and the tput timer come
from the engine), engine.training_dataloader (replaced), engine.curriculum_learning_enabled()
(its DeepSpeedDataSampler ignores a given sampler and shards over the mpu: refused).
"""
from __future__ import annotations

import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from ..config import QSRConfigError


def world_sampler(dataset) -> DistributedSampler:
    """DeepSpeed's default training sampler, over every rank of the world instead of one replica."""
    return DistributedSampler(dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank())


def shard_over_world(engine, training_data, source: str):
    """Replace the loader deepspeed.initialize built (replica-sharded) by one over all ranks; returns it."""
    if engine.training_dataloader is None:  # no training_data, or one DeepSpeed ignores (empty)
        return None
    if engine.curriculum_learning_enabled():
        raise QSRConfigError(
            f"{source}: data_efficiency curriculum learning with training_data= is not supported with qsr: "
            "DeepSpeed's curriculum sampler shards over one replica's ranks, so every replica would read the same "
            "samples; build the loader yourself with a sampler over all ranks, or turn curriculum learning off"
        )
    engine.training_dataloader = engine.deepspeed_io(training_data, data_sampler=world_sampler(training_data))
    return engine.training_dataloader
