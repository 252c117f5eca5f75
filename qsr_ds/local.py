"""QSR for plain PyTorch: wrap an optimizer so replicas average at QSR boundaries.

    local = LocalOptimizer(optimizer, model, schedule=..., topology=..., lr_scheduler=sched)
    for batch in data:
        loss(model, batch).backward()
        local.step()          # optimizer.step(), lr_scheduler.step(), average at a boundary
        local.zero_grad()

With S = 1 the model is used as is (no gradient all-reduce at all); with S > 1 wrap the
model in DDP over ``topology.shard_group`` so gradients are reduced inside the replica.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .averager import ReplicaAverager, RoundStats, flatten_into_buffer
from .schedule import SyncSchedule, SyncTracker
from .topology import Topology

STATE_FIELDS = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "momentum": "momentum_buffer"}


def averaged_tensors(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    average: Iterable[str],
    local: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> list[tuple[str, torch.Tensor]]:
    """What a boundary averages, named, in a replica-independent order.

    Parameters always (also those whose grad is None); floating-point buffers when
    "buffers" is asked (integer buffers such as num_batches_tracked stay local: every
    replica counts the same batches); optimizer state fields by name.
    """
    average = set(average)
    named = [(f"param:{n}", local(p)) for n, p in model.named_parameters()]
    if "buffers" in average:
        named += [(f"buffer:{n}", local(b)) for n, b in model.named_buffers() if b.is_floating_point()]
    fields = [STATE_FIELDS[a] for a in sorted(average) if a in STATE_FIELDS]
    if fields and optimizer is not None:
        names = {p: n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                for key in fields:
                    if isinstance(state.get(key), torch.Tensor):
                        named.append((f"state:{names.get(p, id(p))}:{key}", local(state[key])))
    return named


class LocalOptimizer:
    """An optimizer wrapper that counts steps and averages replicas at QSR boundaries."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        schedule: SyncSchedule,
        topology: Topology,
        lr_scheduler=None,
        average: Iterable[str] = ("params",),
        bucket_mb: float = 64.0,
        kernel: str = "auto",
        check_finite: bool = True,
        flatten_params: bool = True,
    ) -> None:
        self.optimizer = optimizer
        self.model = model
        self.topology = topology
        self.lr_scheduler = lr_scheduler
        self.average = tuple(average)
        self._averager_args = dict(topology=topology, bucket_mb=bucket_mb, kernel=kernel, check_finite=check_finite)
        self.tracker = SyncTracker(schedule, self.current_lr())
        params = list(model.parameters())
        devices = {p.device for p in params}
        self.flat_params = None
        if flatten_params and params and len(devices) == 1 and all(p.dtype == torch.float32 for p in params):
            self.flat_params = flatten_into_buffer(params)
        # optimizer state appears after the first step, so the averager is built lazily
        self.averager: ReplicaAverager | None = None
        self.last_round: RoundStats | None = None

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        """One optimizer step; returns the closure's loss. Averages when it closes a round."""
        loss = self.optimizer.step(closure)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.last_round = None
        if self.tracker.on_step(self.current_lr()):
            self.last_round = self.sync()
        return loss

    def sync(self) -> RoundStats:
        if self.averager is None:
            self.averager = ReplicaAverager(averaged_tensors(self.model, self.optimizer, self.average), **self._averager_args)
        return self.averager.average(step=self.tracker.completed_steps)

    @property
    def rounds(self) -> int:
        return self.tracker.rounds_done

    def qsr_state_dict(self) -> dict:
        return {
            "tracker": self.tracker.state_dict(),
            "totals": self.averager.totals.state_dict() if self.averager else None,
            "num_replicas": self.topology.num_replicas,
            "ranks_per_replica": self.topology.ranks_per_replica,
        }

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "qsr": self.qsr_state_dict()}

    def load_state_dict(self, state: dict) -> None:
        qsr = state["qsr"]
        for key in ("num_replicas", "ranks_per_replica"):
            if qsr[key] != getattr(self.topology, key):
                raise ValueError(
                    f"checkpoint was written with {key}={qsr[key]}, this run has {getattr(self.topology, key)}"
                )
        self.tracker.load_state_dict(qsr["tracker"])
        self.optimizer.load_state_dict(state["optimizer"])
        if qsr["totals"] is not None:
            self.averager = ReplicaAverager(averaged_tensors(self.model, self.optimizer, self.average), **self._averager_args)
            self.averager.totals.load_state_dict(qsr["totals"])
