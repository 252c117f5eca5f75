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
from typing import Callable, Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..config import QSRConfig, SyncSettings
from ..schedule import SyncSchedule
from ..sync import checkpoint
from ..sync.core import SyncCore, SyncPlan
from .mesh import FSDPSetupError, check_mesh, check_sharded, local_tensors, topology_of



class FSDPQSR(SyncCore):
    """Counts the optimizer's steps (a post-step hook) and averages replicas at QSR boundaries.

    ``qsr`` is a QSRConfig (its round keys and timeout_s are used and its ranks_per_replica must
    equal the mesh's S) or a bare SyncSchedule. The round keywords are LocalOptimizer's
    (``average``, ``bucket_mb``, ``kernel``, ``check_finite``, ``overlap_steps``, ``compress``,
    ``compress_route``, ``outer``); one that is not None replaces the QSRConfig's value. See the module
    docstring for how the LR of the next step is read. At construction every replica takes
    replica 0's local shards and buffers (as DDP starts from rank 0). Use as a context manager,
    or call ``close()``, to remove the hook.
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
        overlap_steps: int | None = None,
        compress: str | None = None,
        compress_route: str | None = None,
        outer: dict | None = None,
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
        settings = SyncSettings.from_config(config, average=average, bucket_mb=bucket_mb, kernel=kernel,
                                            check_finite=check_finite, overlap_steps=overlap_steps, compress=compress,
                                            compress_route=compress_route, outer=outer)
        self.model, self.optimizer, self.mesh, self.lr_scheduler = model, optimizer, mesh, lr_scheduler
        timeout_s = config.timeout_s if config is not None else 600.0
        super().__init__(schedule=schedule, topology=topology_of(mesh, timeout_s=timeout_s),
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

    # -- QSR state (model and optimizer go through DCP, see qsr_ds.fsdp.checkpoint) ---------
    def state_dict(self) -> dict:
        """Plain values: qsr_ds.sync.checkpoint's QSR state (format, R, S, tracker, totals) plus ``average``."""
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
