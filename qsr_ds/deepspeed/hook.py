"""qsr_ds.initialize: deepspeed.initialize with replicas that average at QSR boundaries.

    engine, optimizer, loader, scheduler = qsr_ds.initialize(model=..., optimizer=..., config="ds.json")

Same arguments and return values as deepspeed.initialize. With a "qsr" section in the
config, the world is split into R replicas of S = qsr.ranks_per_replica ranks; DeepSpeed
gets a model-parallel unit (mpu) whose data-parallel group is this rank's replica, so the
gradient all-reduce and the ZeRO partitioning stay inside the replica exactly as without
QSR. The engine is the DeepSpeed engine (its class gains a small subclass): after every
engine.step() that ends a gradient-accumulation boundary the schedule decides, and at a
boundary rank k of every replica averages its fp32 shard with rank k of the others
(qsr_ds/deepspeed/state.py says which tensors per ZeRO stage). engine.qsr is the hook (tracker,
totals, last round). Without a "qsr" section this is plain deepspeed.initialize.

Batch size: DeepSpeed sees S data-parallel ranks, so train_batch_size in the JSON is per
replica (micro batch x gradient accumulation x S); one optimizer step of the whole job
consumes R times that.

DeepSpeed internals this hook relies on (checked against deepspeed 0.19.8; re-check them on
an upgrade; tests/dist/test_deepspeed.py pins the behaviour):
  deepspeed.initialize(mpu=...): the mpu methods get_data_parallel_group / _rank /
    _world_size / _group_ranks, get_model_parallel_group / _rank / _world_size (engine,
    ZeRO, DeepSpeedConfig batch-size arithmetic, checkpoint file names)
  deepspeed.init_distributed, deepspeed.accelerator.get_accelerator().communication_backend_name()
  deepspeed.utils.bwc.bwc_tensor_model_parallel_world_size / bwc_pipeline_parallel_world_size
    (to refuse a user mpu with model parallelism)
  DeepSpeedEngine: step(), global_steps (advances once per accumulation boundary, also for
    a step skipped on fp16 overflow), get_lr(), fp16_enabled(), zero_optimization_stage(),
    optimizer, basic_optimizer (the wrapped torch optimizer; holds exp_avg / exp_avg_sq
    keyed by the fp32 shards), module, device, has_moe_layers,
    save_checkpoint(save_dir, tag, client_state, save_latest, exclude_frozen_parameters)
    (writes <save_dir>/<tag>/..., 'latest' only on global rank 0),
    load_checkpoint(...) -> (path, client_state), the unknown top-level "qsr" key being kept
  ZeRO 1/2 DeepSpeedZeroOptimizer: single_partition_of_fp32_groups, update_lp_params(), cpu_offload
  ZeRO 3 DeepSpeedZeroOptimizer_Stage3: fp32_partitioned_groups_flat, _partition_all_parameters(),
    _reassign_or_swap_out_partitioned_parameters(i), _post_step(timer_names),
    offload_optimizer, offload_param
  BF16_Optimizer: fp32_groups_flat_partition, update_lp_params()
  FP16_Optimizer: fp32_groups_flat, fp16_groups_flat;  FP16_UnfusedOptimizer: fp32_groups, fp16_groups
  deepspeed.runtime.pipe.PipelineModule (refused)
"""
from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from ..config import QSRConfig, QSRConfigError, load as load_qsr_config, read_json
from ..planning.lr import check_planned_rounds
from ..schedule import SyncTracker
from ..sync import checkpoint as ckpt
from ..sync.core import SyncCore, SyncPlan
from ..topology import Topology, check_divides
from . import checkpoint as ds_checkpoint
from . import data as ds_data
from . import state as ds_state
from . import partition
from .mpu import ReplicaMPU


class QSRHook(SyncCore):
    """The DeepSpeed adapter: averages ZeRO 0-3's fp32 shards (qsr_ds/deepspeed/state.py) after engine.step().

    Every optimizer step the engine counts (engine.global_steps, which also advances for a
    step DeepSpeed skipped on NaN/Inf gradients, in every dtype) is counted here; the core
    agrees the learning rate across replicas at every round, so a replica whose scheduler
    fell behind after a skipped step still decides the same H.
    """

    def __init__(self, engine, config: QSRConfig, topology: Topology) -> None:
        self.engine = engine
        self.config = config
        super().__init__(schedule=config.schedule(), topology=topology, settings=config.settings())
        if topology.num_replicas > 1:
            ds_state.prepare(engine)
            self.start_from_replica0()

    def sync_plan(self) -> SyncPlan:
        return ds_state.plan(self.engine, self.settings.average, self.topology)

    def broadcast_plan(self) -> SyncPlan:
        return ds_state.plan(self.engine, ("params",))  # every tensor, not a ZeRO 0 share

    def current_lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def after_step(self, steps_before: int) -> None:
        """Call after engine.step(): counts the optimizer steps it completed (0 between accumulation boundaries)."""
        self.after_steps(self.engine.global_steps - steps_before)

    def state_dict(self) -> dict:
        return self.qsr_state_dict()


class _QSREngineMixin:
    """Overrides of the DeepSpeed engine; the engine class is subclassed at initialize."""

    qsr: QSRHook

    def step(self, *args, **kwargs):
        before = self.global_steps
        out = super().step(*args, **kwargs)
        self.qsr.after_step(before)
        return out

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, exclude_frozen_parameters=False,
                        *, one_replica: bool | None = None):
        """DeepSpeed's checkpoint under save_dir/replica<r>/<tag> plus the QSR state; every rank must call it.

        Right after a boundary, when every replica holds the same state (the optimizer state
        averaged too: qsr.average with "exp_avg" and "exp_avg_sq" for Adam, "momentum" for SGD;
        buffers averaged or none; no step skipped on only some replicas), only replica 0's
        files are written (1/R of the bytes) and every replica resumes from them, exactly.
        Otherwise (mid-round, or optimizer state kept local, the paper's default) every
        replica writes its own. The manifest save_dir/<tag>.qsr.json records which layout.
        ``one_replica``: None (default) picks the one-replica layout wherever it is exact;
        True insists on it (QSRCheckpointError on every rank, nothing written, where it is
        not exact); False always writes every replica. The client state of a one-replica save
        is replica 0's, as plain DeepSpeed keeps data-parallel rank 0's.
        """
        client_state = dict(client_state or {})
        if "qsr" in client_state:
            raise KeyError('client_state key "qsr" is reserved for qsr-ds')
        tag = str(tag if tag is not None else f"global_step{self.global_steps}")
        topology = self.qsr.topology
        state = self.qsr.state_dict()
        client_state["qsr"] = state
        tensors = self.qsr.qsr_tensor_state()  # waits for a round in flight; per rank, so every replica writes
        if tensors and one_replica:
            raise ckpt.QSRCheckpointError(
                f"{save_dir}: one_replica=True, but each rank holds its own QSR tensors (a round in flight or "
                "compression residuals); save with one_replica=None or False"
            )
        layout = ds_checkpoint.choose_layout(self, self.qsr, False if tensors else one_replica)
        writer = ckpt.source_replica(layout, topology.replica_index)
        directory = ckpt.replica_dir(save_dir, writer)
        os.makedirs(directory, exist_ok=True)
        ckpt.write_tensor_state(os.path.join(directory, tag), topology, tensors)
        with ds_checkpoint.writes_discarded(self, writer != topology.replica_index):  # its collectives still run
            ok = super().save_checkpoint(directory, tag, client_state=client_state, save_latest=save_latest,
                                         exclude_frozen_parameters=exclude_frozen_parameters)
        if save_latest and topology.shard_rank == 0 and topology.rank != 0 and writer == topology.replica_index:
            ckpt.write_latest(directory, tag)  # DeepSpeed writes 'latest' on global rank 0 only
        if topology.rank == 0:
            ckpt.write_manifest(save_dir, tag, state, step=self.global_steps, model=ckpt.model_layout(self.module),
                                layout=layout)
            if save_latest:
                ckpt.write_latest(os.fspath(save_dir), tag)
        dist.barrier()
        return ok

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        """Load a checkpoint written by save_checkpoint with the same R and S; returns (path, client_state).

        A one-replica checkpoint (see save_checkpoint) is read by every replica from replica0/.
        """
        topology, hook = self.qsr.topology, self.qsr
        error = manifest = None
        try:
            tag = str(tag) if tag is not None else ckpt.read_latest(load_dir)
            if tag is not None:
                manifest = ckpt.read_manifest(load_dir, tag)
                source = ckpt.manifest_path(load_dir, tag)
                ckpt.check_layout(manifest, topology, source)
                ckpt.check_files(load_dir, manifest, topology.replica_index)
                if load_module_strict:
                    ckpt.check_model(manifest, self.module, source)
                if not load_module_only:
                    ckpt.check_schedule(SyncTracker(hook.tracker.schedule, 1.0), manifest, source)
        except ckpt.QSRCheckpointError as err:
            error = err
        ckpt.agree(error)
        if tag is None:
            return None, None
        directory = ckpt.replica_dir(load_dir, ckpt.source_replica(ckpt.manifest_layout(manifest), topology.replica_index))
        try:
            path, client_state = super().load_checkpoint(
                directory, tag, load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
                load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
                custom_load_fn=custom_load_fn)
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise ckpt.QSRCheckpointError(
                f"{os.path.join(directory, tag)}: the engine could not read its checkpoint files "
                f"(corrupt?): {type(err).__name__}: {err}"
            ) from err
        if path is None:
            raise ckpt.QSRCheckpointError(f"{os.path.join(directory, tag)}: the engine found no checkpoint to load")
        client_state = dict(client_state or {})
        saved = client_state.pop("qsr", None)
        error = None
        if not load_module_only:
            try:
                ckpt.load_state(hook.tracker, hook.totals, saved, manifest, topology, path)
                if hook.tracker.completed_steps != self.global_steps:
                    raise ckpt.QSRCheckpointError(
                        f"{path}: QSR state is at step {hook.tracker.completed_steps}, the engine at {self.global_steps}"
                    )
            except ckpt.QSRCheckpointError as err:
                error = err
            ckpt.agree(error)
        # optimizer state tensors were replaced: the next round rebuilds its averager; a round saved in
        # flight and compression anchors come back from this rank's own file
        hook.load_qsr_tensor_state(ckpt.read_tensor_state(os.path.join(directory, tag), topology))
        return path, client_state


_ENGINE_CLASSES: dict[type, type] = {}


def _qsr_engine_class(base: type) -> type:
    if base not in _ENGINE_CLASSES:
        _ENGINE_CLASSES[base] = type(f"QSR{base.__name__}", (_QSREngineMixin, base), {})
    return _ENGINE_CLASSES[base]


def _resolve_config(args, config, config_params) -> tuple[Any, str]:
    """The config deepspeed.initialize will use (a path or a dict), without reading it twice."""
    if config is None and config_params is not None:
        config = config_params
    from_args = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if config is None and from_args is not None:
        config = from_args
    if config is None:
        raise QSRConfigError("qsr_ds.initialize: no DeepSpeed config (pass config= or args.deepspeed_config)")
    return config, (config if isinstance(config, (str, os.PathLike)) else "<config dict>")


def _check_batch(ds_config: dict, qsr: QSRConfig, world_size: int, source: str) -> None:
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    gas = ds_config.get("gradient_accumulation_steps", 1)
    total = ds_config.get("train_batch_size")
    replicas = world_size // qsr.ranks_per_replica
    if not all(isinstance(v, int) for v in (micro, gas, total)) or replicas == 1:
        return
    if total != micro * gas * qsr.ranks_per_replica and total == micro * gas * world_size:
        raise QSRConfigError(
            f"{source}: train_batch_size is per replica with qsr: micro batch {micro} x gradient accumulation "
            f"{gas} x {qsr.ranks_per_replica} ranks per replica = {micro * gas * qsr.ranks_per_replica}, "
            f"not {total} (that counts all {replicas} replicas)"
        )


def _check_user_mpu(mpu, world_size: int) -> None:
    """A user mpu is accepted only when it has no model parallelism (the replica mpu replaces it)."""
    from deepspeed.utils.bwc import bwc_pipeline_parallel_world_size, bwc_tensor_model_parallel_world_size

    tp, pp = bwc_tensor_model_parallel_world_size(mpu), bwc_pipeline_parallel_world_size(mpu)
    sp = mpu.get_sequence_parallel_world_size() if hasattr(mpu, "get_sequence_parallel_world_size") else 1
    dp = mpu.get_data_parallel_world_size()
    if (tp, pp, sp) != (1, 1, 1) or dp != world_size:
        raise QSRConfigError(
            f"qsr_ds.initialize: the mpu passed in has tensor/pipeline/sequence parallel sizes {tp}/{pp}/{sp} and "
            f"data parallel size {dp} of {world_size} ranks; qsr-ds builds replicas from contiguous blocks of "
            "ranks_per_replica ranks and does not compose with model parallelism yet. Pass mpu=None, or train "
            "without a \"qsr\" section"
        )


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, distributed_port: int | None = None, mpu=None, dist_init_required=None,
               collate_fn=None, config=None, mesh_param=None, config_params=None):
    """deepspeed.initialize plus QSR; returns (engine, optimizer, training_dataloader, lr_scheduler)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    kwargs = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                  training_data=training_data, lr_scheduler=lr_scheduler, dist_init_required=dist_init_required,
                  collate_fn=collate_fn, config=config, mesh_param=mesh_param, config_params=config_params)
    if distributed_port is not None:
        kwargs["distributed_port"] = distributed_port
    resolved, source = _resolve_config(args, config, config_params)
    qsr = load_qsr_config(resolved, required=False)  # every config error is raised here, before any traffic
    if qsr is None:
        return deepspeed.initialize(mpu=mpu, **kwargs)
    ds_config = resolved if isinstance(resolved, dict) else read_json(resolved)
    if mesh_param is not None or "sequence_parallel_size" in ds_config:
        raise QSRConfigError(f"{source}: qsr-ds does not combine with mesh_param / sequence parallelism yet")
    from deepspeed.runtime.pipe import PipelineModule

    if isinstance(model, PipelineModule):
        raise QSRConfigError(f"{source}: qsr-ds does not support pipeline parallelism (PipelineModule) yet")
    _check_lr_schedule(ds_config, qsr, source, optimizer)
    env_world = os.environ.get("WORLD_SIZE")
    if env_world is not None and env_world.isdigit():
        _check_world(int(env_world), qsr, source)
        _check_batch(ds_config, qsr, int(env_world), source)
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               dist_init_required=dist_init_required,
                               **({"distributed_port": distributed_port} if distributed_port is not None else {}))
    world = dist.get_world_size()
    _check_world(world, qsr, source)
    _check_batch(ds_config, qsr, world, source)
    if mpu is not None:
        _check_user_mpu(mpu, world)
        if dist.get_rank() == 0:
            print("[qsr-ds] the mpu passed in has no model parallelism; DeepSpeed gets the replica mpu instead "
                  f"(data parallel = the {qsr.ranks_per_replica} ranks of a replica)", flush=True)
    # the topology qsr_ds.zero_init built the model's ZeRO-3 partitions over, if any; then refuse others
    topology = partition.shared_topology(qsr.ranks_per_replica, timeout_s=qsr.timeout_s)
    partition.check_partitions(model, topology, source)
    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(mpu=ReplicaMPU(topology), **kwargs)
    if engine.dp_world_size != qsr.ranks_per_replica:
        raise RuntimeError(
            f"DeepSpeed uses {engine.dp_world_size} data-parallel ranks, expected ranks_per_replica="
            f"{qsr.ranks_per_replica}: this DeepSpeed version ignores the mpu's data-parallel group"
        )
    kind = ds_state.check_supported(engine)
    loader = ds_data.shard_over_world(engine, training_data, source)  # every rank of every replica its own samples
    engine.__class__ = _qsr_engine_class(type(engine))
    engine.qsr = QSRHook(engine, qsr, topology)
    if topology.rank == 0:
        h0 = engine.qsr.tracker.current_h
        print(f"[qsr-ds] {topology.num_replicas} replica(s) x {qsr.ranks_per_replica} rank(s), rule {qsr.rule}, "
              f"first H {h0}, averaging the {kind} fp32 shards", flush=True)
    return engine, ds_optimizer, loader, scheduler


def _check_lr_schedule(ds_config: dict, qsr: QSRConfig, source: str, optimizer) -> None:
    """A scheduler whose lr hits 0 at a round start fails here, not at that round hours later."""
    groups = getattr(optimizer, "param_groups", None)
    base_lr = groups[0].get("lr") if groups and isinstance(groups[0].get("lr"), (int, float)) else None
    check_planned_rounds(ds_config, qsr, source, base_lr=base_lr)


def _check_world(world_size: int, qsr: QSRConfig, source: str) -> None:
    try:
        check_divides(world_size, qsr.ranks_per_replica)
    except ValueError as err:
        raise QSRConfigError(f"{source}: qsr.ranks_per_replica: {err}") from None
