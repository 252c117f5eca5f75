"""Average this rank's tensors with the same rank of every other replica.

A round: the pre-check (qsr_ds/sync/precheck.py: two fixed-size all-reduces on layout
fingerprint, step count and a non-finite flag) so that every rank agrees to go on or raises
the same error before anything is written; then large contiguous fp32 tensors are all-reduced in place (zero
copy) and everything else is packed into fp32 buckets pre-scaled by 1/R, all-reduced
(SUM) over the replica group and unpacked. Bucket i's all-reduce runs while bucket i+1
packs; two buckets of scratch per device at most. Bucket sizes ramp up from 1/16 of
``bucket_mb`` and down again at the end, so the first pack and the last unpack, which
nothing hides, are short; a blocking round scans for NaN/Inf while its first bucket is on
the wire, and agrees on the result before it writes anything.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import precheck
from ..kernels import get_backend
from .layout import Bucket, fingerprint, layout_of, plan_buckets
from .precheck import ReplicaCommError, ReplicaMismatchError, Verdict
from ..topology import Topology

FP32_BYTES = 4


@dataclass
class RoundStats:
    """What one sync round did on this rank."""

    bytes: int = 0
    """fp32 bytes this rank all-reduced over its replica group."""
    tensors: int = 0
    buckets: int = 0
    in_place: int = 0
    """Tensors all-reduced in place (zero copy) rather than packed."""
    pack_s: float = 0.0
    comm_s: float = 0.0
    """Time waiting on all-reduces (the rest overlaps with packing)."""
    unpack_s: float = 0.0
    check_s: float = 0.0
    """Time in the pre-check: mostly waiting for the slowest replica (skew, stragglers), not traffic."""
    refresh_s: float = 0.0
    """Time refreshing the engine's model copies inside the replica after the average."""
    total_s: float = 0.0
    lr: float | None = None
    """The learning rate every replica decides the next H from (replica 0's)."""


@dataclass
class AveragerTotals:
    rounds: int = 0
    bytes: int = 0
    pack_s: float = 0.0
    comm_s: float = 0.0
    unpack_s: float = 0.0
    check_s: float = 0.0
    refresh_s: float = 0.0
    total_s: float = 0.0

    def add(self, stats: RoundStats) -> None:
        self.rounds += 1
        self.bytes += stats.bytes
        for key in ("pack_s", "comm_s", "unpack_s", "check_s", "refresh_s", "total_s"):
            setattr(self, key, getattr(self, key) + getattr(stats, key))

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: Mapping) -> None:
        for key, value in state.items():
            if hasattr(self, key):  # older checkpoints lack the newer fields
                setattr(self, key, type(getattr(self, key))(value))


ROUND_PARTS = ("check_s", "comm_s", "pack_s", "unpack_s", "refresh_s")


def round_split(totals) -> dict[str, float]:
    """Where rounds' time went, by part (0.0 for a part ``totals`` does not record)."""
    return {key: float(getattr(totals, key, 0.0)) for key in ROUND_PARTS}


class ReplicaAverager:
    """Averages a fixed set of tensors over ``topology.replica_group``.

    ``tensors``: (name, tensor) pairs in the same order on every replica. ``copies``
    maps a name to a low-precision model copy refreshed from the averaged value in the
    same unpack pass (e.g. the bf16 parameter of an fp32 master). ``signature``: extra
    (name, shape, dtype) entries every replica must agree on before anything is averaged,
    e.g. ``module_signature(model)`` when the tensors are flat shards. ``scan``: views of
    the real elements to check for NaN/Inf, as (index into ``tensors``, view) pairs, when a
    tensor holds padding that is uninitialised memory (ZeRO-3); default: every tensor whole.
    """

    def __init__(
        self,
        tensors: Sequence[tuple[str, Tensor]],
        *,
        topology: Topology,
        copies: Mapping[str, Tensor] | None = None,
        bucket_mb: float = 64.0,
        kernel: str = "auto",
        check_finite: bool = True,
        signature: Sequence[tuple] = (),
        scan: Sequence[tuple[int, Tensor]] | None = None,
    ) -> None:
        self.topology = topology
        self.named = [(str(n), t) for n, t in tensors]
        copies = dict(copies or {})
        unknown = set(copies) - {n for n, _ in self.named}
        if unknown:
            raise ValueError(f"copies name tensors that are not averaged: {sorted(unknown)}")
        for name, t in self.named:
            if not t.is_floating_point():
                raise TypeError(f"cannot average {name}: dtype {t.dtype} is not floating point")
            if name in copies and copies[name].shape != t.shape:
                raise ValueError(f"copy of {name} has shape {tuple(copies[name].shape)}, expected {tuple(t.shape)}")
        self.check_finite = check_finite
        self.copy_of = [copies.get(name) for name, _ in self.named]  # per tensor, for overlapped rounds
        self.scan = list(scan) if scan is not None else list(enumerate(t for _, t in self.named))
        self.signature = [(str(n), tuple(shape), str(dtype)) for n, shape, dtype in signature]
        self.layout = self.signature + layout_of(self.named)  # a model difference is named first
        self.fingerprint = fingerprint(self.layout)
        self.bucket_numel = max(1, int(bucket_mb * 2**20) // FP32_BYTES)
        self.in_place, self.buckets = plan_buckets(self.named, copies, self.bucket_numel)
        devices = {t.device for _, t in self.named} or {torch.device("cpu")}
        self.backends = {d: get_backend(kernel, d) for d in devices}
        self.kernel_names = sorted({b.name for b in self.backends.values()})
        self._scratch: dict[torch.device, list[Tensor]] = {}
        self.totals = AveragerTotals()
        self.last: RoundStats | None = None

    @property
    def num_replicas(self) -> int:
        return self.topology.num_replicas

    @property
    def bytes_per_round(self) -> int:
        return FP32_BYTES * (sum(t.numel() for t in self.in_place) + sum(b.numel for b in self.buckets))

    @property
    def scratch_bytes(self) -> int:
        """Peak extra memory of a round: at most two buckets per device."""
        return sum(FP32_BYTES * s.numel() for bufs in self._scratch.values() for s in bufs)

    carries_anchors = False
    """Whether the averager keeps per-tensor state between rounds (a compressed one's anchors and
    residuals): then ``state_dict`` / ``load_state_dict`` carry it across a rebuild or a checkpoint."""

    def extra_bytes(self, *, overlapped: bool) -> int:
        """Bytes this averager holds beyond the engine's tensors. ``overlapped``: an overlapped round
        lends its scratch to the blocking rounds (``lend_scratch``), so those count there, not here."""
        return 0 if overlapped else self.scratch_bytes

    def lend_scratch(self, device: torch.device, buffers: list[Tensor]) -> None:
        """Blocking rounds on ``device`` use these buffers (an overlapped round's, while it is idle)."""
        self._scratch[device] = buffers

    def take_back_scratch(self, device: torch.device) -> None:
        """The lender needs its buffers: a blocking round meanwhile allocates its own."""
        self._scratch.pop(device, None)

    def _scratch_for(self, i: int, bucket: Bucket) -> Tensor:
        bufs = self._scratch.get(bucket.device)
        if bufs is None:
            size = max(b.numel for b in self.buckets if b.device == bucket.device)
            count = min(2, sum(b.device == bucket.device for b in self.buckets))
            bufs = self._scratch[bucket.device] = [
                torch.empty(size, dtype=torch.float32, device=bucket.device) for _ in range(count)
            ]
        return bufs[i % len(bufs)][: bucket.numel]

    @torch.no_grad()
    def average(self, step: int | None = None, *, lr: float | None = None, verdict: Verdict | None = None) -> RoundStats:
        """One sync round; ``step`` (completed optimizer steps) is checked equal on all replicas.

        ``lr``: this replica's learning rate for the next H; the round returns replica 0's in ``stats.lr``.
        ``verdict``: the pre-check already ran for this round (``check``); it is not repeated.
        """
        stats = RoundStats(tensors=len(self.named), buckets=len(self.buckets), in_place=len(self.in_place), lr=lr)
        if self.num_replicas == 1:
            self.record(stats)
            return stats
        start = time.perf_counter()
        round_no = self.totals.rounds + 1
        if verdict is None:
            verdict = self.check(step, what=f"sync round {round_no}", lr=lr, scan=False)
        else:
            start -= verdict.wait_s  # the round's time includes its pre-check wherever it ran
        stats.lr, stats.check_s = verdict.lr, verdict.wait_s
        try:
            self._reduce(stats, None if verdict.scanned else self._finite_check(step), what=f"sync round {round_no}")
        except (ReplicaMismatchError, ReplicaCommError):
            raise
        except RuntimeError as err:
            raise ReplicaCommError(
                f"sync round {round_no}: all-reduce over the replica group (ranks {self.topology.replica_group_ranks}) "
                f"failed (a rank died or timed out?); this rank's tensors may be partly averaged, resume from "
                f"the last checkpoint: {err}"
            ) from err
        stats.bytes = self.bytes_per_round
        stats.total_s = time.perf_counter() - start
        self.record(stats)
        return stats

    def check(self, step: int | None = None, *, what: str = "replica check", lr: float | None = None,
              scan: bool = True) -> Verdict:
        """A round's pre-check alone: every rank agrees on layout (and signature), step and finiteness.

        Raises the same ReplicaMismatchError on every rank, or ReplicaCommError when a rank is gone;
        for collectives over the replica group other than a round (e.g. the start-up broadcast).
        Returns replica 0's ``lr`` (see qsr_ds/sync/precheck.py). ``scan=False`` leaves finiteness to
        the round (``average`` hides the scan behind its first bucket; ``require_finite``).
        """
        if self.num_replicas == 1:
            return Verdict(lr=lr, wait_s=0.0)
        nonfinite = self._first_nonfinite() if scan or not self.check_finite else None
        try:
            return precheck.agree(
                self.topology, fingerprint=self.fingerprint, step=step, nonfinite_index=nonfinite,
                lr=lr, device=next(iter(self.backends)), layout=self.layout, signature_len=len(self.signature),
                names=[n for n, _ in self.named],
            )
        except ReplicaMismatchError:
            raise
        except RuntimeError as err:
            raise ReplicaCommError(
                f"{what}: the pre-round check over the replica and shard groups failed "
                f"(a rank died or timed out?); nothing was averaged: {err}"
            ) from err

    def require_finite(self, verdict: Verdict, step: int | None, *, what: str) -> Verdict:
        """``verdict`` with finiteness agreed too (scanning now if ``check`` left it out)."""
        if verdict.scanned:
            return verdict
        gate = self._finite_check(step)
        try:
            gate.start(self._first_nonfinite())
            gate.wait()
        except ReplicaMismatchError:
            raise
        except RuntimeError as err:
            raise ReplicaCommError(f"{what}: the NaN/Inf check over the replica and shard groups failed "
                                   f"(a rank died or timed out?); nothing was averaged: {err}") from err
        return Verdict(lr=verdict.lr, wait_s=verdict.wait_s + gate.wait_s)

    def _finite_check(self, step: int | None) -> precheck.FiniteCheck:
        return precheck.FiniteCheck(self.topology, fingerprint=self.fingerprint, step=step,
                                    device=next(iter(self.backends)), names=[n for n, _ in self.named])

    def _reduce(self, stats: RoundStats, gate: precheck.FiniteCheck | None = None, *, what: str = "") -> None:
        """Buckets, then the in-place tensors. ``gate``: the NaN/Inf verdict still to agree on; the
        scan runs while bucket 0 is on the wire, and nothing of this rank's is written before it passes."""
        group, scale = self.topology.replica_group, 1.0 / self.num_replicas
        sent = []

        def passed() -> None:
            nonlocal gate
            if gate is None:
                return
            if not gate.started:
                gate.start(self._first_nonfinite())
            try:
                stats.check_s += gate.wait()
            except ReplicaMismatchError:
                for work in sent:  # every rank drains the same all-reduces, then raises
                    work.wait()
                raise
            except RuntimeError as err:
                raise ReplicaCommError(f"{what}: the NaN/Inf check over the replica and shard groups failed "
                                       f"(a rank died or timed out?); nothing of this rank's was written, but "
                                       f"the world is broken: resume from the last checkpoint: {err}") from err
            gate = None

        pending = None
        for i, bucket in enumerate(self.buckets):
            buf = self._scratch_for(i, bucket)
            t0 = time.perf_counter()
            self.backends[bucket.device].pack(bucket.sources, buf, bucket.offsets, scale)
            stats.pack_s += time.perf_counter() - t0
            sent.append(dist.all_reduce(buf, group=group, async_op=True))
            if gate is not None and not gate.started:
                gate.start(self._first_nonfinite())
            if pending is not None:
                passed()
                self._finish(*pending, stats)
            pending = (bucket, buf, sent[-1])
        passed()
        handles = []
        for t in self.in_place:  # scale, then send at once: the next tensor scales while this one is on the wire
            t.mul_(scale)
            handles.append(dist.all_reduce(t, group=group, async_op=True))
        if pending is not None:
            self._finish(*pending, stats)
        t0 = time.perf_counter()
        for work in handles:
            work.wait()
        stats.comm_s += time.perf_counter() - t0
        if any(d.type == "cuda" for d in self.backends):
            torch.cuda.synchronize()

    def _finish(self, bucket: Bucket, buf: Tensor, work, stats: RoundStats) -> None:
        t0 = time.perf_counter()
        work.wait()
        t1 = time.perf_counter()
        self.backends[bucket.device].unpack(buf, bucket.sources, bucket.offsets, bucket.copies)
        stats.comm_s += t1 - t0
        stats.unpack_s += time.perf_counter() - t1

    def flat_units(self) -> dict[torch.device, list[int]]:
        """Indices into ``named`` by device, in order: the layout of an overlapped round's flat fp32
        snapshot of one device (tensor i at the summed numel of the earlier ones)."""
        units: dict[torch.device, list[int]] = {}
        for i, (_, t) in enumerate(self.named):
            units.setdefault(t.device, []).append(i)
        return units

    def correction_scratch_numel(self, device: torch.device, segment_numel: int) -> int:
        """fp32 elements per scratch buffer (two of them) that ``reduce_corrections`` needs on ``device``."""
        return segment_numel

    def reduce_corrections(self, snapshot: Tensor, segment_numel: int, scratch: Sequence[Tensor],
                           stats: RoundStats) -> None:
        """Overlapped rounds: overwrite a device's flat fp32 snapshot x_s (``flat_units`` layout) with
        mean(x_s) - x_s.

        Segment by segment: pack x_s / R into a scratch buffer, all-reduce it over the replica group,
        write (mean - x_s) back into the segment; segment i's all-reduce runs while segment i+1 packs
        into the other buffer (``scratch``: two buffers of at least ``segment_numel``). Uses only the
        replica group, so it may run on a background thread. A compressed averager overrides this
        with its own reduction (the correction a' - x_s); the caller only applies x += snapshot.
        """
        group, scale = self.topology.replica_group, 1.0 / self.num_replicas
        pending = None
        for i, segment in enumerate(snapshot.split(segment_numel)):
            if pending is not None and len(scratch) < 2:  # one buffer: no pipelining
                self._correct(*pending, stats)
                pending = None
            buf = scratch[i % len(scratch)][: segment.numel()]
            t0 = time.perf_counter()
            torch.mul(segment, scale, out=buf)  # the same fl(x * 1/R) terms as a blocking round's pack
            stats.pack_s += time.perf_counter() - t0
            work = dist.all_reduce(buf, group=group, async_op=True)
            if pending is not None:
                self._correct(*pending, stats)
            pending = (segment, buf, work)
        if pending is not None:
            self._correct(*pending, stats)

    def _correct(self, segment: Tensor, buf: Tensor, work, stats: RoundStats) -> None:
        t0 = time.perf_counter()
        work.wait()
        t1 = time.perf_counter()
        torch.sub(buf, segment, out=segment)
        stats.comm_s += t1 - t0
        stats.unpack_s += time.perf_counter() - t1

    def record(self, stats: RoundStats) -> None:
        """Count a finished round (also one an OverlappedRound ran) in ``last`` and the totals."""
        self.last = stats
        self.totals.add(stats)

    def _first_nonfinite(self) -> int:
        """Index (in ``named``) of the first tensor holding NaN/Inf in its scanned elements, else -1."""
        if not self.check_finite:
            return -1
        by_device: dict[torch.device, list[int]] = {}
        for i, t in enumerate(self.scan):
            by_device.setdefault(t[1].device, []).append(i)
        found = [
            self.scan[idx[j]][0]
            for d, idx in by_device.items()
            if (j := self.backends[d].first_nonfinite([self.scan[i][1] for i in idx])) >= 0
        ]
        return min(found, default=-1)
