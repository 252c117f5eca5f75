"""The sync core: what every engine does the same way around its QSR rounds.

An engine adapter (DeepSpeed, FSDP2, plain PyTorch) subclasses SyncCore and says only
  sync_plan()        which tensors this rank averages, which low-precision copies to refresh
                     in the same pass, and how to refresh the engine afterwards (a SyncPlan);
  broadcast_plan()   what replica 0 hands the others at start-up (default: sync_plan());
  current_lr()       the learning rate the next optimizer step will use;
and calls after_steps(n) after every n completed optimizer steps (a step the engine skipped
for NaN/Inf gradients counts: replicas must agree on when to communicate).

The core owns the rest: the schedule tracker; the learning rate that decides the next H,
agreed across replicas at every round (replica 0's, carried by the round's pre-check, so a
replica whose scheduler fell behind after a skipped step still picks the same H); the
averager's life cycle (built at the first round, rebuilt when the tensors' identities change,
e.g. after a checkpoint load or when optimizer state appears); the round itself; its records;
the start-up broadcast from replica 0; and the QSR part of a checkpoint. It imports no engine.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import SyncSettings
from ..schedule import SyncSchedule, SyncTracker
from ..topology import Topology
from . import checkpoint
from .averager import AveragerTotals, ReplicaAverager, RoundStats
from .compress import CompressedAverager
from .outer import OuterOptimizer
from .overlap import OverlappedRound
from .precheck import ReplicaMismatchError
from .selection import is_parameter


@dataclass
class SyncPlan:
    """The tensors one rank averages at a boundary and what to do afterwards."""

    kind: str
    """What the engine holds, for messages and records (e.g. "zero2", "fsdp2", "local")."""
    tensors: list[tuple[str, Tensor]]
    """(name, tensor) in the same order on every replica: this rank's fp32 shard and the state asked for."""
    copies: dict[str, Tensor] = field(default_factory=dict)
    """name -> low-precision model copy rewritten from the averaged value in the unpack pass."""
    refresh: Callable[[], None] = lambda: None
    """Rebuild the engine's low-precision / gathered model copies from the averaged tensors."""
    flat_numel: int = 0
    """Smallest flat fp32 shard when the engine keeps them flat, else 0: every tensor at least this
    large is all-reduced in place (zero copy)."""
    signature: list[tuple] = field(default_factory=list)
    """(name, shape, dtype) entries every replica must agree on too, e.g. the model's parameters when
    the tensors are flat shards that hide them."""
    scan: list[tuple[int, Tensor]] | None = None
    """Views of the real elements to check for NaN/Inf, when tensors hold uninitialised padding."""

    @property
    def key(self) -> list[tuple]:
        """Identity of the tensors: a new optimizer state after a load changes it."""
        return [(n, t.data_ptr(), tuple(t.shape), t.dtype) for n, t in self.tensors]


class SyncCore:
    """Counts steps, decides rounds and runs them; subclasses say which tensors (see the module doc)."""

    def __init__(self, *, schedule: SyncSchedule, topology: Topology, settings: SyncSettings) -> None:
        self.topology = topology
        self.settings = settings
        self.tracker = SyncTracker(schedule, self.current_lr())
        self.totals = AveragerTotals()
        self.averager: ReplicaAverager | None = None
        self._averaged_key: list | None = None
        self.overlap = None
        """The OverlappedRound of this run (qsr_ds/sync/overlap.py), once an overlapped round started."""
        self._saved_compression: dict | None = None  # anchors and residuals from a checkpoint, until the next round
        self._anchors_from_tensors = False
        self.last_round: RoundStats | None = None
        self.outer = OuterOptimizer(settings.outer) if settings.outer is not None else None
        """The outer optimizer's theta and momentum (qsr_ds/sync/outer.py), when settings.outer is set."""
        """The round the latest after_steps() ran, else None."""

    # -- what an adapter says -------------------------------------------------------------
    def sync_plan(self) -> SyncPlan:
        raise NotImplementedError

    def broadcast_plan(self) -> SyncPlan:
        return self.sync_plan()

    def current_lr(self) -> float:
        raise NotImplementedError

    # -- counting steps -------------------------------------------------------------------
    @property
    def rounds(self) -> int:
        return self.tracker.rounds_done

    @property
    def num_replicas(self) -> int:
        return self.topology.num_replicas

    @property
    def round_in_flight(self) -> bool:
        """An overlapped round's all-reduce is running behind training (its correction not yet applied)."""
        return self.overlap is not None and self.overlap.in_flight

    @property
    def round_memory_bytes(self) -> int:
        """Bytes this rank holds for its rounds beyond the engine's own state, as allocated now (0
        before the first round): the blocking round's scratch buckets, or an overlapped round's
        fp32 snapshot with its scratch (which the blocking rounds then share), plus a compressed
        averager's anchors, residuals and wire buffers, and the outer optimizer's theta and momentum
        buffer (wherever they live: with ``offload`` in host memory)."""
        held = self.overlap.peak_extra_bytes if self.overlap is not None else 0
        held += self.outer.bytes if self.outer is not None else 0
        if self.averager is None:
            return held
        return held + self.averager.extra_bytes(overlapped=self.overlap is not None)

    def after_steps(self, count: int = 1) -> RoundStats | None:
        """Count ``count`` completed optimizer steps; runs the round the last of them closes.

        A round in flight (overlapped) is applied after the step it was due (its boundary + tau).
        """
        self.last_round = None
        for _ in range(count):
            tracker = self.tracker
            closes = not tracker.finished and tracker.completed_steps + 1 >= tracker.next_boundary
            if not closes:
                tracker.on_step(None)  # no round closes (raises past total_steps)
                if self.overlap is not None and self.overlap.apply_step == tracker.completed_steps:
                    self.last_round = self._finish_overlapped()
                continue
            self.last_round = self._close_round(step=tracker.completed_steps + 1)
        return self.last_round

    # -- the round ------------------------------------------------------------------------
    def _averager_for(self, plan: SyncPlan) -> ReplicaAverager:
        if self.averager is None or plan.key != self._averaged_key:
            bucket_mb = self.settings.bucket_mb
            if plan.flat_numel:  # flat fp32 shards: all-reduce every one of them in place, no packing
                bucket_mb = min(bucket_mb, 8 * plan.flat_numel / 2**20)
            kwargs = dict(topology=self.topology, copies=plan.copies, bucket_mb=bucket_mb, kernel=self.settings.kernel,
                          check_finite=self.settings.check_finite, signature=plan.signature, scan=plan.scan)
            previous = self.averager
            if self.settings.compress and self.num_replicas > 1:
                self.averager = CompressedAverager(plan.tensors, mode=self.settings.compress,
                                                   route=self.settings.compress_route, **kwargs)
                self._carry_anchors(previous)
            else:
                self.averager = ReplicaAverager(plan.tensors, **kwargs)
            self.averager.totals = self.totals
            self._averaged_key = plan.key
        return self.averager

    def _carry_anchors(self, previous) -> None:
        """Anchors must hold the same bits on every replica. Built at start-up, right after the broadcast
        from replica 0, they are the replicas' common weights; across a rebuild (or from a checkpoint)
        every tensor keeps its anchor and residual. If any tensor has none (optimizer state that
        appeared since the last round), the next round is one exact fp32 round, which sets them all."""
        carried = self._saved_compression if previous is None else previous.state_dict()
        self._saved_compression = None
        from_tensors, self._anchors_from_tensors = self._anchors_from_tensors, False
        if carried is None:
            self.averager.anchored = from_tensors
            return
        missing = False
        with torch.no_grad():
            for (name, _), anchor, residual in zip(self.averager.named, self.averager.anchors, self.averager.residuals):
                old_anchor, old_residual = carried["anchors"].get(name), carried["residuals"].get(name)
                if old_anchor is None or old_anchor.shape != anchor.shape:
                    missing = True
                    continue
                anchor.copy_(old_anchor)
                if residual is not None and old_residual is not None:
                    residual.copy_(old_residual)
        self.averager.anchored = bool(carried.get("anchored", True)) and not missing

    def _close_round(self, step: int) -> RoundStats:
        """The step that closes a round: pre-check (agreeing replica 0's LR), decide the next H from it,
        then average now (blocking) or start the all-reduce behind the next tau steps."""
        plan = self.sync_plan()
        averager = self._averager_for(plan)
        # finiteness is agreed by the round itself (a blocking one hides the scan behind its first bucket)
        verdict = averager.check(step, what=f"sync round {self.totals.rounds + 1}", lr=self.current_lr(), scan=False)
        before = self.tracker.state_dict()
        self.tracker.on_step(verdict.lr)
        tau = self.settings.overlap_steps
        try:
            if tau and self.num_replicas > 1 and not self.tracker.finished and self.tracker.current_h > tau:
                return self._overlap_for(averager).start(step, verdict=verdict)
            return self._average_now(plan, averager, step, verdict)
        except ReplicaMismatchError:  # a NaN/Inf refused the round: the schedule stays where it was too
            self.tracker.load_state_dict(before)
            raise

    def _average_now(self, plan: SyncPlan, averager, step: int | None, verdict=None) -> RoundStats:
        stats = averager.average(step=step, lr=self.current_lr() if verdict is None else verdict.lr, verdict=verdict)
        self._outer_step(plan)
        self._refresh(plan, stats)
        return stats

    def _outer_step(self, plan: SyncPlan) -> None:
        """The parameters hold mean_r(x_r): the outer optimizer turns them into its new theta."""
        if self.outer is not None:
            self.outer.step(_parameters(plan), plan.copies)
            if self.num_replicas == 1:  # no round refreshed the engine's copies from the new values
                plan.refresh()

    def _refresh(self, plan: SyncPlan, stats: RoundStats) -> None:
        if self.num_replicas == 1:
            return
        start = time.perf_counter()
        plan.refresh()
        stats.refresh_s = time.perf_counter() - start
        stats.total_s += stats.refresh_s
        self.totals.refresh_s += stats.refresh_s
        self.totals.total_s += stats.refresh_s

    def _overlap_for(self, averager):
        if self.overlap is None or self.overlap.averager is not averager:
            # segments of at most bucket_mb: the averager's bucket may be widened to whole flat shards
            self.overlap = OverlappedRound(averager, overlap_steps=self.settings.overlap_steps,
                                           segment_mb=self.settings.bucket_mb)
        return self.overlap

    def _finish_overlapped(self) -> RoundStats:
        stats = self.overlap.finish()
        self._refresh(self.sync_plan(), stats)
        return stats

    def sync(self, *, step: int | None = None, lr: float | None = None) -> RoundStats:
        """Average the replicas now (every rank must call it), then refresh the engine; the tracker is
        not moved. ``step``: completed optimizer steps, checked equal on every replica (default: the
        tracker's). ``lr``: this replica's learning rate; ``stats.lr`` is replica 0's."""
        if self.round_in_flight:
            self._finish_overlapped()
        plan = self.sync_plan()
        averager = self._averager_for(plan)
        stats = averager.average(step=self.tracker.completed_steps if step is None else step, lr=lr)
        self._outer_step(plan)
        self._refresh(plan, stats)
        return stats

    @torch.no_grad()
    def start_from_replica0(self) -> None:
        """Every replica starts from replica 0's weights, as DDP starts from rank 0's.

        The engine only broadcasts inside a replica (or not at all), so replicas seeded
        differently would otherwise start apart. A round's pre-check runs first, so a replica
        with other model code fails here by name on every rank (instead of a broadcast of
        mismatched sizes aborting the backend). Not counted as a round; replica 0 is left bit
        for bit as the engine made it.
        """
        if self.num_replicas > 1:
            self._broadcast_from_replica0()
        if self.outer is not None:  # theta: the weights every replica now shares
            self.outer.set_theta(_parameters(self.sync_plan()))

    def _broadcast_from_replica0(self) -> None:
        plan = self.broadcast_plan()
        ReplicaAverager(plan.tensors, topology=self.topology, kernel="torch", check_finite=False,
                        signature=plan.signature).check(what="start-up broadcast from replica 0")
        # the low-precision copies too: they are not always the rounded masters (ZeRO 0)
        for tensor in [t for _, t in plan.tensors] + list(plan.copies.values()):
            dist.broadcast(tensor, group=self.topology.replica_group, group_src=0)
        if self.topology.replica_index != 0:
            plan.refresh()
        if self.settings.compress:  # anchors from the weights every replica now shares
            self._anchors_from_tensors = True
            self._averager_for(self.sync_plan())

    # -- checkpoints ----------------------------------------------------------------------
    def qsr_state_dict(self) -> dict:
        """Plain values: format, R, S, the tracker and the totals (the same on every rank of a replica)."""
        return checkpoint.state_dict(self.tracker, self.totals, self.topology)

    def load_qsr_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        """Check R, S and the schedule against this run (QSRCheckpointError), then restore."""
        checkpoint.check_layout(state, self.topology, source)
        checkpoint.check_schedule(self.tracker, state, source)
        self.totals.load_state_dict(state.get("totals") or {})
        self.forget_tensors()

    def qsr_tensor_state(self) -> dict:
        """This rank's own tensors resume needs: a round in flight (its correction) and the compressed
        rounds' anchors and residuals. Empty when neither is on. Per rank: save it per rank."""
        state = {}
        if self.round_in_flight:
            state["overlap"] = self.overlap.state_dict()
        if self.averager is not None and self.averager.carries_anchors:
            state["compress"] = {k: ({n: t.detach().cpu().clone() for n, t in v.items()} if isinstance(v, dict) else v)
                                 for k, v in self.averager.state_dict().items()}
        if self.outer is not None:
            state["outer"] = self.outer.state_dict()
        return state

    def load_qsr_tensor_state(self, state: dict) -> None:
        """Restore qsr_tensor_state() after the engine's own tensors were loaded (and the QSR state)."""
        self.forget_tensors()
        self._saved_compression = state.get("compress")
        if self.outer is not None:
            self._load_outer(state.get("outer"))
        if state.get("overlap"):
            averager = self._averager_for(self.sync_plan())
            self._overlap_for(averager).load_state_dict(state["overlap"])

    def forget_tensors(self) -> None:
        """The engine replaced its tensors (a load): the next round builds its averager anew."""
        if self.averager is not None and self._saved_compression is None and self.averager.carries_anchors:
            self._saved_compression = self.averager.state_dict()
        self.averager = None
        self._averaged_key = None
        self.overlap = None

    def _load_outer(self, saved: dict | None) -> None:
        params = _parameters(self.sync_plan())
        if saved is not None:
            self.outer.load_state_dict(saved, params)
            return
        tracker = self.tracker
        if tracker.completed_steps != tracker.round_start:
            raise checkpoint.QSRCheckpointError(
                f"the checkpoint holds no outer-optimizer state (theta) and was written mid-round (step "
                f"{tracker.completed_steps}): theta cannot be recovered; resume from a checkpoint written with "
                f"the outer optimizer, or from one written at a boundary")
        self.outer.set_theta(params)  # at a boundary every replica holds theta


def _parameters(plan: SyncPlan) -> list[tuple[str, Tensor]]:
    """The plan's parameter tensors: those the outer optimizer steps."""
    return [(name, t) for name, t in plan.tensors if is_parameter(name)]

