"""QSR for plain PyTorch: wrap an optimizer so replicas average at QSR boundaries.

    local = LocalOptimizer(optimizer, model, schedule=..., topology=..., lr_scheduler=sched)
    for batch in data:
        loss(model, batch).backward()
        local.step()          # optimizer.step(), lr_scheduler.step(), average at a boundary
        local.zero_grad()

With S = 1 the model is used as is (no gradient all-reduce at all); with S > 1 wrap the
model in DDP over ``topology.shard_group`` so gradients are reduced inside the replica.
Replicas start from replica 0's parameters and floating-point buffers. fp32 parameters on
one device are re-pointed once into one flat buffer (``flatten_params``), which every round
then all-reduces in place: no packing.

Mixed precision with a torch.amp.GradScaler: write the usual AMP loop with the wrapper,
``scaler.step(local); scaler.update()``. LocalOptimizer takes part in GradScaler's contract for
optimizers that handle scaling themselves (``_step_supports_amp_scaling``): the scaler calls
``local.step()`` on every iteration with ``found_inf`` and ``grad_scale`` set, so a step it
skips for Inf/NaN gradients still counts (replicas must agree on when to average); the torch
optimizer and the LR scheduler then do not step, as DeepSpeed skips both.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .config import SyncSettings
from .schedule import SyncSchedule
from .sync.core import SyncCore, SyncPlan
from .sync.layout import flatten_into_buffer, module_signature
from .sync.selection import averaged_tensors
from .topology import Topology


class LocalOptimizer(SyncCore):
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
        overlap_steps: int = 0,
        compress: str | None = None,
        compress_route: str = "gather",
        outer: dict | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.model = model
        self.lr_scheduler = lr_scheduler
        params = list(model.parameters())
        self.flat_params: torch.Tensor | None = None
        """One fp32 buffer all parameters are views of (None when they are not all fp32 on one device)."""
        if flatten_params and params and len({p.device for p in params}) == 1 and all(
            p.dtype == torch.float32 for p in params
        ):
            self.flat_params = flatten_into_buffer(params)
        settings = SyncSettings.from_config(average=average, bucket_mb=bucket_mb, kernel=kernel, check_finite=check_finite,
                                            overlap_steps=overlap_steps, compress=compress, compress_route=compress_route,
                                            outer=outer)
        super().__init__(schedule=schedule, topology=topology, settings=settings)
        self.start_from_replica0()

    # -- the adapter ------------------------------------------------------------------------
    def sync_plan(self) -> SyncPlan:
        return self._plan(self.optimizer, self.settings.average)

    def broadcast_plan(self) -> SyncPlan:
        return self._plan(None, ("params", "buffers"))

    def _plan(self, optimizer, average) -> SyncPlan:
        named = averaged_tensors(self.model, optimizer, average)
        if not self._params_are_flat():
            return SyncPlan("local", named)
        rest = [(n, t) for n, t in named if not n.startswith("param:")]
        return SyncPlan("local.flat", [("params.flat", self.flat_params), *rest], flat_numel=self.flat_params.numel(),
                        signature=module_signature(self.model))

    def _params_are_flat(self) -> bool:
        """The parameters are still views of flat_params (a user may have re-pointed p.data since)."""
        flat = self.flat_params
        if flat is None:
            return False
        start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
        return all(start <= p.data_ptr() < end for p in self.model.parameters())

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- the optimizer interface --------------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    _step_supports_amp_scaling = True  # GradScaler.step(local) calls step() even when it finds Inf/NaN

    def step(self, closure=None):
        """One optimizer step; averages when it closes a round. Returns the closure's loss.

        Under ``GradScaler.step(local)`` a step whose gradients hold Inf/NaN is skipped (the torch
        optimizer and the scheduler do not step) but counted.
        """
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        loss = None
        if found_inf is None or not float(found_inf):
            if grad_scale is not None:  # the scaler left unscaling to us: as GradScaler.unscale_ does it
                grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, grad_scale.double().reciprocal().float())
            loss = self.optimizer.step(closure)
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        self.after_steps(1)
        return loss

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "qsr": self.qsr_state_dict(),
                 "qsr_tensors": self.qsr_tensor_state()}
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Checks R, S and the schedule first (QSRCheckpointError); nothing is loaded on a mismatch."""
        self.load_qsr_state_dict(state["qsr"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.load_qsr_tensor_state(state.get("qsr_tensors") or {})
