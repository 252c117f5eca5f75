"""The outer optimizer (DiLoCo's): an SGD / Nesterov step on the pseudo-gradient at each boundary.

Every replica holds the same global parameters theta (fp32, one copy per averaged parameter
tensor of this rank: its own shard). At a boundary, with mean = mean_r(x_r) just computed in
place of x by the round:

    delta = theta - mean                      the pseudo-gradient
    buf   = mu * buf + delta                  (buf = delta at the first round)
    theta = theta - lr * (delta + mu * buf)   nesterov
    theta = theta - lr * buf                  sgd
    x     = theta                             on every replica

torch.optim.SGD's semantics with dampening 0. With sgd, lr 1 and momentum 0 theta is written as
the mean itself (theta - (theta - mean) rounds to it only in exact arithmetic), so that setting is
plain averaging to the bit. Only parameters take the step; averaged optimizer moments and buffers
stay plain means. theta and buf may live in (pinned) CPU memory (``offload``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..config import OuterSettings


class OuterOptimizer:
    """theta and the momentum buffer of this rank's parameter tensors, by name, and the outer step."""

    def __init__(self, settings: OuterSettings) -> None:
        self.settings = settings
        self.theta: dict[str, Tensor] = {}
        self.momentum: dict[str, Tensor] = {}

    @property
    def plain_average(self) -> bool:
        s = self.settings
        return s.optimizer == "sgd" and s.lr == 1.0 and s.momentum == 0.0

    def _home(self, like: Tensor) -> Tensor:
        """Where theta / buf of ``like`` live: its device, or host memory (pinned for a GPU tensor)."""
        if not self.settings.offload or like.device.type == "cpu":
            return torch.empty(like.shape, dtype=torch.float32, device=like.device)
        return torch.empty(like.shape, dtype=torch.float32, pin_memory=True)

    @torch.no_grad()
    def set_theta(self, named: Sequence[tuple[str, Tensor]]) -> None:
        """theta <- x for these (name, parameter tensor): the weights every replica shares now."""
        for name, x in named:
            theta = self.theta.get(name)
            if theta is None or theta.shape != x.shape:
                theta = self.theta[name] = self._home(x)
            theta.copy_(x)

    @torch.no_grad()
    def step(self, named: Sequence[tuple[str, Tensor]], copies: dict[str, Tensor]) -> None:
        """x holds mean_r(x_r): take the outer step on theta and write theta into x (and its copy)."""
        lr, mu, nesterov = self.settings.lr, self.settings.momentum, self.settings.optimizer == "nesterov"
        for name, x in named:
            theta = self.theta.get(name)
            if theta is None:
                raise RuntimeError(f"outer optimizer: no theta for {name!r} (set_theta was not called at the start)")
            if not self.plain_average:
                mean = x.detach().to(theta.device, torch.float32)
                delta = theta - mean
                if mu:
                    buf = self.momentum.get(name)
                    if buf is None:
                        buf = self.momentum[name] = self._home(x)
                        buf.copy_(delta)
                    else:
                        buf.mul_(mu).add_(delta)
                    delta = delta.add(buf, alpha=mu) if nesterov else buf
                theta.sub_(delta, alpha=lr)
                x.copy_(theta)
            else:
                theta.copy_(x)
            if name in copies:
                copies[name].copy_(x)

    def state_dict(self) -> dict:
        return {"theta": {n: t.detach().cpu().clone() for n, t in self.theta.items()},
                "momentum": {n: t.detach().cpu().clone() for n, t in self.momentum.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict, named: Sequence[tuple[str, Tensor]]) -> None:
        """theta and buf for these parameter tensors from ``state``; every name must be there, shaped alike."""
        for name, x in named:
            saved = state["theta"].get(name)
            if saved is None or saved.shape != x.shape:
                raise ValueError(f"outer optimizer state has no theta of shape {tuple(x.shape)} for {name!r}")
        for name, x in named:
            self.theta.setdefault(name, self._home(x)).copy_(state["theta"][name])
            if name in state["momentum"]:
                self.momentum.setdefault(name, self._home(x)).copy_(state["momentum"][name])

    @property
    def bytes(self) -> int:
        """fp32 bytes of theta and the momentum buffer on this rank (on the device or in host memory)."""
        return sum(t.numel() * 4 for t in (*self.theta.values(), *self.momentum.values()))
