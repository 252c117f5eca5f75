"""Which tensors a boundary averages, by the names of the "average" setting.

    params       parameters, always (also those whose grad is None)
    buffers      floating-point buffers (BatchNorm running statistics); integer buffers such
                 as num_batches_tracked stay local: every replica counts the same batches
    exp_avg, exp_avg_sq, momentum
                 optimizer state fields (Adam's moments, SGD's momentum_buffer), by name

The engines whose state is not a module's own tensors (ZeRO's flat shards) use STATE_FIELDS
to find the optimizer state of their fp32 tensors; see qsr_ds/deepspeed/state.py.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
from torch import nn

STATE_FIELDS = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "momentum": "momentum_buffer"}
"""Entry of the "average" setting -> key in a torch optimizer's per-parameter state."""


def is_parameter(name: str) -> bool:
    """Whether a sync plan's tensor name is a parameter (an fp32 master or shard), not a buffer or optimizer state.

    Engines name parameters "param:<name>", flat fp32 shards "<kind>.group<i>.fp32" / "zero3.sub<i>.fp32" /
    "params.flat", their optimizer state "<that>:<field>" or "state:<name>:<field>", buffers "buffer:<name>";
    a ZeRO 0 share appends "[j/S]".
    """
    base = re.sub(r"\[\d+/\d+\]$", "", name)
    if base.startswith(("buffer:", "state:")):
        return False
    head, _, field = base.rpartition(":")
    return not (head not in ("", "param") and field in STATE_FIELDS.values())


def optimizer_state_tensors(
    optimizer: torch.optim.Optimizer, tensor: torch.Tensor, name: str, average: Iterable[str]
) -> list[tuple[str, torch.Tensor]]:
    """The optimizer state fields of one tensor that ``average`` asks for, named ``name:field``."""
    state = optimizer.state.get(tensor, {})
    out = []
    for key in sorted(set(average)):
        field_name = STATE_FIELDS.get(key)
        if field_name and isinstance(state.get(field_name), torch.Tensor):
            out.append((f"{name}:{field_name}", state[field_name]))
    return out


def averaged_tensors(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    average: Iterable[str],
    local: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> list[tuple[str, torch.Tensor]]:
    """What a boundary averages for a module and its optimizer, named, in a replica-independent order.

    ``local`` maps a parameter to the tensor this rank holds (FSDP2: the DTensor's local shard).
    """
    average = set(average)
    named = [(f"param:{n}", local(p)) for n, p in model.named_parameters()]
    if "buffers" in average:
        named += [(f"buffer:{n}", local(b)) for n, b in model.named_buffers() if b.is_floating_point()]
    if optimizer is not None and average & set(STATE_FIELDS):
        names = {p: n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for state_name, t in optimizer_state_tensors(optimizer, p, "", average):
                    named.append((f"state:{names.get(p, id(p))}{state_name}", local(t)))
    return named
