"""QSR for FSDP2: replicas of a model sharded by ``fully_shard`` on a (replicate, shard) mesh.

    mesh = init_mesh(ranks_per_replica=S)                 # ("replicate", "shard") = (R, S)
    model = shard_model(model, mesh, mp_policy=...)       # fully_shard over mesh["shard"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=...)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, ...)
    qsr = FSDPQSR(model, optimizer, mesh=mesh, qsr=config, lr_scheduler=sched)
    for batch in data:
        loss(model, batch).backward()    # micro-steps: model.set_requires_gradient_sync(False)
        optimizer.step()                 # the hook counts it and averages at a boundary
        optimizer.zero_grad()            # no sched.step(): QSR steps the scheduler it was given

Inside a replica FSDP2 runs as usual (reduce-scatter of gradients every step over the S
ranks of mesh["shard"]). At a QSR boundary each rank averages its *local shards* (the
fp32 sharded parameters, ``p.to_local()``; with a bf16 MixedPrecisionPolicy these are
the fp32 masters, and FSDP casts them again at the next all-gather) with the same shard
of every other replica, over mesh["replicate"], through the shared ReplicaAverager. No
full parameter is ever gathered. Optimizer state (DTensor shards) and buffers are
averaged when ``average`` asks for them.

The LR of the next step. QSR decides H from the learning rate the *next* optimizer step
will use. A post-step hook on the optimizer runs inside ``optimizer.step()``, before a
user's ``lr_scheduler.step()``, so the LR it sees is the current step's, one step stale.
Therefore, when ``lr_scheduler`` is given, QSR owns it: the hook steps the scheduler
right after the optimizer step and then reads ``param_groups[0]["lr"]``, which is then
exactly the LR of the next step. The training loop must not call ``sched.step()`` itself;
if it does, the next optimizer step raises (the scheduler's ``last_epoch`` moved behind
QSR's back). Without a scheduler the hook reads the LR the optimizer holds after the step,
which is the next step's LR only if nothing changes it in between (a constant LR); a loop
that sets the LR by hand should express it as a scheduler (e.g. LambdaLR) and hand that
to QSR. A scheduler given to QSR must step once per optimizer step with no arguments (not
ReduceLROnPlateau, not per epoch); with such a scheduler H is decided from a possibly stale
LR. A plain hook was preferred
to a ``qsr.step()`` wrapper so that a direct ``optimizer.step()``, as FSDP code usually
calls it, can never be missed by the step count.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from . import checkpoint
from .config import AVERAGE_CHOICES, QSRConfig
from .core import SyncCore, SyncPlan, SyncSettings
from .schedule import SyncSchedule
from .selection import averaged_tensors
from .topology import Topology, TopologyError, check_divides

MESH_DIMS = ("replicate", "shard")


class FSDPSetupError(ValueError):
    """A model, mesh or optimizer that QSR on FSDP2 cannot work with; the message says why."""


_MESH_TOPOLOGIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Mesh built by init_mesh -> the Topology whose process groups (with the QSR timeout) it uses."""


def init_mesh(ranks_per_replica: int, *, device_type: str | None = None, timeout_s: float | None = 600.0) -> DeviceMesh:
    """The 2-D ("replicate", "shard") mesh of R x S ranks, R = world_size / S.

    Replica r is ranks [r*S, (r+1)*S) (the same layout as Topology.create). Every rank
    must call it. ``device_type`` defaults to "cuda" when CUDA is available, else "cpu".
    The mesh is built on Topology.create's groups, so FSDP's collectives inside a replica and
    QSR's rounds share them and their ``timeout_s`` (a dead rank fails them instead of
    hanging; under NCCL the watchdog ends the job, see docs/reliability.md).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise TopologyError("torch.distributed is not initialized: call dist.init_process_group (or use torchrun) first")
    world = dist.get_world_size()
    check_divides(world, ranks_per_replica)
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    topology = Topology.create(ranks_per_replica, timeout_s=timeout_s)
    layout = torch.arange(world).view(world // ranks_per_replica, ranks_per_replica)
    mesh = DeviceMesh.from_group([topology.replica_group, topology.shard_group], device_type, mesh=layout,
                                 mesh_dim_names=MESH_DIMS)
    _MESH_TOPOLOGIES[mesh] = topology
    return mesh


def check_mesh(mesh: DeviceMesh) -> tuple[int, int]:
    """(R, S) of a user's mesh; raises FSDPSetupError unless it is a world-covering R x S mesh."""
    if not isinstance(mesh, DeviceMesh):
        raise FSDPSetupError(f"mesh must be a torch DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 2 or tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise FSDPSetupError(
            f"QSR needs a 2-D mesh with dims {MESH_DIMS} (build it with init_mesh(S)); got dims "
            f"{mesh.mesh_dim_names} of shape {tuple(mesh.mesh.shape)}"
        )
    world = dist.get_world_size()
    num_replicas, per_replica = (int(n) for n in mesh.mesh.shape)
    if num_replicas * per_replica != world:
        raise FSDPSetupError(
            f"mesh shape {num_replicas} x {per_replica} (replicate x shard) covers {num_replicas * per_replica} ranks "
            f"but the world has {world}"
        )
    if mesh.mesh.flatten().tolist() != list(range(world)):
        raise FSDPSetupError(
            f"mesh {mesh.mesh.tolist()} does not put replica r on ranks [r*S, (r+1)*S); build it with init_mesh(S)"
        )
    return num_replicas, per_replica


def topology_of(mesh: DeviceMesh, *, timeout_s: float | None = 600.0) -> Topology:
    """The QSR Topology of a mesh: init_mesh's own; for a mesh built otherwise (whose groups may
    have no timeout), new replica and shard groups of the same layout with ``timeout_s``."""
    _, per_replica = check_mesh(mesh)
    known = _MESH_TOPOLOGIES.get(mesh)
    return known if known is not None else Topology.create(per_replica, timeout_s=timeout_s)


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules ``shard_model`` wraps by default: each child that holds parameters.

    Containers without a forward of their own (ModuleList, ModuleDict) are entered, so a
    GPT's transformer blocks are wrapped one by one. A child sharing a parameter with
    another (tied embeddings) is left to the root group.
    """
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                visit(child)
            elif any(True for _ in child.parameters()):
                found.append(child)

    visit(model)
    owners: dict[int, int] = {}
    for block in found:
        for p in block.parameters():
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [b for b in found if all(owners[id(p)] == 1 for p in b.parameters())]


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    blocks: Iterable[nn.Module] | Callable[[nn.Module], bool] | None = None,
    **fully_shard_kwargs,
) -> nn.Module:
    """``fully_shard`` each block and then the root over ``mesh["shard"]``; returns the model.

    ``blocks``: the modules to wrap (in that order), or a predicate over
    ``model.modules()``; None takes ``default_blocks(model)``. Extra keyword arguments
    (mp_policy, reshard_after_forward, ...) go to every ``fully_shard`` call.
    """
    check_mesh(mesh)
    if isinstance(model, FSDPModule):
        raise FSDPSetupError("the model is already wrapped by fully_shard; pass it to FSDPQSR directly")
    if blocks is None:
        chosen = default_blocks(model)
    elif callable(blocks) and not isinstance(blocks, nn.Module):
        chosen = [m for m in model.modules() if m is not model and blocks(m)]
    else:
        chosen = list(blocks)
    for block in chosen:
        fully_shard(block, mesh=mesh["shard"], **fully_shard_kwargs)
    fully_shard(model, mesh=mesh["shard"], **fully_shard_kwargs)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def local_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None, average: Iterable[str]) -> list[tuple[str, torch.Tensor]]:
    """What a boundary averages on this rank: local shards, named, in a replica-independent order."""
    with torch.no_grad():
        return averaged_tensors(model, optimizer, average, local=_local)


def check_sharded(model: nn.Module, mesh: DeviceMesh) -> None:
    """Raise FSDPSetupError unless every parameter is a shard over this rank's mesh["shard"]."""
    if not isinstance(model, FSDPModule):
        raise FSDPSetupError(
            f"{type(model).__name__} is not wrapped by FSDP2: call qsr_ds.fsdp.shard_model(model, mesh) "
            "(or fully_shard(model, mesh=mesh['shard'])) before attaching QSR"
        )
    want = mesh["shard"].mesh.tolist()
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            raise FSDPSetupError(f"parameter {name} is not sharded by FSDP2 (a plain tensor); wrap the root with fully_shard")
        if p.device_mesh.mesh.tolist() != want:
            raise FSDPSetupError(
                f"parameter {name} is sharded over ranks {p.device_mesh.mesh.tolist()} but QSR's shard dim is {want}: "
                "apply fully_shard with mesh=mesh['shard'] (a replicate dim in FSDP's mesh, HSDP, would all-reduce "
                "over replicas every step)"
            )


class FSDPQSR(SyncCore):
    """Counts the optimizer's steps (a post-step hook) and averages replicas at QSR boundaries.

    ``qsr`` is a QSRConfig (its average / bucket_mb / kernel / check_finite / timeout_s are
    used and its ranks_per_replica must equal the mesh's S) or a bare SyncSchedule. See the
    module docstring for how the LR of the next step is read. At construction every replica
    takes replica 0's local shards and buffers (as DDP starts from rank 0). Use as a context
    manager, or call ``close()``, to remove the hook.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        mesh: DeviceMesh,
        qsr: QSRConfig | SyncSchedule,
        lr_scheduler=None,
        grad_scaler: torch.amp.GradScaler | None = None,
        average: Iterable[str] | None = None,
        bucket_mb: float | None = None,
        kernel: str | None = None,
        check_finite: bool | None = None,
    ) -> None:
        num_replicas, per_replica = check_mesh(mesh)
        check_sharded(model, mesh)
        config = qsr if isinstance(qsr, QSRConfig) else None
        if config is not None and config.ranks_per_replica != per_replica:
            raise FSDPSetupError(
                f"{config.source}: qsr.ranks_per_replica={config.ranks_per_replica} but the mesh has "
                f"{per_replica} ranks per replica ({num_replicas} x {per_replica})"
            )
        schedule = config.schedule() if config is not None else qsr
        if not isinstance(schedule, SyncSchedule):
            raise TypeError(f"qsr must be a QSRConfig or a SyncSchedule, got {type(qsr).__name__}")

        def pick(value, key, default):
            return value if value is not None else getattr(config, key) if config is not None else default

        averaged = tuple(dict.fromkeys(("params", *pick(average, "average", ("params",)))))
        unknown = set(averaged) - set(AVERAGE_CHOICES)
        if unknown:
            raise FSDPSetupError(f"average: unknown entries {sorted(unknown)}; expected some of {AVERAGE_CHOICES}")
        self.model, self.optimizer, self.mesh, self.lr_scheduler = model, optimizer, mesh, lr_scheduler
        settings = SyncSettings(average=averaged, bucket_mb=pick(bucket_mb, "bucket_mb", 64.0),
                                kernel=pick(kernel, "kernel", "auto"), check_finite=pick(check_finite, "check_finite", True),
                                overlap_steps=pick(None, "overlap_steps", 0), compress=pick(None, "compress", None),
                                compress_route=pick(None, "compress_route", "gather"))
        super().__init__(schedule=schedule, topology=topology_of(mesh, timeout_s=pick(None, "timeout_s", 600.0)),
                         settings=settings)
        self.start_from_replica0()
        self._paused = False
        self._sched_epoch = self._scheduler_epoch()
        self._hook = optimizer.register_step_post_hook(self._after_step)
        self._stepped_since_update = False
        self.grad_scaler = grad_scaler
        if grad_scaler is not None:
            # a step the scaler skips (Inf/NaN gradients) runs no optimizer.step() and so no hook: it is
            # counted when the loop calls scaler.update(), which every AMP iteration does exactly once
            grad_scaler.update = self._count_skipped_then(grad_scaler.update)

    @property
    def average(self) -> tuple[str, ...]:
        return self.settings.average

    # -- the adapter ------------------------------------------------------------------------
    def sync_plan(self) -> SyncPlan:
        return SyncPlan("fsdp2", local_tensors(self.model, self.optimizer, self.settings.average))

    def broadcast_plan(self) -> SyncPlan:
        return SyncPlan("fsdp2", local_tensors(self.model, None, ("params", "buffers")))

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- the hook ---------------------------------------------------------------------------
    def _scheduler_epoch(self):
        return getattr(self.lr_scheduler, "last_epoch", None)

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._paused:
            return
        self._stepped_since_update = True
        self.count_step()

    def _count_skipped_then(self, update: Callable) -> Callable:
        def update_and_count(*args, **kwargs):
            skipped, self._stepped_since_update = not self._stepped_since_update, False
            out = update(*args, **kwargs)
            if skipped and not self._paused:
                self.count_step(skipped=True)
            return out

        return update_and_count

    def count_step(self, *, skipped: bool = False) -> None:
        """One optimizer step done: step the scheduler QSR owns, then count it (a round may run).

        The post-step hook calls it, and so does ``grad_scaler.update()`` for a step the scaler
        skipped (``skipped=True``: the scheduler does not step, as DeepSpeed skips it too). Call it
        yourself for a step your loop skipped otherwise: every replica must count the same steps.
        """
        if skipped:
            self.after_steps(1)
            return
        if self.lr_scheduler is not None:
            if self._scheduler_epoch() != self._sched_epoch:
                raise RuntimeError(
                    "lr_scheduler.step() was called outside QSR: FSDPQSR steps the scheduler it was given right "
                    "after each optimizer step; remove sched.step() from the training loop"
                )
            self.lr_scheduler.step()
            self._sched_epoch = self._scheduler_epoch()
        self.after_steps(1)

    @contextlib.contextmanager
    def paused(self):
        """Optimizer steps inside do not count (used when DCP initializes optimizer state)."""
        before, self._paused = self._paused, True
        try:
            yield self
        finally:
            self._paused = before

    def close(self) -> None:
        self._hook.remove()
        if self.grad_scaler is not None and "update" in vars(self.grad_scaler):
            del self.grad_scaler.update  # the class's own update again

    def __enter__(self) -> FSDPQSR:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- QSR state (model and optimizer go through DCP, see qsr_ds.fsdp_checkpoint) ---------
    def state_dict(self) -> dict:
        """Plain values: qsr_ds.checkpoint's QSR state (format, R, S, tracker, totals) plus ``average``."""
        return dict(self.qsr_state_dict(), average=list(self.settings.average))

    def check_compatible(self, state: dict, source: str = "checkpoint") -> None:
        """Raise QSRCheckpointError if ``state`` was written on another mesh shape or averaging set."""
        checkpoint.check_layout(state, self.topology, f"{source} (mesh replicate x shard)")
        if list(state.get("average", [])) != list(self.settings.average):
            raise checkpoint.QSRCheckpointError(
                f"{source}: checkpoint averaged {state.get('average')}, this run averages {list(self.settings.average)}"
            )

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        self.check_compatible(state, source)
        self.load_qsr_state_dict(state, source)
        self._sched_epoch = self._scheduler_epoch()
