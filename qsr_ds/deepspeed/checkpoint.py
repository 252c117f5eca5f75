"""One-replica checkpoints of a DeepSpeed engine: which layout a save may use, and writing one replica.

Right after a boundary every replica holds the same averaged fp32 shards, and the same bits
in whatever else of the engine's state is averaged or counted alike. A save there may write
replica 0's files only (the "one_replica" layout of qsr_ds/sync/checkpoint.py: 1/R of the bytes)
and every replica resumes from them, exactly, but only where nothing it saves differs
between replicas:
  - the last optimizer step closed a round (and no overlapped round is still in flight);
  - every tensor of the optimizer state is averaged (Adam: qsr.average has "exp_avg" and
    "exp_avg_sq"; SGD: "momentum"): by default, as in the paper, the moments stay local and
    differ between replicas even at a boundary, so the save writes every replica;
  - floating-point buffers (BatchNorm statistics) are averaged, or there are none;
  - the counters and scalars the engine saves (global and skipped steps, optimizer step
    counts, learning rate, loss scale) agree across replicas: a replica that skipped a step
    on NaN/Inf gradients has its scheduler and Adam step count behind, so it writes its own;
  - the checkpoint engine writes synchronously to a shared file system (not decoupled, not
    node-local storage).
One all-reduce over the world agrees on the verdict, so every rank picks the same layout.
A per-replica save of the other fields' bytes only (model once, optimizer state per replica)
would reach into DeepSpeed's file format, where the fp32 master shards live inside the
optimizer-state files; it is not offered.

DeepSpeed's save_checkpoint is collective over the world (barriers, the tag check), so the
ranks of the other replicas still run it, with the engine's checkpoint writer swapped for one
that writes nothing. DeepSpeed internals used (deepspeed 0.19.8): engine.checkpoint_engine
(save, makedirs; every file DeepSpeed writes but 'latest' and the recovery scripts, which
global rank 0 writes, goes through it), checkpoint_engine.is_decoupled(),
engine.use_node_local_storage(), global_steps, skipped_steps, basic_optimizer, optimizer.loss_scaler,
lr_scheduler.last_epoch.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ..sync import checkpoint as ckpt
from ..sync.selection import STATE_FIELDS

_REASONS = (
    "the last optimizer step did not close a round (mid-round the replicas differ)",
    "an overlapped round is still in flight",
    "the optimizer state is not all averaged",
    "floating-point model buffers are not averaged (add \"buffers\" to qsr.average)",
    "the checkpoint engine is decoupled or writes node-local storage",
    "the replicas' step counters, learning rates or loss scales differ (a step skipped on some replicas?)",
)


def _round_in_flight(hook) -> bool:
    return bool(getattr(hook, "round_in_flight", False))


def _unaveraged_state(engine, average) -> list[str]:
    """Names of tensor fields of the optimizer state that a round does not average ("step" counts are compared)."""
    averaged = {STATE_FIELDS[k] for k in average if k in STATE_FIELDS}
    fields = {k for state in engine.basic_optimizer.state.values() for k, v in state.items()
              if isinstance(v, torch.Tensor) and k != "step"}
    return sorted(fields - averaged)


def _counters(engine) -> list[float]:
    steps = [float(s["step"]) for s in engine.basic_optimizer.state.values() if "step" in s]
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    scheduler = getattr(engine, "lr_scheduler", None)
    lrs = [float(g["lr"]) for g in engine.basic_optimizer.param_groups]
    return [float(engine.global_steps), float(engine.skipped_steps), min(steps, default=0.0), max(steps, default=0.0),
            min(lrs, default=0.0), max(lrs, default=0.0), float(getattr(scaler, "cur_scale", 0.0) or 0.0),
            float(getattr(scheduler, "last_epoch", 0) or 0)]


def choose_layout(engine, hook, one_replica: bool | None) -> str:
    """The layout this save writes, the same on every rank (a collective when there are replicas).

    ``one_replica``: None picks one_replica wherever it is exact; True insists (QSRCheckpointError on
    every rank, nothing written, when it is not exact); False always writes every replica.
    """
    topology = hook.topology
    if one_replica is False or topology.num_replicas == 1:
        return ckpt.PER_REPLICA
    tracker, average = hook.tracker, set(hook.settings.average)
    unaveraged = _unaveraged_state(engine, average)
    has_float_buffers = any(b.is_floating_point() for b in engine.module.buffers())
    writer = engine.checkpoint_engine
    flags = [tracker.completed_steps != tracker.round_start, _round_in_flight(hook), bool(unaveraged),
             has_float_buffers and "buffers" not in average,
             bool(writer.is_decoupled()) or bool(engine.use_node_local_storage())]
    counters = _counters(engine)
    from deepspeed.accelerator import get_accelerator

    vec = torch.tensor([float(f) for f in flags] + counters + [-c for c in counters], dtype=torch.float64,
                       device=get_accelerator().current_device_name())
    dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=topology.world_group)
    n, k = len(flags), len(counters)
    agreed = [bool(v) for v in vec[:n].tolist()]
    agreed.append(vec[n:n + k].tolist() != [-v for v in vec[n + k:].tolist()])
    reasons = [reason for reason, bad in zip(_REASONS, agreed) if bad]
    if not reasons:
        return ckpt.ONE_REPLICA
    if one_replica:
        detail = [r if r != _REASONS[2] else f"{r} (qsr.average = {sorted(average)}; not averaged here: "
                  f"{', '.join(unaveraged)})" for r in reasons]
        raise ckpt.QSRCheckpointError(
            f"save_checkpoint(one_replica=True) at step {tracker.completed_steps}: one replica's files would not "
            f"resume the others exactly: {'; '.join(detail)}; nothing was written. Save with one_replica=None "
            "(the default: every replica's files where they differ) or right after a boundary with all state averaged"
        )
    return ckpt.PER_REPLICA


class _NoWrites:
    """The engine's checkpoint writer, but save and makedirs do nothing (ranks whose replica 0 writes)."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def save(self, *args, **kwargs) -> None:
        return None

    def makedirs(self, *args, **kwargs) -> None:
        return None


@contextlib.contextmanager
def writes_discarded(engine, discard: bool):
    """Run DeepSpeed's (collective) save_checkpoint on this rank without writing a file, when ``discard``."""
    if not discard:
        yield
        return
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _NoWrites(inner)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner
