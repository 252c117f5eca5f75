"""The check before a sync round: every rank agrees to go on, or raises the same error.

Two fixed-size all-reduces over groups that already exist, so the cost does not grow with
the world:

1. over the replica group (rank k of every replica), MAX of
   [fingerprint, -fingerprint, step, -step, holds NaN/Inf, replica 0's learning rate]:
   min and max of the layout fingerprint and of the step tell whether the replicas agree;
   the learning rate comes out as replica 0's on every rank (the others send the smallest
   int64), which is the LR every replica decides the next H from;
2. over the shard group, MAX of the verdict: a problem seen by one replica group (a NaN in
   one shard) stops every rank of every replica, before anything is written.

Only when the verdict is bad do the ranks exchange the detailed header (one row per rank,
over the world) to name the replica and the tensor in one message that every rank raises.

The NaN/Inf scan reads every averaged byte. A blocking round may agree on it later
(``agree(nonfinite_index=None)`` now, ``FiniteCheck`` after its first bucket is on the
wire): the packed buckets only fill scratch, so nothing is written before the verdict.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..topology import Topology

INT64_MIN = -(2**63)
_LAYOUT, _STEP, _NONFINITE = 1, 2, 4


class ReplicaMismatchError(RuntimeError):
    """Replicas disagree (tensor layout, step count) or hold NaN/Inf; nothing was written."""


class ReplicaCommError(RuntimeError):
    """A collective of a sync round failed or timed out (e.g. a rank died); names the round and group."""


def _lr_bits(lr: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(lr)))[0]


def _lr_of(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


@dataclass
class Verdict:
    """What the pre-check agreed on."""

    lr: float | None
    """Replica 0's learning rate (None when none was given)."""
    wait_s: float
    """Time in the two small all-reduces: mostly waiting for the slowest replica to arrive."""
    scanned: bool = True
    """Whether finiteness was agreed too; if not, a ``FiniteCheck`` must pass before anything is written."""


def agree(
    topology: Topology,
    *,
    fingerprint: int,
    step: int | None,
    nonfinite_index: int | None,
    lr: float | None = None,
    device: torch.device | str = "cpu",
    layout=None,
    signature_len: int = 0,
    names=None,
) -> Verdict:
    """Agree on layout, step and finiteness over all ranks; returns replica 0's ``lr``.

    ``nonfinite_index``: the first tensor holding NaN/Inf, -1 if none, None if not scanned yet
    (the verdict then says ``scanned=False``).

    ``layout`` (a list of (name, shape, dtype), the first ``signature_len`` of them the
    model's parameters) and ``names`` (the averaged tensors' names) are only read on the
    error path, to say what differs.
    """
    step_value = -1 if step is None else int(step)
    has_lr = lr is not None
    lr_value = _lr_bits(lr) if has_lr and topology.replica_index == 0 else INT64_MIN
    scanned = nonfinite_index is not None
    nonfinite_index = nonfinite_index if scanned else -1
    row = [fingerprint, -fingerprint, step_value, -step_value, int(nonfinite_index >= 0), lr_value]
    start = time.perf_counter()
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    if topology.num_replicas > 1:
        dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=topology.replica_group)
    fp_max, neg_fp_min, step_max, neg_step_min, nonfinite, lr_agreed = mine.cpu().tolist()
    verdict = (_LAYOUT * (fp_max != -neg_fp_min)) | (_STEP * (step_max != -neg_step_min)) | (_NONFINITE * nonfinite)
    if topology.ranks_per_replica > 1:
        flag = torch.tensor([verdict], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=topology.shard_group)
        verdict = int(flag.item())
    wait_s = time.perf_counter() - start
    if verdict:
        _raise_detailed(topology, [fingerprint, nonfinite_index, step_value], device, layout or [], signature_len,
                        names or [])
    return Verdict(lr=_lr_of(lr_agreed) if has_lr else None, wait_s=wait_s, scanned=scanned)


class FiniteCheck:
    """The finiteness half of the pre-check, for a round whose layout and step are already agreed.

    ``start`` sends this rank's flag (one int64, MAX over the replica group) behind whatever is
    already queued on that group; ``wait`` finishes it (and the shard group's MAX) and raises the
    same ReplicaMismatchError on every rank when any holds NaN/Inf.
    """

    def __init__(self, topology: Topology, *, fingerprint: int, step: int | None, device, names=()) -> None:
        self.topology, self.fingerprint, self.device, self.names = topology, fingerprint, device, list(names)
        self.step = -1 if step is None else int(step)
        self.index, self._flag, self._work, self.wait_s = -1, None, None, 0.0

    @property
    def started(self) -> bool:
        return self._flag is not None

    def start(self, nonfinite_index: int) -> None:
        self.index = nonfinite_index
        self._flag = torch.tensor([int(nonfinite_index >= 0)], dtype=torch.int64, device=self.device)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.topology.replica_group,
                                     async_op=True)

    def wait(self) -> float:
        """Seconds spent waiting; raises ReplicaMismatchError (on every rank) if any rank holds NaN/Inf."""
        start = time.perf_counter()
        self._work.wait()
        bad = int(self._flag.item())
        if self.topology.ranks_per_replica > 1:
            flag = torch.tensor([bad], dtype=torch.int64, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.topology.shard_group)
            bad = int(flag.item())
        self.wait_s = time.perf_counter() - start
        if bad:
            _raise_detailed(self.topology, [self.fingerprint, self.index, self.step], self.device, [], 0, self.names)
        return self.wait_s


def _raise_detailed(topology: Topology, row: list[int], device, layout, signature_len, names) -> None:
    """The error path: one row per rank over the world, then the same message everywhere."""
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(topology.world_size)]
    dist.all_gather(rows, mine, group=topology.world_group)
    header = torch.stack(rows).cpu().tolist()
    per_replica = topology.ranks_per_replica
    for rank, (fp, _, step) in enumerate(header):
        first = header[rank % per_replica]
        if fp != first[0]:
            _raise_layout_mismatch(topology, rank, layout, signature_len)
        if step != first[2]:
            raise ReplicaMismatchError(
                f"replica {rank // per_replica} (rank {rank}) is at step {step} but replica 0 is at "
                f"step {first[2]}: replicas disagree on when to average; nothing was averaged"
            )
    for rank, (_, bad, _) in enumerate(header):
        if bad >= 0:
            same_layout = rank % per_replica == topology.shard_rank
            where = f"tensor {names[bad]!r}" if same_layout and bad < len(names) else f"its tensor #{bad}"
            raise ReplicaMismatchError(
                f"replica {rank // per_replica} (rank {rank}) holds NaN or Inf in {where}; refusing to "
                "average, every replica's tensors are left as they were"
            )
    raise ReplicaMismatchError("replicas disagree (the pre-round check failed); nothing was averaged")


def _raise_layout_mismatch(topology: Topology, rank: int, layout, signature_len: int) -> None:
    layouts: list = [None] * topology.world_size
    dist.all_gather_object(layouts, layout, group=topology.world_group)
    per_replica = topology.ranks_per_replica
    ref, other = layouts[rank % per_replica], layouts[rank]
    for i in range(max(len(ref), len(other))):
        a = ref[i] if i < len(ref) else None
        b = other[i] if i < len(other) else None
        if a != b:
            in_model = i < signature_len
            what = f"model parameter #{i}" if in_model else f"tensor #{i - signature_len}"
            raise ReplicaMismatchError(
                f"replica {rank // per_replica} (rank {rank}) has a different "
                f"{'model (other model code?)' if in_model else 'tensor layout'} than replica 0: "
                f"{what} is {b} there but {a} on replica 0; nothing was averaged"
            )
    raise ReplicaMismatchError(f"replica {rank // per_replica} (rank {rank}) has a different tensor layout")
