"""Overlapped sync rounds: the replicas' all-reduce runs while training goes on (tau >= 1).

At a boundary after step s, ``start(s)`` runs the pre-check, copies this rank's averaged
tensors into one flat fp32 snapshot x_s and hands it to a background thread, which
rewrites it segment by segment into the correction mean(x_s) - x_s
(``ReplicaAverager.reduce_corrections``: pack x_s / R into a scratch bucket, all-reduce it
over the replica group, subtract). Training never waits for it. tau steps later,
``finish()`` joins the thread and applies x <- x + (mean(x_s) - x_s), i.e. the average of
the boundary plus this replica's own tau local steps, refreshing the low-precision copies
in the same pass.

Memory: one fp32 snapshot of the averaged tensors plus two scratch buckets per device,
allocated once at construction. The buckets are shared with the averager's blocking
rounds (they are lent to the thread only while a round is in flight), so the overlap costs
exactly the snapshot on top of a blocking round. x itself is never touched before finish,
so a failed round leaves every tensor as training left it.

Threads: while a round is in flight the replica group belongs to the background thread;
the main thread may use the shard group and the world group (separate gloo / NCCL
communicators) but must not issue collectives on the replica group until ``finish``.
On CUDA the thread works on its own stream, which waits for the snapshot copy and never
blocks the compute stream; the apply runs on the compute stream after the thread is done.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Mapping

import torch

from .averager import FP32_BYTES, ReplicaAverager, ReplicaCommError, RoundStats


@dataclass
class OverlapStats(RoundStats):
    """A round whose all-reduce ran behind training. ``comm_s`` is the exposed part: the time
    ``finish`` waited; ``pack_s`` the snapshot copy; ``unpack_s`` the apply; ``total_s`` all the
    time the training thread spent in ``start`` and ``finish``."""

    hidden_s: float = 0.0
    """Background time that ran while training went on: background_s minus the exposed wait."""
    background_s: float = 0.0
    """Wall time of the background thread (pack, all-reduce, corrections)."""
    background_comm_s: float = 0.0
    """Of which the thread waited on all-reduces."""
    overlap_steps: int = 0
    started_step: int | None = None
    """The boundary step whose x_s was averaged."""
    apply_step: int | None = None
    """The step after which the correction was applied (started_step + overlap_steps)."""


class _DeviceSnapshot:
    """The flat fp32 snapshot, its segments' scratch and the (target, copy) views on one device."""

    def __init__(self, averager: ReplicaAverager, device: torch.device, index: list[int], segment_cap: int) -> None:
        self.device = device
        self.targets = [averager.named[i][1] for i in index]
        self.copies = [averager.copy_of[i] for i in index]
        self.offsets, numel = [], 0
        for t in self.targets:
            self.offsets.append(numel)
            numel += t.numel()
        self.numel = numel
        self.segment_numel = max(1, min(segment_cap, numel))
        segments = -(-numel // self.segment_numel)
        # the averager's blocking round uses these buffers too: big and many enough for both, and for
        # what the averager's own reduce_corrections needs (e.g. a compressed round's wire bucket)
        blocking = [b.numel for b in averager.buckets if b.device == device]
        self.scratch_numel = max(self.segment_numel, max(blocking, default=0),
                                 averager.correction_scratch_numel(device, self.segment_numel))
        self.scratch_count = max(min(2, segments), min(2, len(blocking)))
        # zeros, not empty: the pages are committed now (an out-of-memory fails here, and the first
        # round does not pay for first-touch page faults on the training thread)
        self.snapshot = torch.zeros(numel, dtype=torch.float32, device=device)
        self.scratch = [torch.zeros(self.scratch_numel, dtype=torch.float32, device=device)
                        for _ in range(self.scratch_count)]
        self.views = [self.snapshot[o : o + t.numel()].view(t.shape) for t, o in zip(self.targets, self.offsets)]
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.ready = torch.cuda.Event() if cuda else None

    @property
    def extra_bytes(self) -> int:
        return FP32_BYTES * (self.numel + self.scratch_count * self.scratch_numel)


class OverlappedRound:
    """Start a round's all-reduce at a boundary, apply its correction ``overlap_steps`` later.

    Built from a ReplicaAverager (its tensors, copies, topology, back-ends and bucket plan);
    one round is in flight at most. The caller decides when: ``start(step)`` at the boundary,
    ``finish(step + overlap_steps)`` later, then refresh whatever the engine derives from the
    averaged tensors beyond ``copies``. ``segment_mb``: the largest piece of the snapshot
    all-reduced at once (MiB of fp32), capped by the averager's bucket; two scratch buffers of
    that size are all the memory beyond the snapshot.
    """

    def __init__(self, averager: ReplicaAverager, *, overlap_steps: int, segment_mb: float = 64.0) -> None:
        if not segment_mb > 0:
            raise ValueError(f"segment_mb must be > 0, got {segment_mb!r}")
        if isinstance(overlap_steps, bool) or not isinstance(overlap_steps, int) or overlap_steps < 1:
            raise ValueError(f"overlap_steps must be an integer >= 1 (0 is the blocking round), got {overlap_steps!r}")
        cls = type(averager)
        if cls.average is not ReplicaAverager.average and cls.reduce_corrections is ReplicaAverager.reduce_corrections:
            raise TypeError(
                f"{cls.__name__} averages its own way but does not define reduce_corrections, so an overlapped "
                f"round would send exact fp32 values past it: overlapped rounds do not support it yet"
            )
        self.averager = averager
        self.overlap_steps = overlap_steps
        self.devices: list[_DeviceSnapshot] = []
        # the averager's bucket may be as large as its flat shards (all-reduced in place by a blocking
        # round); a snapshot goes out in segments of at most segment_mb, so scratch stays small
        segment_numel = min(averager.bucket_numel, max(1, int(segment_mb * 2**20) // FP32_BYTES))
        if averager.num_replicas > 1:
            for device, index in averager.flat_units().items():
                snap = _DeviceSnapshot(averager, device, index, segment_numel)
                if snap.numel:
                    self.devices.append(snap)
                    averager.lend_scratch(device, snap.scratch)  # shared with blocking rounds, never both at once
        self.started_step: int | None = None
        self._apply_step: int | None = None
        self.round_no: int | None = None
        self._stats: OverlapStats | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def in_flight(self) -> bool:
        return self.started_step is not None

    @property
    def apply_step(self) -> int | None:
        """The step after which ``finish`` applies the round in flight (None when none is)."""
        return self._apply_step

    @property
    def segments(self) -> int:
        """Pieces the snapshot is all-reduced in (``buckets`` of the round's stats)."""
        return sum(-(-d.numel // d.segment_numel) for d in self.devices)

    def _round_bytes(self) -> int:
        """What a round puts into its collectives on this rank: the averager's own count (a compressed
        averager sends its quantized rows, not fp32)."""
        return self.averager.bytes_per_round if self.devices else 0

    @property
    def peak_extra_bytes(self) -> int:
        """Bytes this rank holds for overlapped rounds: the fp32 snapshot of every averaged tensor
        plus the scratch buckets, which replace (do not add to) the blocking round's scratch."""
        return sum(d.extra_bytes for d in self.devices)

    @torch.no_grad()
    def start(self, step: int, *, lr: float | None = None, verdict=None) -> OverlapStats:
        """Pre-check, snapshot, and start the all-reduce in the background. A NaN/Inf anywhere raises
        ReplicaMismatchError on every rank before anything starts. ``verdict``: the pre-check already
        ran for this round (``averager.check``), it is not repeated. Returns the round's stats
        (``lr``: replica 0's), which ``finish`` completes and records.
        """
        if self.in_flight:
            raise RuntimeError(
                f"overlapped sync round {self.round_no} (started after step {self.started_step}) is still in "
                f"flight: call finish() before starting another round"
            )
        t0 = time.perf_counter()
        round_no = self.averager.totals.rounds + 1
        if verdict is None:
            verdict = self.averager.check(step, what=f"overlapped sync round {round_no}", lr=lr)
        else:
            t0 -= verdict.wait_s  # the round's time includes its pre-check wherever it ran
            verdict = self.averager.require_finite(verdict, step, what=f"overlapped sync round {round_no}")
        stats = OverlapStats(tensors=len(self.averager.named), buckets=self.segments, lr=verdict.lr,
                             check_s=verdict.wait_s, overlap_steps=self.overlap_steps, started_step=step,
                             apply_step=step + self.overlap_steps)
        t1 = time.perf_counter()
        for dev in self.devices:
            self.averager.take_back_scratch(dev.device)  # a blocking round meanwhile gets its own buffers
            torch._foreach_copy_(dev.views, dev.targets)
            if dev.ready is not None:
                dev.ready.record(torch.cuda.current_stream(dev.device))
        stats.pack_s = time.perf_counter() - t1
        stats.bytes = self._round_bytes()
        self.started_step, self._apply_step, self.round_no = step, step + self.overlap_steps, round_no
        self._stats, self._error = stats, None
        if self.devices:
            self._thread = threading.Thread(target=self._communicate, name=f"qsr-overlap-round-{round_no}",
                                            daemon=True)
            self._thread.start()
        stats.total_s = time.perf_counter() - t0
        return stats

    def _communicate(self) -> None:
        t0 = time.perf_counter()
        inner = RoundStats()
        try:
            for dev in self.devices:
                with self._on_side_stream(dev):
                    self.averager.reduce_corrections(dev.snapshot, dev.segment_numel, dev.scratch, inner)
        except BaseException as err:  # noqa: BLE001 - surfaced by finish() on the training thread
            self._error = err
        self._stats.background_comm_s = inner.comm_s
        self._stats.background_s = time.perf_counter() - t0

    @contextlib.contextmanager
    def _on_side_stream(self, dev: _DeviceSnapshot):
        if dev.stream is None:
            yield
            return
        torch.cuda.set_device(dev.device)
        dev.stream.wait_event(dev.ready)  # the snapshot copy, queued on the compute stream
        with torch.cuda.stream(dev.stream):
            yield
        dev.stream.synchronize()  # blocks this thread only; finish() then reads a finished snapshot

    def _wait(self) -> float:
        """Join the background thread; raise ReplicaCommError (round abandoned, nothing applied) if it failed."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        waited = time.perf_counter() - t0
        if self._error is not None:
            err, round_no, step = self._error, self.round_no, self.started_step
            self._abandon()
            if not isinstance(err, RuntimeError):
                raise err
            raise ReplicaCommError(
                f"overlapped sync round {round_no} (started after step {step}): all-reduce over the replica "
                f"group (ranks {self.averager.topology.replica_group_ranks}) failed (a rank died or timed out?); "
                f"nothing was applied, this rank's tensors hold only its own local steps; resume from the last "
                f"checkpoint: {err}"
            ) from err
        return waited

    def _abandon(self) -> None:
        for dev in self.devices:
            self.averager.lend_scratch(dev.device, dev.scratch)
        self.started_step = self._apply_step = self.round_no = self._stats = self._error = None

    @torch.no_grad()
    def finish(self, step: int | None = None) -> OverlapStats:
        """Wait for the round in flight and apply x <- x + (mean(x_s) - x_s), refreshing ``copies``.

        ``step`` (completed steps now), when given, must be the round's ``apply_step``.
        """
        if not self.in_flight:
            raise RuntimeError("no overlapped sync round is in flight: start() one first")
        if step is not None and step != self.apply_step:
            raise ValueError(
                f"overlapped sync round {self.round_no} applies after step {self.apply_step} "
                f"(started after step {self.started_step}), not after step {step}"
            )
        stats = self._stats
        t0 = time.perf_counter()
        stats.comm_s += self._wait()
        stats.hidden_s = max(0.0, stats.background_s - stats.comm_s)
        t1 = time.perf_counter()
        for dev in self.devices:
            # snapshot <- x + correction in fp32 (exact widening of any x), then x and its copy rounded once
            torch._foreach_add_(dev.views, dev.targets)
            self.averager.backends[dev.device].unpack(dev.snapshot, dev.targets, dev.offsets, dev.copies)
        stats.unpack_s = time.perf_counter() - t1
        stats.total_s += time.perf_counter() - t0
        self._abandon()
        self.averager.record(stats)
        return stats

    def state_dict(self) -> dict:
        """What resume needs. With a round in flight this waits for its communication (raising
        ReplicaCommError if it failed) and saves the correction (mean(x_s) - x_s, on the CPU) and the
        step it applies after; the averaged tensors themselves are checkpointed by the engine."""
        state = {"overlap_steps": self.overlap_steps, "in_flight": self.in_flight}
        if not self.in_flight:
            return state
        self._stats.comm_s += self._wait()
        state.update(
            started_step=self.started_step, apply_step=self.apply_step, round=self.round_no,
            fingerprint=self.averager.fingerprint, lr=self._stats.lr,
            corrections=[dev.snapshot.to("cpu", copy=True) for dev in self.devices],
        )
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a round saved in flight, so ``finish`` applies the same correction after the same step."""
        if self.in_flight:
            raise RuntimeError("cannot load an overlapped round while another one is in flight")
        if not state.get("in_flight"):
            return
        if state["fingerprint"] != self.averager.fingerprint:
            raise ValueError(
                "the checkpoint's overlapped round was taken over a different set of averaged tensors "
                "(layout fingerprint differs): cannot apply its correction"
            )
        saved = [tuple(c.shape) for c in state["corrections"]]
        if saved != [(d.numel,) for d in self.devices]:
            raise ValueError(f"the checkpoint's round correction has sizes {saved}, this averager needs "
                             f"{[(d.numel,) for d in self.devices]}")
        for dev, corr in zip(self.devices, state["corrections"]):
            dev.snapshot.copy_(corr)
        self.started_step, self._apply_step = int(state["started_step"]), int(state["apply_step"])
        self.round_no, self._error, self._thread = int(state["round"]), None, None
        self._stats = OverlapStats(tensors=len(self.averager.named), buckets=self.segments, lr=state.get("lr"),
                                   bytes=self._round_bytes(),
                                   overlap_steps=self._apply_step - self.started_step,
                                   started_step=self.started_step, apply_step=self._apply_step)
