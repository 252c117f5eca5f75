"""qsr_ds.initialize: deepspeed.initialize with replicas that average at QSR boundaries.

    engine, optimizer, loader, scheduler = qsr_ds.initialize(model=..., optimizer=..., config="ds.json")

Same arguments and return values as deepspeed.initialize. With a "qsr" section in the
config, the world is split into R replicas of S = qsr.ranks_per_replica ranks; DeepSpeed
gets a model-parallel unit (mpu) whose data-parallel group is this rank's replica, so the
gradient all-reduce and the ZeRO partitioning stay inside the replica exactly as without
QSR. The engine is the DeepSpeed engine (its class gains a small subclass): after every
engine.step() that ends a gradient-accumulation boundary the schedule decides, and at a
boundary rank k of every replica averages its fp32 shard with rank k of the others
(qsr_ds/ds_state.py says which tensors per ZeRO stage). engine.qsr is the hook (tracker,
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
import time
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import ds_state
from .averager import AveragerTotals, ReplicaAverager, RoundStats, module_signature
from .config import QSRConfig, QSRConfigError, load as load_qsr_config, read_json
from .schedule import SyncTracker
from .topology import Topology, check_divides


class ReplicaMPU:
    """DeepSpeed's model-parallel unit for one replica: data parallel = the shard group."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        # a one-rank "model parallel" group; only its member takes part in creating it
        self._model_parallel_group = dist.new_group([topology.rank], use_local_synchronization=True)

    def get_data_parallel_group(self):
        return self.topology.shard_group

    def get_data_parallel_rank(self) -> int:
        return self.topology.shard_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topology.ranks_per_replica

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.topology.shard_ranks

    def get_model_parallel_group(self):
        return self._model_parallel_group

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1


class QSRHook:
    """Counts the engine's optimizer steps and averages replicas at QSR boundaries."""

    def __init__(self, engine, config: QSRConfig, topology: Topology) -> None:
        self.engine = engine
        self.config = config
        self.topology = topology
        self.fp16 = bool(engine.fp16_enabled())
        self.tracker = SyncTracker(config.schedule(), self.current_lr())
        self.totals = AveragerTotals()
        self.averager: ReplicaAverager | None = None
        self._plan_key: list | None = None
        self.last_round: RoundStats | None = None
        if topology.num_replicas > 1:
            ds_state.prepare(engine)
            self._start_from_replica0()

    @torch.no_grad()
    def _start_from_replica0(self) -> None:
        """Every replica starts from replica 0's weights, as DDP starts from rank 0's.

        DeepSpeed only broadcasts inside its data-parallel group (the replica), so replicas
        built with different seeds would otherwise start apart. Not counted as a round.
        """
        plan = ds_state.plan(self.engine, ("params",))  # every tensor, not a ZeRO 0 share
        # a round's pre-check first: a replica with other model code fails here by name, on every
        # rank, instead of a broadcast of mismatched sizes aborting gloo or clobbering its shards
        ReplicaAverager(plan.tensors, topology=self.topology, kernel="torch", check_finite=False,
                        signature=module_signature(self.engine.module)).check(what="start-up broadcast from replica 0")
        # the low-precision copies too: under ZeRO 0 they are not always the rounded masters
        for tensor in [t for _, t in plan.tensors] + list(plan.copies.values()):
            dist.broadcast(tensor, group=self.topology.replica_group, group_src=0)
        if self.topology.replica_index != 0:  # replica 0 stays bit for bit plain DeepSpeed
            plan.refresh()

    @property
    def rounds(self) -> int:
        return self.tracker.rounds_done

    @property
    def num_replicas(self) -> int:
        return self.topology.num_replicas

    def current_lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def _agreed_lr(self) -> float:
        """Replica 0's lr: with fp16, a step skipped for overflow leaves a replica's scheduler behind."""
        if self.num_replicas == 1:
            return self.current_lr()
        lr = torch.tensor([self.current_lr()], dtype=torch.float64, device=self.engine.device)
        dist.broadcast(lr, group=self.topology.replica_group, group_src=0)
        return float(lr.item())

    def after_step(self, steps_before: int) -> None:
        """Call after engine.step(); a step skipped for overflow counts too."""
        self.last_round = None
        for _ in range(self.engine.global_steps - steps_before):
            closes = self.tracker.completed_steps + 1 == self.tracker.next_boundary
            lr = self._agreed_lr() if closes and self.fp16 else self.current_lr()
            if self.tracker.on_step(lr):
                self.last_round = self.sync()

    def sync(self) -> RoundStats:
        """Average the replicas now (one round), then refresh the model inside each replica."""
        start = time.perf_counter()
        plan = ds_state.plan(self.engine, self.config.average, self.topology)
        if self.averager is None or plan.key != self._plan_key:
            bucket_mb = self.config.bucket_mb
            if plan.flat_numel:  # flat fp32 shards: all-reduce every one of them in place, no packing
                bucket_mb = min(bucket_mb, 8 * plan.flat_numel / 2**20)
            self.averager = ReplicaAverager(
                plan.tensors,
                topology=self.topology,
                copies=plan.copies,
                bucket_mb=bucket_mb,
                kernel=self.config.kernel,
                check_finite=self.config.check_finite,
                # ZeRO's flat shards hide the parameters: other model code of the same size would pass
                signature=module_signature(self.engine.module),
            )
            self.averager.totals = self.totals
            self._plan_key = plan.key
        stats = self.averager.average(step=self.tracker.completed_steps)
        if self.num_replicas > 1:
            plan.refresh()
            # a round's total_s covers the whole boundary: header, all-reduces and the in-replica refresh
            extra = time.perf_counter() - start - stats.total_s
            stats.total_s += extra
            self.totals.total_s += extra
        return stats

    def state_dict(self) -> dict:
        return ckpt.state_dict(self.tracker, self.totals, self.topology)


class _QSREngineMixin:
    """Overrides of the DeepSpeed engine; the engine class is subclassed at initialize."""

    qsr: QSRHook

    def step(self, *args, **kwargs):
        before = self.global_steps
        out = super().step(*args, **kwargs)
        self.qsr.after_step(before)
        return out

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, exclude_frozen_parameters=False):
        """DeepSpeed's checkpoint of each replica under save_dir/replica<r>/<tag>, plus the QSR state."""
        client_state = dict(client_state or {})
        if "qsr" in client_state:
            raise KeyError('client_state key "qsr" is reserved for qsr-ds')
        tag = str(tag if tag is not None else f"global_step{self.global_steps}")
        topology = self.qsr.topology
        state = self.qsr.state_dict()
        client_state["qsr"] = state
        directory = ckpt.replica_dir(save_dir, topology.replica_index)
        os.makedirs(directory, exist_ok=True)
        ok = super().save_checkpoint(directory, tag, client_state=client_state, save_latest=save_latest,
                                     exclude_frozen_parameters=exclude_frozen_parameters)
        if save_latest and topology.shard_rank == 0 and topology.rank != 0:
            ckpt.write_latest(directory, tag)  # DeepSpeed writes 'latest' on global rank 0 only
        if topology.rank == 0:
            ckpt.write_manifest(save_dir, tag, state, step=self.global_steps, model=ckpt.model_layout(self.module))
            if save_latest:
                ckpt.write_latest(os.fspath(save_dir), tag)
        dist.barrier()
        return ok

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        """Load a checkpoint written by save_checkpoint with the same R and S; returns (path, client_state)."""
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
        directory = ckpt.replica_dir(load_dir, topology.replica_index)
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
        hook.averager = None  # optimizer state tensors were replaced: rebuild the averager's plan
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
    topology = Topology.create(qsr.ranks_per_replica, timeout_s=qsr.timeout_s)
    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(mpu=ReplicaMPU(topology), **kwargs)
    if engine.dp_world_size != qsr.ranks_per_replica:
        raise RuntimeError(
            f"DeepSpeed uses {engine.dp_world_size} data-parallel ranks, expected ranks_per_replica="
            f"{qsr.ranks_per_replica}: this DeepSpeed version ignores the mpu's data-parallel group"
        )
    kind = ds_state.check_supported(engine)
    engine.__class__ = _qsr_engine_class(type(engine))
    engine.qsr = QSRHook(engine, qsr, topology)
    if topology.rank == 0:
        h0 = engine.qsr.tracker.current_h
        print(f"[qsr-ds] {topology.num_replicas} replica(s) x {qsr.ranks_per_replica} rank(s), rule {qsr.rule}, "
              f"first H {h0}, averaging the {kind} fp32 shards", flush=True)
    return engine, ds_optimizer, loader, scheduler


def _check_lr_schedule(ds_config: dict, qsr: QSRConfig, source: str, optimizer) -> None:
    """A scheduler whose lr hits 0 at a round start fails here, not at that round hours later."""
    from .lr import check_planned_rounds

    groups = getattr(optimizer, "param_groups", None)
    base_lr = groups[0].get("lr") if groups and isinstance(groups[0].get("lr"), (int, float)) else None
    check_planned_rounds(ds_config, qsr, source, base_lr=base_lr)


def _check_world(world_size: int, qsr: QSRConfig, source: str) -> None:
    try:
        check_divides(world_size, qsr.ranks_per_replica)
    except ValueError as err:
        raise QSRConfigError(f"{source}: qsr.ranks_per_replica: {err}") from None
