"""Compressed sync rounds: each replica sends q(x - a + e), not x (2x to ~4x fewer bytes).

Every replica keeps the anchor a (the last round's result, the same bits on every replica,
in the averaged tensor's dtype) and, with error feedback, an fp32 residual e (what
quantizing lost last time). A round quantizes d = x - a + e into this rank's row of the
wire (bf16, or int8 with one fp32 scale per block of ``block`` elements; layout in
compress_wire.py), sums the replicas' dequantized rows in fp32 in replica order 0..R-1 and
writes a' = a + sum / R into x (rounded once to its dtype), the anchor and the
low-precision copies, in the same pass. int8 is never summed in int8. Two routes:

* "gather" (default): all-gather every replica's row; every rank dequantizes all R rows.
  A ring all-gather puts (R - 1) rows on this rank's link.
* "owner": each row is cut into R segments; all_to_all sends segment j to replica j, which
  sums its R copies in fp32, re-quantizes the mean with its own error feedback (the owner
  residual) and all-gathers it; every rank dequantizes the R owners' segments.
  About 2 (R - 1) / R rows on the link, like an fp32 ring all-reduce of 4n bytes.

Bytes: a bucket of n elements in k blocks (each tensor's blocks start at its first element)
has a row of 2n (bf16) or n + 4k (int8) bytes, each segment padded to a multiple of 16;
``bytes_per_round`` and RoundStats.bytes are this rank's rows, against 4n for the exact
round; ``link_bytes_per_round`` is what the route puts on this rank's link.

``exchange`` runs the same round on given tensors (e.g. snapshots): it reads the sources and
writes a' into given outputs. Overlapped rounds (qsr_ds/sync/overlap.py) call
``reduce_corrections`` on their flat fp32 snapshot x_s: the round sends q(x_s - a + e) and
leaves the correction a' - x_s in the snapshot, which the overlap adds to x tau steps later.
"""
from __future__ import annotations

import time
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .averager import ReplicaAverager, ReplicaCommError, RoundStats
from .wire import FP32_BYTES, WireBucket, plan_wire, row_views, view
from ..config import COMPRESS_ROUTES as ROUTES

MODES = ("bf16", "int8")
DEFAULT_BLOCK = 256
MAX_BLOCK = 4096  # the C++ kernel keeps one block of d on the stack


class CompressedAverager(ReplicaAverager):
    """ReplicaAverager whose rounds send bf16 or int8 deltas from the anchor, with error feedback.

    ``mode``: "bf16" or "int8". ``block``: elements per int8 scale. ``route``: "gather" or
    "owner" (see the module docstring). ``error_feedback``: keep what quantizing lost and send
    it next round (off only for experiments: the average then drifts by every round's
    rounding). ``anchored`` (default): the tensors hold the same values on every replica now
    (right after the start-up broadcast or a round), or the caller sets the anchors (or loads
    a state) before the first round; with ``anchored=False`` the first round is an exact fp32
    average whose result becomes the anchor, for an averager built between rounds without
    anchors to carry over (replicas' tensors differ there, and so would their anchors).
    Other arguments as ReplicaAverager.
    """

    def __init__(self, tensors: Sequence[tuple[str, Tensor]], *, mode: str = "bf16", block: int = DEFAULT_BLOCK,
                 route: str = "gather", error_feedback: bool = True, anchored: bool = True, **kwargs) -> None:
        if mode not in MODES:
            raise ValueError(f"compress mode {mode!r} is not one of {', '.join(MODES)}")
        if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= MAX_BLOCK:
            raise ValueError(f"compress block must be an integer in [1, {MAX_BLOCK}], got {block!r}")
        if route not in ROUTES:
            raise ValueError(f"compress route {route!r} is not one of {', '.join(ROUTES)}")
        super().__init__(tensors, **kwargs)
        self.mode, self.block, self.route, self.error_feedback = mode, block, route, bool(error_feedback)
        self.anchored = bool(anchored)
        self.int8 = mode == "int8"
        copies = dict(kwargs.get("copies") or {})
        self.copy_of = [copies.get(name) for name, _ in self.named]  # (the base class may set it too)
        live = [t for _, t in self.named]
        bucket_numel = max(block, int(kwargs.get("bucket_mb", 64.0) * 2**20) // FP32_BYTES // block * block)
        parts = self.num_replicas if route == "owner" else 1
        self.wire: list[WireBucket] = plan_wire(live, self.copy_of, int8=self.int8, block=block,
                                                bucket_numel=bucket_numel, parts=parts)
        self._chunked = {self.named[p.index][0] for b in self.wire for p in b.pieces
                         if p.numel < self.named[p.index][1].numel()}
        me = self.topology.replica_index
        with torch.no_grad():
            self.anchors = [t.detach().reshape(-1).clone() for t in live]
            self.residuals = [torch.zeros(t.numel(), dtype=torch.float32, device=t.device) if error_feedback
                              else None for t in live]
            # owner route: what re-quantizing this rank's segment of each bucket lost
            self.owner_residuals = [torch.zeros(b.segments[me].numel, dtype=torch.float32, device=b.device)
                                    if route == "owner" and error_feedback else None for b in self.wire]
        self._wire_scratch: dict[torch.device, dict[str, list[Tensor]]] = {}

    # -- sizes ------------------------------------------------------------------------------
    @property
    def bytes_per_round(self) -> int:
        """This rank's rows of every bucket (scales, q, padding): what it contributes per round."""
        return sum(b.row_bytes for b in self.wire)

    @property
    def link_bytes_per_round(self) -> int:
        """Bytes this rank sends per round: R - 1 rows (gather), or its row less its own segment
        (all_to_all) plus R - 1 copies of the widest re-quantized segment (ring all-gather)."""
        r = self.num_replicas
        if r == 1:
            return 0
        if self.route == "gather":
            return (r - 1) * self.bytes_per_round
        me = self.topology.replica_index
        return sum(b.row_bytes - b.segments[me].row_bytes + (r - 1) * max(s.row_bytes for s in b.segments)
                   for b in self.wire)

    def _scratch_sizes(self, device) -> dict[str, int]:
        """Bytes of each wire buffer on a device (every bucket's round fits them)."""
        r, me = self.num_replicas, self.topology.replica_index
        mine = [b for b in self.wire if b.device == device]
        if self.route == "gather":
            return {"rows": r * max(b.row_bytes for b in mine)}
        return {"send": max(b.row_bytes for b in mine),
                "recv": r * max(b.segments[me].row_bytes for b in mine),
                "mean": FP32_BYTES * max(b.segments[me].numel for b in mine),
                "rows": r * max(s.row_bytes for b in mine for s in b.segments)}

    def _buffer_count(self, device) -> int:
        return min(2, sum(b.device == device for b in self.wire)) if self.route == "gather" else 1

    @property
    def scratch_bytes(self) -> int:
        """Wire buffers allocated so far."""
        return sum(t.numel() * t.element_size() for bufs in self._wire_scratch.values()
                   for ts in bufs.values() for t in ts)

    carries_anchors = True

    def extra_bytes(self, *, overlapped: bool) -> int:
        return self.peak_extra_bytes

    @property
    def peak_extra_bytes(self) -> int:
        """Memory this averager adds on this rank: anchors + residuals (+ owner residuals) + wire buffers."""
        kept = [*self.anchors, *(r for r in self.residuals if r is not None),
                *(r for r in self.owner_residuals if r is not None)]
        wire = sum(self._buffer_count(d) * sum(self._scratch_sizes(d).values()) for d in {b.device for b in self.wire})
        return sum(t.numel() * t.element_size() for t in kept) + wire

    def _buffers(self, device, i: int) -> dict[str, Tensor]:
        bufs = self._wire_scratch.get(device)
        if bufs is None:
            count = self._buffer_count(device)
            bufs = self._wire_scratch[device] = {
                key: [torch.empty(size // (FP32_BYTES if key == "mean" else 1),
                                  dtype=torch.float32 if key == "mean" else torch.uint8, device=device)
                      for _ in range(count)]
                for key, size in self._scratch_sizes(device).items()}
        return {key: ts[i % len(ts)] for key, ts in bufs.items()}

    # -- rounds -----------------------------------------------------------------------------
    @torch.no_grad()
    def average(self, step: int | None = None, *, lr: float | None = None, verdict=None) -> RoundStats:
        """One compressed sync round, pre-checked like an exact one; x, anchors and copies get a'.

        ``lr`` and ``verdict`` as ReplicaAverager.average (replica 0's lr comes back in stats.lr;
        a verdict means the pre-check already ran).
        """
        if self.num_replicas == 1:
            stats = RoundStats(tensors=len(self.named), buckets=len(self.wire), lr=lr)
            self.record(stats)
            return stats
        start = time.perf_counter()
        if verdict is None:
            verdict = self.check(step, what=f"sync round {self.totals.rounds + 1}", lr=lr)
        else:
            start -= verdict.wait_s
            verdict = self.require_finite(verdict, step, what=f"sync round {self.totals.rounds + 1}")
        live = [t for _, t in self.named]
        stats = self.exchange(live, live, copies=self.copy_of)
        stats.lr, stats.check_s = verdict.lr, verdict.wait_s
        stats.total_s = time.perf_counter() - start
        self.record(stats)
        return stats

    @torch.no_grad()
    def exchange(self, sources: Sequence[Tensor], outputs: Sequence[Tensor],
                 copies: Sequence[Tensor | None] | None = None) -> RoundStats:
        """The round's exchange alone, on given tensors (no pre-check, nothing recorded).

        ``sources``: one tensor per averaged tensor (same order and shapes, e.g. snapshots
        taken at the boundary); this rank sends q(source - a + e). ``outputs`` (may be the
        sources) and ``copies`` (None entries skipped) receive a' = a + mean, as do the
        anchors; the residuals are updated.
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
        if self.num_replicas > 1:
            start = time.perf_counter()
            self._rounds(sources, outputs, copies, stats)
            stats.total_s = time.perf_counter() - start
        return stats

    def correction_scratch_numel(self, device: torch.device, segment_numel: int) -> int:
        """fp32 elements per scratch buffer that ``reduce_corrections`` needs on ``device``: one wire bucket."""
        return max((b.numel for b in self.wire if b.device == device), default=0)

    @torch.no_grad()
    def reduce_corrections(self, snapshot: Tensor, segment_numel: int, scratch: Sequence[Tensor],
                           stats: RoundStats) -> None:
        """Overlapped rounds: a device's flat fp32 snapshot x_s (``flat_units`` layout) becomes a' - x_s.

        Sends q(x_s - a + e) like a blocking round and refreshes anchors and residuals; the caller
        adds the snapshot to x later. ``scratch``: fp32 buffers of at least one bucket (the
        overlap's segment buffers); ``segment_numel`` is not needed (the wire has its own buckets).
        """
        device = snapshot.device
        sources: list = [None] * len(self.named)
        offset = 0
        for i in self.flat_units().get(device, []):
            sources[i] = snapshot[offset: offset + self.named[i][1].numel()]
            offset += self.named[i][1].numel()
        need = max((b.numel for b in self.wire if b.device == device), default=0)
        if not scratch or min(s.numel() for s in scratch) < need:
            raise ValueError(f"reduce_corrections needs scratch buffers of {need} elements")
        self._rounds(sources, None, None, stats, device=device, temps=scratch)

    def _rounds(self, sources, outputs, copies, stats: RoundStats, device=None, temps=None) -> None:
        """Every bucket (of ``device`` only, if given) by the averager's route; with ``temps``
        (overlapped rounds) a' goes into a temporary buffer and the sources get a' - source."""
        buckets = [(k, b) for k, b in enumerate(self.wire) if device is None or b.device == device]
        try:
            if not self.anchored:
                self._exact_round(buckets, sources, outputs, copies, stats, temps)
            elif self.route == "gather":
                self._gather_round(buckets, sources, outputs, copies, stats, temps)
            else:
                for k, bucket in buckets:
                    self._owner_round(k, bucket, sources, outputs, copies, stats, temps)
        except RuntimeError as err:
            raise ReplicaCommError(
                f"compressed sync round {self.totals.rounds + 1}: the {self.route} exchange over the replica group "
                f"(ranks {self.topology.replica_group_ranks}) failed (a rank died or timed out?); this rank's "
                f"tensors may be partly averaged, resume from the last checkpoint: {err}") from err
        if any(d.type == "cuda" for d in self.backends):
            torch.cuda.synchronize()

    def _exact_round(self, buckets, sources, outputs, copies, stats: RoundStats, temps) -> None:
        """The first round of an averager not built ``anchored``: the exact fp32 mean (x / R packed,
        all-reduced, as ReplicaAverager does), written to x (or the correction), copies and anchors."""
        group, r = self.topology.replica_group, self.num_replicas
        for _, bucket in buckets:
            backend, ps = self.backends[bucket.device], bucket.pieces
            offsets = [p.offset for p in ps]
            buf = torch.empty(bucket.numel, dtype=torch.float32, device=bucket.device)
            t0 = time.perf_counter()
            backend.pack([view(sources[p.index], p) for p in ps], buf, offsets, 1.0 / r)
            t1 = time.perf_counter()
            dist.all_reduce(buf, group=group)
            t2 = time.perf_counter()
            backend.unpack(buf, [view(self.anchors[p.index], p) for p in ps], offsets, [None] * len(ps))
            if temps is None:
                backend.unpack(buf, [view(outputs[p.index], p) for p in ps], offsets,
                               [view(copies[p.index], p) for p in ps])
            else:
                for p in ps:
                    snap = view(sources[p.index], p)
                    torch.sub(buf[p.offset: p.offset + p.numel], snap, out=snap)
            stats.pack_s += t1 - t0
            stats.comm_s += t2 - t1
            stats.unpack_s += time.perf_counter() - t2
        stats.bytes = FP32_BYTES * sum(b.numel for _, b in buckets)
        self.anchored = True

    def _quantize(self, segment, sources, row: Tensor, device) -> None:
        """q(source - a + e) of a segment's pieces into ``row`` (uint8, starting at the segment)."""
        q, scales = row_views(segment, row, self.int8)
        ps = segment.pieces
        self.backends[device].quantize(
            self.mode, self.block, [view(sources[p.index], p) for p in ps],
            [view(self.anchors[p.index], p) for p in ps], [view(self.residuals[p.index], p) for p in ps], q, scales,
            [p.offset for p in ps], [p.block_offset for p in ps])

    def _apply(self, segment, rows: Tensor, device, inv_count: float, sources, outputs, copies, temp) -> None:
        """a' = a + (sum of the rows' dequantized segment) * inv_count into outputs, anchors and copies,
        or with ``temp`` into temp and a' - source into the sources."""
        q_rows, scale_rows = row_views(segment, rows, self.int8)
        ps = segment.pieces
        if temp is None:
            targets = [view(outputs[p.index], p) for p in ps]
            copy_views = [view(copies[p.index], p) for p in ps]
        else:
            targets = [temp[p.offset: p.offset + p.numel] for p in ps]
            copy_views = [None] * len(ps)
        self.backends[device].dequantize(
            self.mode, self.block, q_rows, scale_rows, targets, [view(self.anchors[p.index], p) for p in ps],
            copy_views, [p.offset for p in ps], [p.block_offset for p in ps], inv_count)
        if temp is not None:
            for p, target in zip(ps, targets):
                snap = view(sources[p.index], p)
                torch.sub(target, snap, out=snap)

    def _gather_round(self, buckets, sources, outputs, copies, stats: RoundStats, temps) -> None:
        group, r, me = self.topology.replica_group, self.num_replicas, self.topology.replica_index
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        pending = None
        for i, (_, bucket) in enumerate(buckets):  # bucket i's all-gather runs while bucket i + 1 quantizes
            seg = bucket.segments[0]
            rows = self._buffers(bucket.device, i)["rows"][: r * seg.row_bytes].view(r, seg.row_bytes)
            t0 = time.perf_counter()
            self._quantize(seg, sources, rows[me], bucket.device)
            stats.pack_s += time.perf_counter() - t0
            work = gather(rows.view(-1), rows[me], group=group, async_op=True)
            if pending is not None:
                self._finish_gather(*pending, sources, outputs, copies, stats)
            pending = (bucket, rows, work, None if temps is None else temps[i % len(temps)])
        if pending is not None:
            self._finish_gather(*pending, sources, outputs, copies, stats)

    def _finish_gather(self, bucket, rows, work, temp, sources, outputs, copies, stats: RoundStats) -> None:
        t0 = time.perf_counter()
        work.wait()
        t1 = time.perf_counter()
        self._apply(bucket.segments[0], rows, bucket.device, 1.0 / self.num_replicas, sources, outputs, copies, temp)
        stats.comm_s += t1 - t0
        stats.unpack_s += time.perf_counter() - t1

    def _owner_round(self, k: int, bucket: WireBucket, sources, outputs, copies, stats: RoundStats, temps) -> None:
        group, r, me = self.topology.replica_group, self.num_replicas, self.topology.replica_index
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        backend, bufs = self.backends[bucket.device], self._buffers(bucket.device, 0)
        segs, mine = bucket.segments, bucket.segments[me]
        t0 = time.perf_counter()
        send = bufs["send"][: bucket.row_bytes]
        for seg in segs:
            self._quantize(seg, sources, send[seg.byte_offset: seg.byte_offset + seg.row_bytes], bucket.device)
        t1 = time.perf_counter()
        recv = bufs["recv"][: r * mine.row_bytes]
        dist.all_to_all_single(recv, send, output_split_sizes=[mine.row_bytes] * r,
                               input_split_sizes=[s.row_bytes for s in segs], group=group)
        t2 = time.perf_counter()
        # the owner's fp32 mean of its segment, re-quantized with its own error feedback
        ps, offsets, block_offsets = mine.pieces, [p.offset for p in mine.pieces], [p.block_offset for p in mine.pieces]
        means = [bufs["mean"][p.offset: p.offset + p.numel] for p in ps]
        q_rows, scale_rows = row_views(mine, recv.view(r, mine.row_bytes), self.int8)
        backend.dequantize(self.mode, self.block, q_rows, scale_rows, means, [None] * len(ps), [None] * len(ps),
                           offsets, block_offsets, 1.0 / r)
        width = max(s.row_bytes for s in segs)
        rows = bufs["rows"][: r * width].view(r, width)
        q, scales = row_views(mine, rows[me], self.int8)
        f = self.owner_residuals[k]
        backend.quantize(self.mode, self.block, means, [None] * len(ps),
                         [None if f is None else f[p.offset: p.offset + p.numel] for p in ps], q, scales, offsets,
                         block_offsets)
        t3 = time.perf_counter()
        gather(rows.view(-1), rows[me], group=group)
        t4 = time.perf_counter()
        for j, seg in enumerate(segs):
            self._apply(seg, rows[j: j + 1], bucket.device, 1.0, sources, outputs, copies,
                        None if temps is None else temps[0])
        stats.pack_s += (t1 - t0) + (t3 - t2)
        stats.comm_s += (t2 - t1) + (t4 - t3)
        stats.unpack_s += time.perf_counter() - t4

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Anchors and residuals (by tensor name) and owner residuals (by bucket), for exact resume.

        References, as nn.Module.state_dict returns; every replica's differ only in the residuals.
        """
        return {"mode": self.mode, "block": self.block, "route": self.route, "error_feedback": self.error_feedback,
                "anchored": self.anchored,
                "anchors": {name: a for (name, _), a in zip(self.named, self.anchors)},
                "residuals": {name: r for (name, _), r in zip(self.named, self.residuals) if r is not None},
                "owner_residuals": {str(k): f for k, f in enumerate(self.owner_residuals) if f is not None}}

    def _state_tables(self):
        yield "anchors", [(name, a) for (name, _), a in zip(self.named, self.anchors)]
        yield "residuals", [(name, r) for (name, _), r in zip(self.named, self.residuals) if r is not None]
        yield "owner_residuals", [(str(k), f) for k, f in enumerate(self.owner_residuals) if f is not None]

    def load_state_dict(self, state: Mapping) -> None:
        """Restore anchors and residuals; checks everything first, changes nothing on a mismatch."""
        for key in ("mode", "block", "route", "error_feedback"):
            if state.get(key, "gather" if key == "route" else None) != getattr(self, key):
                raise ValueError(f"compressed averager state has {key}={state.get(key)!r}, this averager "
                                 f"{getattr(self, key)!r}")
        for what, mine in self._state_tables():
            saved = dict(state.get(what) or {})
            if set(saved) != {name for name, _ in mine}:
                missing, extra = sorted({n for n, _ in mine} - set(saved)), sorted(set(saved) - {n for n, _ in mine})
                raise ValueError(f"compressed averager state: {what} missing {missing}, unexpected {extra}")
            for name, t in mine:
                if saved[name].shape != t.shape or saved[name].dtype != t.dtype:
                    raise ValueError(f"compressed averager state: {what}[{name!r}] is {tuple(saved[name].shape)} "
                                     f"{saved[name].dtype}, expected {tuple(t.shape)} {t.dtype}")
        with torch.no_grad():
            for what, mine in self._state_tables():
                for name, t in mine:
                    t.copy_(state[what][name])
        self.anchored = bool(state.get("anchored", True))
