"""Checkpoints of an FSDP2 + QSR run through torch.distributed.checkpoint (DCP).

    fsdp_checkpoint.save("ckpt/step_300", qsr)          # every rank
    fsdp_checkpoint.load("ckpt/step_300", qsr)          # a fresh run on the same mesh shape

What is written, keyed so that DCP keeps everything it must:
- ``replica{r}.model`` / ``replica{r}.optim``: the sharded model and optimizer state dicts
  of replica r (``get_state_dict``; DTensor shards, no full parameter gathered). Mid-round
  the replicas differ, and DCP de-duplicates equal keys across ranks, so each replica is
  saved under its own key: resuming mid-round is exact, at R times the bytes of one model.
- ``qsr``: the QSR state as JSON (round tracker, totals, mesh shape, what is averaged);
  every rank must agree on the tracker, which is checked before anything is written.
- ``lr_scheduler``: the state of the scheduler QSR steps, when it has one.
- ``extra.rank{k}``: an optional dict of the caller's per rank (data position, RNG seeds, ...).

Loading reads the ``qsr`` entry first, so a checkpoint from a mesh of another shape fails
with a message that says so before any tensor is touched.
"""
from __future__ import annotations

import json
import os

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..sync.averager import ReplicaMismatchError
from ..sync.checkpoint import FORMAT, QSRCheckpointError, read_tensor_state, replica_dir, write_tensor_state
from .hook import FSDPQSR

CheckpointError = QSRCheckpointError  # the same error as DeepSpeed checkpoints raise


def _replica_key(qsr: FSDPQSR) -> str:
    return f"replica{qsr.topology.replica_index}"


def _extra_key() -> str:
    # per rank: DCP keeps one copy of equal non-tensor keys, so a per-replica key would keep one rank's
    return f"extra.rank{dist.get_rank()}"


def _check_agreement(qsr: FSDPQSR) -> dict:
    state = qsr.state_dict()
    trackers: list = [None] * dist.get_world_size()
    dist.all_gather_object(trackers, state["tracker"])
    for rank, tracker in enumerate(trackers):
        if tracker != trackers[0]:
            raise ReplicaMismatchError(
                f"rank {rank} is at QSR step {tracker['completed_steps']} (round {tracker['rounds_done']}) but rank 0 "
                f"is at step {trackers[0]['completed_steps']} (round {trackers[0]['rounds_done']}); not saving"
            )
    return state


def save(path: str | os.PathLike, qsr: FSDPQSR, *, extra: dict | None = None) -> None:
    """Write model, optimizer, scheduler and QSR state of every replica to ``path`` (all ranks call it)."""
    state = _check_agreement(qsr)
    with qsr.paused():
        model_sd, optim_sd = get_state_dict(qsr.model, qsr.optimizer)
    to_save = {_replica_key(qsr): {"model": model_sd, "optim": optim_sd}, "qsr": json.dumps(state, sort_keys=True)}
    if extra is not None:
        to_save[_extra_key()] = dict(extra)
    if qsr.lr_scheduler is not None:
        to_save["lr_scheduler"] = qsr.lr_scheduler.state_dict()
    tensors = qsr.qsr_tensor_state()  # before DCP writes the model: waits for a round in flight
    dcp.save(to_save, checkpoint_id=os.fspath(path))
    write_tensor_state(replica_dir(path, qsr.topology.replica_index), qsr.topology, tensors)  # this rank's round in flight / compression anchors


def read_qsr_state(path: str | os.PathLike) -> dict:
    """The QSR entry of a checkpoint (all ranks call it)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    entry = {"qsr": ""}
    try:
        dcp.load(entry, checkpoint_id=path)
    except Exception as err:  # DCP wraps a missing key in a CheckpointException
        raise CheckpointError(f"{path}: not a qsr-ds FSDP checkpoint (no readable 'qsr' entry): {err}") from None
    state = json.loads(entry["qsr"])
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: QSR checkpoint format {state.get('format')!r}, this qsr-ds reads {FORMAT}")
    return state


def load(path: str | os.PathLike, qsr: FSDPQSR, *, extra: dict | None = None) -> dict | None:
    """Restore what ``save`` wrote into the live model, optimizer, scheduler and QSR tracker.

    ``extra``: a dict of the same keys (and tensor shapes) as was saved, filled in place
    and returned. Raises QSRCheckpointError for a checkpoint from another mesh shape.
    """
    path = os.fspath(path)
    state = read_qsr_state(path)
    qsr.check_compatible(state, path)
    with qsr.paused():  # get_state_dict may run a zero-lr step to create optimizer state
        model_sd, optim_sd = get_state_dict(qsr.model, qsr.optimizer)
    key = _replica_key(qsr)
    to_load = {key: {"model": model_sd, "optim": optim_sd}}
    if extra is not None:
        to_load[_extra_key()] = extra
    if qsr.lr_scheduler is not None:
        to_load["lr_scheduler"] = qsr.lr_scheduler.state_dict()
    try:
        dcp.load(to_load, checkpoint_id=path)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot load {key} (model, optimizer or scheduler state): {err}") from err
    set_state_dict(qsr.model, qsr.optimizer, model_state_dict=to_load[key]["model"], optim_state_dict=to_load[key]["optim"])
    if qsr.lr_scheduler is not None:
        qsr.lr_scheduler.load_state_dict(to_load["lr_scheduler"])
    qsr.load_state_dict(state, path)
    qsr.load_qsr_tensor_state(read_tensor_state(replica_dir(path, qsr.topology.replica_index), qsr.topology))
    return to_load.get(_extra_key())


__all__ = ["CheckpointError", "QSRCheckpointError", "load", "read_qsr_state", "save"]
