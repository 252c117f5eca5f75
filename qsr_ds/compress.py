"""Compressed sync rounds: each replica sends q(x - a + e), not x (2x to ~4x fewer bytes).

Every replica keeps the anchor a (the last round's result, the same bits on every replica,
in the averaged tensor's dtype) and, with error feedback, an fp32 residual e (what
quantizing lost last time). A round quantizes d = x - a + e into this rank's row of a
wire buffer (bf16, or int8 with one fp32 scale per block of ``block`` elements), all-gathers
the rows of every replica over ``topology.replica_group`` and, on every rank, dequantizes
and sums them in fp32 in replica order 0..R-1, so every rank computes the same bits:
a' = a + sum / R is written into x (rounded once to its dtype), into the anchor and into
the low-precision copies, in the same pass. int8 is never summed in int8.

Bytes: a bucket of n elements and k = ceil-per-tensor block count sends one row of
2n (bf16) or n + 4k (int8) bytes, padded to a multiple of 16; ``bytes_per_round`` (and
RoundStats.bytes) is the sum of the rows, against 4n for the exact fp32 round. A ring
all-gather puts (R - 1) rows on this rank's link, a ring all-reduce 2 (R - 1) / R * 4n
(``link_bytes_per_round``): the same ratio at R = 2, less saving for larger R.

``exchange`` runs the same round on given tensors (e.g. snapshots): it reads the sources and
writes a' into given outputs. Overlapped rounds (qsr_ds/overlap.py) call
``reduce_corrections`` on their flat fp32 snapshot x_s: the round sends q(x_s - a + e) and
leaves the correction a' - x_s in the snapshot, which the overlap adds to x tau steps later.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .averager import ReplicaAverager, ReplicaCommError, RoundStats

MODES = ("bf16", "int8")
DEFAULT_BLOCK = 256
MAX_BLOCK = 4096  # the C++ kernel keeps one block of d on the stack
ROW_ALIGN = 16  # bytes: every row (and so every replica's scales) stays 16-byte aligned
FP32_BYTES = 4


@dataclass
class _Piece:
    """A flat element range [start, end) of averaged tensor ``index`` (a whole tensor if not contiguous)."""

    index: int
    start: int
    end: int
    offset: int  # first element in the bucket's q
    block_offset: int  # first block in the bucket's scales


@dataclass
class _WireBucket:
    device: torch.device
    pieces: list[_Piece]
    numel: int
    blocks: int
    scale_bytes: int
    row_bytes: int


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _view(t: Tensor | None, piece: _Piece) -> Tensor | None:
    if t is None or not t.is_contiguous():
        return t
    return t.view(-1)[piece.start: piece.end]


class CompressedAverager(ReplicaAverager):
    """ReplicaAverager whose rounds send bf16 or int8 deltas from the anchor, with error feedback.

    ``mode``: "bf16" or "int8". ``block``: elements per int8 scale (each tensor's blocks start
    at its first element). ``error_feedback``: keep what quantizing lost and send it next round
    (off only for experiments: the average then drifts by the rounding of every round).
    Other arguments as ReplicaAverager. The anchor is taken from the tensors now: build this
    after replicas hold the same values (the start-up broadcast).
    """

    def __init__(self, tensors: Sequence[tuple[str, Tensor]], *, mode: str = "bf16", block: int = DEFAULT_BLOCK,
                 error_feedback: bool = True, **kwargs) -> None:
        if mode not in MODES:
            raise ValueError(f"compress mode {mode!r} is not one of {', '.join(MODES)}")
        if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= MAX_BLOCK:
            raise ValueError(f"compress block must be an integer in [1, {MAX_BLOCK}], got {block!r}")
        super().__init__(tensors, **kwargs)
        self.mode, self.block, self.error_feedback = mode, block, bool(error_feedback)
        copies = dict(kwargs.get("copies") or {})
        self.copy_of = [copies.get(name) for name, _ in self.named]  # (the base class may set it too)
        with torch.no_grad():
            self.anchors = [t.detach().reshape(-1).clone() for _, t in self.named]
            self.residuals = [torch.zeros(t.numel(), dtype=torch.float32, device=t.device) if error_feedback
                              else None for _, t in self.named]
        self.q_dtype = torch.bfloat16 if mode == "bf16" else torch.int8
        bucket_numel = max(block, int(kwargs.get("bucket_mb", 64.0) * 2**20) // FP32_BYTES // block * block)
        self.wire = self._plan_wire(bucket_numel)
        self._wire_scratch: dict[torch.device, list[Tensor]] = {}

    # -- plan -------------------------------------------------------------------------------
    def _plan_wire(self, bucket_numel: int) -> list[_WireBucket]:
        buckets: list[_WireBucket] = []
        open_by_device: dict[torch.device, _WireBucket] = {}
        for i, (_, t) in enumerate(self.named):
            n = t.numel()
            copy = self.copy_of[i]
            whole = not t.is_contiguous() or (copy is not None and not copy.is_contiguous())
            ranges = [(0, n)] if whole or n <= bucket_numel else [
                (s, min(n, s + bucket_numel)) for s in range(0, n, bucket_numel)]
            for start, end in ranges:
                size = end - start
                bucket = open_by_device.get(t.device)
                if bucket is None or (bucket.pieces and bucket.numel + size > bucket_numel):
                    bucket = open_by_device[t.device] = _WireBucket(t.device, [], 0, 0, 0, 0)
                    buckets.append(bucket)
                bucket.pieces.append(_Piece(i, start, end, bucket.numel, bucket.blocks))
                bucket.numel += size
                bucket.blocks += _blocks(size, self.block) if self.mode == "int8" else 0
        for b in buckets:
            b.scale_bytes = FP32_BYTES * b.blocks
            q_bytes = b.numel * (2 if self.mode == "bf16" else 1)
            b.row_bytes = -(-(b.scale_bytes + q_bytes) // ROW_ALIGN) * ROW_ALIGN
        self._chunked = {self.named[p.index][0] for b in buckets for p in b.pieces
                         if p.end - p.start < self.named[p.index][1].numel()}
        return buckets

    @property
    def bytes_per_round(self) -> int:
        """What this rank sends per round: its row of every bucket (scales, q, padding)."""
        return sum(b.row_bytes for b in self.wire)

    @property
    def link_bytes_per_round(self) -> int:
        """Bytes a ring all-gather puts on this rank's link: R - 1 rows per bucket."""
        return (self.num_replicas - 1) * self.bytes_per_round

    @property
    def scratch_bytes(self) -> int:
        """Wire buffers allocated so far (all R rows of at most two buckets per device)."""
        return sum(s.numel() for bufs in self._wire_scratch.values() for s in bufs)

    def _planned_scratch_bytes(self) -> int:
        total = 0
        for device in {b.device for b in self.wire}:
            rows = sorted((b.row_bytes for b in self.wire if b.device == device), reverse=True)
            total += min(2, len(rows)) * self.num_replicas * rows[0]
        return total

    @property
    def peak_extra_bytes(self) -> int:
        """Memory this averager adds on this rank: anchors + residuals + wire scratch."""
        kept = sum(t.numel() * t.element_size() for t in self.anchors + [r for r in self.residuals if r is not None])
        return kept + self._planned_scratch_bytes()

    def _wire_rows(self, i: int, bucket: _WireBucket) -> Tensor:
        bufs = self._wire_scratch.get(bucket.device)
        if bufs is None:
            rows = max(b.row_bytes for b in self.wire if b.device == bucket.device)
            count = min(2, sum(b.device == bucket.device for b in self.wire))
            bufs = self._wire_scratch[bucket.device] = [
                torch.empty(self.num_replicas * rows, dtype=torch.uint8, device=bucket.device) for _ in range(count)]
        return bufs[i % len(bufs)][: self.num_replicas * bucket.row_bytes].view(self.num_replicas, bucket.row_bytes)

    # -- rounds -----------------------------------------------------------------------------
    @torch.no_grad()
    def average(self, step: int | None = None, *, lr: float | None = None, verdict=None) -> RoundStats:
        """One compressed sync round, pre-checked like an exact one; x, anchors and copies get a'.

        ``lr`` and ``verdict`` as ReplicaAverager.average (replica 0's lr comes back in stats.lr;
        a verdict means the pre-check already ran).
        """
        if self.num_replicas == 1:
            stats = RoundStats(tensors=len(self.named), buckets=len(self.wire), lr=lr)
            self._record(stats)
            return stats
        start = time.perf_counter()
        if verdict is None:
            verdict = self.check(step, what=f"sync round {self.totals.rounds + 1}", lr=lr)
        else:
            start -= verdict.wait_s
        live = [t for _, t in self.named]
        stats = self.exchange(live, live, copies=self.copy_of)
        stats.lr, stats.check_s = verdict.lr, verdict.wait_s
        stats.total_s = time.perf_counter() - start
        self._record(stats)
        return stats

    @torch.no_grad()
    def reduce_corrections(self, snapshot: Tensor, segment_numel: int, scratch: Sequence[Tensor],
                           stats: RoundStats) -> None:
        """Overlapped rounds: a device's flat fp32 snapshot x_s (``flat_units`` layout) becomes a' - x_s.

        Sends q(x_s - a + e) like a blocking round and refreshes anchors and residuals; the caller
        adds the snapshot to x later. ``scratch``: fp32 buffers of at least one bucket (the
        overlap's segment buffers); ``segment_numel`` is not needed (the wire has its own buckets).
        """
        device = snapshot.device
        index = self.flat_units().get(device, [])
        sources: list = [None] * len(self.named)
        offset = 0
        for i in index:
            t = self.named[i][1]
            sources[i] = snapshot[offset: offset + t.numel()]
            offset += t.numel()
        need = max((b.numel for b in self.wire if b.device == device), default=0)
        if not scratch or min(s.numel() for s in scratch) < need:
            raise ValueError(f"reduce_corrections needs scratch buffers of {need} elements")
        try:
            self._rounds(sources, None, None, stats, device=device, temps=scratch)
        except RuntimeError as err:
            raise ReplicaCommError(
                f"overlapped compressed sync round: all-gather over the replica group (ranks "
                f"{self.topology.replica_group_ranks}) failed (a rank died or timed out?): {err}") from err

    @torch.no_grad()
    def exchange(self, sources: Sequence[Tensor], outputs: Sequence[Tensor],
                 copies: Sequence[Tensor | None] | None = None) -> RoundStats:
        """The round's exchange alone, on given tensors (no pre-check, nothing recorded).

        ``sources``: one tensor per averaged tensor (same order and shapes, e.g. snapshots
        taken at the boundary); this rank sends q(source - a + e). ``outputs`` (may be the
        sources) and ``copies`` (None entries skipped) receive a' = a + mean, as do the
        anchors; the residuals are updated. An overlapped round then applies x += a' - x_s.
        """
        if len(sources) != len(self.named) or len(outputs) != len(self.named):
            raise ValueError(f"exchange needs {len(self.named)} sources and outputs, got "
                             f"{len(sources)} and {len(outputs)}")
        for (name, t), s, o in zip(self.named, sources, outputs):
            if s.shape != t.shape or o.shape != t.shape:
                raise ValueError(f"exchange: {name} has shape {tuple(t.shape)}, got source {tuple(s.shape)} "
                                 f"and output {tuple(o.shape)}")
        copies = list(copies) if copies is not None else [None] * len(self.named)
        for (name, _), s, o, c in zip(self.named, sources, outputs, copies):
            if name in self._chunked and not all(t is None or t.is_contiguous() for t in (s, o, c)):
                raise ValueError(f"exchange: {name} is sent in chunks, its source, output and copy must be "
                                 "contiguous")
        stats = RoundStats(tensors=len(self.named), buckets=len(self.wire), bytes=self.bytes_per_round)
        if self.num_replicas == 1:
            return stats
        start = time.perf_counter()
        try:
            self._rounds(sources, outputs, copies, stats)
        except RuntimeError as err:
            raise ReplicaCommError(
                f"compressed sync round {self.totals.rounds + 1}: all-gather over the replica group (ranks "
                f"{self.topology.replica_group_ranks}) failed (a rank died or timed out?); this rank's tensors may be "
                f"partly averaged, resume from the last checkpoint: {err}") from err
        stats.total_s = time.perf_counter() - start
        return stats

    def _rounds(self, sources, outputs, copies, stats: RoundStats, device=None, temps=None) -> None:
        """Quantize, all-gather and dequantize every bucket (of ``device`` only, if given).

        With ``temps`` (overlapped rounds) a' goes into a temporary bucket and the sources get a' - source.
        """
        group, me = self.topology.replica_group, self.topology.replica_index
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        pending = None
        buckets = [b for b in self.wire if device is None or b.device == device]
        for i, bucket in enumerate(buckets):
            rows = self._wire_rows(i, bucket)
            t0 = time.perf_counter()
            q, scales = self._row_views(bucket, rows[me])
            self.backends[bucket.device].quantize(
                self.mode, self.block, [_view(sources[p.index], p) for p in bucket.pieces],
                [_view(self.anchors[p.index], p) for p in bucket.pieces],
                [_view(self.residuals[p.index], p) for p in bucket.pieces], q, scales,
                [p.offset for p in bucket.pieces], [p.block_offset for p in bucket.pieces])
            stats.pack_s += time.perf_counter() - t0
            work = gather(rows.view(-1), rows[me], group=group, async_op=True)
            if pending is not None:
                self._finish(*pending, sources, outputs, copies, stats)
            pending = (bucket, rows, work, None if temps is None else temps[i % len(temps)])
        if pending is not None:
            self._finish(*pending, sources, outputs, copies, stats)
        if any(d.type == "cuda" for d in self.backends):
            torch.cuda.synchronize()

    def _row_views(self, bucket: _WireBucket, row: Tensor) -> tuple[Tensor, Tensor | None]:
        """(q, scales) inside one row of a wire buffer, or a [R, ...] pair for the gathered rows."""
        q_bytes = bucket.numel * (2 if self.mode == "bf16" else 1)
        q = row[..., bucket.scale_bytes: bucket.scale_bytes + q_bytes].view(self.q_dtype)
        scales = row[..., : bucket.scale_bytes].view(torch.float32) if self.mode == "int8" else None
        return q, scales

    def _finish(self, bucket: _WireBucket, rows: Tensor, work, temp, sources, outputs, copies,
                stats: RoundStats) -> None:
        t0 = time.perf_counter()
        work.wait()
        t1 = time.perf_counter()
        q_rows, scale_rows = self._row_views(bucket, rows)
        if temp is None:
            targets = [_view(outputs[p.index], p) for p in bucket.pieces]
            copy_views = [_view(copies[p.index], p) for p in bucket.pieces]
        else:
            targets = [temp[p.offset: p.offset + p.end - p.start] for p in bucket.pieces]
            copy_views = [None] * len(bucket.pieces)
        self.backends[bucket.device].dequantize(
            self.mode, self.block, q_rows, scale_rows, targets, [_view(self.anchors[p.index], p) for p in bucket.pieces],
            copy_views, [p.offset for p in bucket.pieces], [p.block_offset for p in bucket.pieces],
            1.0 / self.num_replicas)
        if temp is not None:  # the correction a' - x_s, in place of x_s
            for p, target in zip(bucket.pieces, targets):
                snap = _view(sources[p.index], p)
                torch.sub(target, snap, out=snap)
        stats.comm_s += t1 - t0
        stats.unpack_s += time.perf_counter() - t1

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Anchors and residuals by tensor name (references, as nn.Module.state_dict), for exact resume."""
        return {"mode": self.mode, "block": self.block, "error_feedback": self.error_feedback,
                "anchors": {name: a for (name, _), a in zip(self.named, self.anchors)},
                "residuals": {name: r for (name, _), r in zip(self.named, self.residuals) if r is not None}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore anchors and residuals; checks everything first, changes nothing on a mismatch."""
        for key in ("mode", "block", "error_feedback"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"compressed averager state has {key}={state.get(key)!r}, this averager "
                                 f"{getattr(self, key)!r}")
        for what, mine in (("anchors", self.anchors), ("residuals", self.residuals)):
            saved = dict(state.get(what) or {})
            want = {name for (name, _), t in zip(self.named, mine) if t is not None}
            if set(saved) != want:
                missing, extra = sorted(want - set(saved)), sorted(set(saved) - want)
                raise ValueError(f"compressed averager state: {what} missing {missing}, unexpected {extra}")
            for (name, _), t in zip(self.named, mine):
                if t is not None and (saved[name].shape != t.shape or saved[name].dtype != t.dtype):
                    raise ValueError(f"compressed averager state: {what}[{name!r}] is {tuple(saved[name].shape)} "
                                     f"{saved[name].dtype}, expected {tuple(t.shape)} {t.dtype}")
        with torch.no_grad():
            for what, mine in (("anchors", self.anchors), ("residuals", self.residuals)):
                for (name, _), t in zip(self.named, mine):
                    if t is not None:
                        t.copy_(state[what][name])
