"""ZeRO-3 models built under zero.Init: partitioned over the replica's shard group.

    with qsr_ds.zero_init("ds.json"):
        model = Big()
    engine, optimizer, _, _ = qsr_ds.initialize(model=model, optimizer=..., config="ds.json")

``deepspeed.zero.Init`` partitions every parameter over its data-parallel group, the whole
world by default; with replicas ZeRO-3 must shard over the replica's S ranks instead. So the
topology has to exist before the model: ``zero_init`` initializes torch.distributed if
needed, builds the R x S topology (or reuses the one this process has) and returns
``deepspeed.zero.Init(data_parallel_group=<shard group>, config_dict_or_path=config)``;
``qsr_ds.initialize`` then reuses that same topology (``shared_topology``: one per world,
S and timeout, built on every rank in the same order) and, before deepspeed.initialize
builds anything, checks every ZeRO-3 parameter's partition group (``check_partitions``):
a model built under plain ``deepspeed.zero.Init`` fails there on every rank with one error
that names the fix, instead of ZeRO-3's gathers and the replicas' averaging disagreeing on
who holds which slice (a hang).

DeepSpeed internals used (deepspeed 0.19.8): zero.Init(data_parallel_group=, mpu=,
config_dict_or_path=) and its context protocol; the attributes zero.Init sets on each
parameter (ds_id, ds_process_group); DeepSpeedConfig reads only mpu.get_data_parallel_world_size()
(so train_batch_size stays per replica); and partition_parameters.dist, the deepspeed.comm
module that file calls. Its Module.apply wrapper (parent modules' weight init) broadcasts
from global rank 0 whatever the group: on any replica but the first that raises "Global rank
0 is not part of group". Inside ``zero_init`` that module name points at a proxy whose
broadcast reads such a src as the group's own rank 0; every other call goes through unchanged.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..config import QSRConfigError, load as load_qsr_config
from .mpu import ReplicaMPU
from ..topology import Topology, check_divides

_TOPOLOGIES: dict[tuple, tuple[object, Topology]] = {}
"""(world size, S, timeout) -> (the default group it was built in, the topology)."""


class ZeroInitGroupError(QSRConfigError):
    """ZeRO-3 parameters partitioned over another group than the replica's shard group."""


def shared_topology(ranks_per_replica: int, *, timeout_s: float | None = None) -> Topology:
    """This process's R x S topology: built on the first call (a collective: every rank, same order), then reused."""
    if not dist.is_available() or not dist.is_initialized():
        return Topology.create(ranks_per_replica, timeout_s=timeout_s)  # its clear error
    key = (dist.get_world_size(), ranks_per_replica, timeout_s)
    entry = _TOPOLOGIES.get(key)
    if entry is None or entry[0] is not dist.group.WORLD:  # none yet, or from a destroyed process group
        entry = (dist.group.WORLD, Topology.create(ranks_per_replica, timeout_s=timeout_s))
        _TOPOLOGIES[key] = entry
    return entry[1]


class _GroupRankZeroComm:
    """deepspeed.comm, but broadcast(src=r) with global rank r outside the group means the group's rank r."""

    def __init__(self, comm) -> None:
        self._comm = comm

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def broadcast(self, tensor, src, group=None, async_op=False, **kwargs):
        if group is not None and src not in dist.get_process_group_ranks(group):
            src = dist.get_global_rank(group, src)
        return self._comm.broadcast(tensor, src, group=group, async_op=async_op, **kwargs)


class _ShardInit:
    """The deepspeed.zero.Init context over the shard group, with the apply broadcast fixed while inside."""

    def __init__(self, init, topology: Topology) -> None:
        self.init = init
        self.topology = topology
        self._saved = None

    def __enter__(self):
        from deepspeed.runtime.zero import partition_parameters

        self._saved = partition_parameters.dist
        partition_parameters.dist = _GroupRankZeroComm(self._saved)
        try:
            self.init.__enter__()
        except BaseException:
            partition_parameters.dist = self._saved
            raise
        return self.init

    def __exit__(self, *exc):
        from deepspeed.runtime.zero import partition_parameters

        try:
            return self.init.__exit__(*exc)
        finally:
            partition_parameters.dist = self._saved


def zero_init(config, **init_kwargs):
    """``deepspeed.zero.Init`` for replicas: partitions over this rank's replica (its S ranks).

    ``config``: the DeepSpeed JSON (path or dict) that qsr_ds.initialize gets too; its "qsr"
    section gives S. Other keyword arguments go to deepspeed.zero.Init (remote_device,
    pin_memory, dtype, ...), except the group and config ones qsr-ds sets. Without a "qsr"
    section this is plain ``deepspeed.zero.Init(config_dict_or_path=config, ...)``.
    Use as ``with qsr_ds.zero_init(config): model = Big()``.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    qsr = load_qsr_config(config, required=False)  # config errors first, before any traffic
    if qsr is None:
        return deepspeed.zero.Init(config_dict_or_path=config, **init_kwargs)
    source = config if isinstance(config, (str, os.PathLike)) else "<config dict>"
    taken = sorted({"data_parallel_group", "sequence_data_parallel_group", "mpu", "config",
                    "config_dict_or_path", "module"} & set(init_kwargs))
    if taken:
        raise QSRConfigError(f"qsr_ds.zero_init: {', '.join(taken)} cannot be given: qsr-ds partitions over the "
                             "replica's shard group (build the model inside `with qsr_ds.zero_init(config):`)")
    env_world = os.environ.get("WORLD_SIZE")
    for world in ([int(env_world)] if env_world and env_world.isdigit() else []):
        _check_world(world, qsr.ranks_per_replica, source)
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    _check_world(dist.get_world_size(), qsr.ranks_per_replica, source)
    topology = shared_topology(qsr.ranks_per_replica, timeout_s=qsr.timeout_s)
    init = deepspeed.zero.Init(data_parallel_group=topology.shard_group, mpu=ReplicaMPU(topology),
                               config_dict_or_path=config, **init_kwargs)
    return _ShardInit(init, topology)


def _check_world(world_size: int, ranks_per_replica: int, source: str) -> None:
    try:
        check_divides(world_size, ranks_per_replica)
    except ValueError as err:
        raise QSRConfigError(f"{source}: qsr.ranks_per_replica: {err}") from None


def check_partitions(model, topology: Topology, source: str) -> None:
    """Every ZeRO-3 parameter of ``model`` is partitioned over the replica's shard group, on every rank.

    One fixed-size all-reduce over the world group agrees on the verdict, so a mismatch raises
    ZeroInitGroupError on every rank, before deepspeed.initialize (call it right before).
    """
    from deepspeed.accelerator import get_accelerator

    wanted, found = topology.shard_ranks, None
    named = model.named_parameters() if isinstance(model, torch.nn.Module) else ()
    for name, p in named:
        if not hasattr(p, "ds_id"):
            continue
        group = getattr(p, "ds_process_group", None)
        ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
        if ranks != wanted:
            found = (name, ranks)
            break
    flag = torch.tensor([0 if found is None else 1], dtype=torch.int32,
                        device=get_accelerator().current_device_name())
    if topology.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=topology.world_group)
    if not int(flag.item()):
        return
    fix = ("build the model under `with qsr_ds.zero_init(config):` instead of `deepspeed.zero.Init(...)`: it "
           "partitions over the replica's shard group, which qsr_ds.initialize then reuses")
    s = topology.ranks_per_replica
    if found is None:
        raise ZeroInitGroupError(
            f"{source}: ZeRO-3 parameters on another rank were partitioned by deepspeed.zero.Init over another group "
            f"than their replica's {s} ranks; {fix}")
    name, ranks = found
    raise ZeroInitGroupError(
        f"{source}: parameter {name!r} was partitioned by deepspeed.zero.Init over {len(ranks)} ranks {ranks}, but "
        f"with qsr ZeRO-3 shards over the {s} ranks of each replica ({wanted} for this rank); {fix}")
