"""The sync rounds of benchmarks/accuracy.py's in-process replicas, with the library's arithmetic.

R replicas live in one process, each as one flat fp32 parameter buffer (LocalOptimizer's
``flat_params``: one averaged tensor). A boundary is applied the way ``qsr_ds.SyncCore``
would apply it on R ranks with S = 1 and the torch reference kernels:

* exact, blocking: ReplicaAverager's sum of the pre-scaled fl(x_r / R) in replica order;
* overlapped (tau >= 1): snapshot x_s of every replica at the boundary, the same mean of the
  snapshots, and tau steps later x <- (mean(x_s) - x_s) + x (qsr_ds/sync/overlap.py). A round
  whose next H <= tau, and the last round, block (SyncCore._close_round);
* compressed ("bf16" / "int8"): CompressedAverager's gather route (qsr_ds/sync/compress.py): one
  anchor a (the same bits on every replica, so one tensor here), a residual e per replica,
  d = x - a + e quantized by ``ReferenceKernels.quantize`` into that replica's row, the rows
  dequantized and summed in fp32 in replica order by ``ReferenceKernels.dequantize``, which
  writes a' = a + sum / R into the anchor; every replica gets a'. Blocks of
  ``qsr_ds.sync.compress.DEFAULT_BLOCK`` elements from the buffer's first element.

Both compose: an overlapped compressed round quantizes the snapshots and its correction is
a' - x_s. tests/dist/test_accuracy_sim.py checks all of it against LocalOptimizer on gloo ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qsr_ds.sync.compress import DEFAULT_BLOCK
from qsr_ds.kernels.reference import ReferenceKernels


@dataclass(frozen=True, kw_only=True)
class RoundVariant:
    """How a method's rounds run, on top of its sync schedule."""

    overlap_steps: int = 0
    """tau: apply each round's correction this many steps after its boundary (0: blocking)."""
    compress: str | None = None
    """None (exact fp32 rounds), "bf16" or "int8" (deltas from the anchor, error-fed back)."""


@torch.no_grad()
def replica_mean(flats: list[Tensor]) -> Tensor:
    """ReplicaAverager's average for S = 1: each replica's fp32 tensor pre-scaled by 1/R, the R
    products summed in replica order. (gloo's ring all-reduce adds the same R addends, but in a
    chunk-dependent order: the same float for R = 2, about an ulp apart for R > 2.)"""
    scale = 1.0 / len(flats)
    total = flats[0] * scale
    for flat in flats[1:]:
        total += flat * scale
    return total


@torch.no_grad()
def average_replicas_(flats: list[Tensor]) -> None:
    """A blocking exact round: every replica gets ``replica_mean``."""
    total = replica_mean(flats)
    for flat in flats:
        flat.copy_(total)


class CompressedExchange:
    """CompressedAverager's gather-route round on R flat buffers, with the torch reference kernels."""

    def __init__(self, flats: list[Tensor], mode: str, block: int = DEFAULT_BLOCK) -> None:
        n, r = flats[0].numel(), len(flats)
        self.kernels, self.mode, self.block = ReferenceKernels(), mode, block
        self.anchor = flats[0].detach().clone()  # built right after the start-up broadcast: the shared weights
        self.residuals = [torch.zeros(n, dtype=torch.float32) for _ in flats]
        self.q = torch.empty(r, n, dtype=torch.int8 if mode == "int8" else torch.bfloat16)
        self.scales = torch.empty(r, -(-n // block), dtype=torch.float32) if mode == "int8" else None

    @torch.no_grad()
    def exchange(self, sources: list[Tensor]) -> Tensor:
        """a' from every replica's q(source - a + e); updates the residuals and the anchor."""
        for r, (x, e) in enumerate(zip(sources, self.residuals)):
            self.kernels.quantize(self.mode, self.block, [x], [self.anchor], [e], self.q[r],
                                  None if self.scales is None else self.scales[r], [0], [0])
        out = torch.empty_like(self.anchor)
        self.kernels.dequantize(self.mode, self.block, self.q, self.scales, [out], [self.anchor], [None], [0], [0],
                                1.0 / len(sources))
        return out


class ReplicaRounds:
    """What a boundary does to the replicas' flat buffers under a RoundVariant."""

    def __init__(self, flats: list[Tensor], variant: RoundVariant) -> None:
        self.flats, self.tau = flats, variant.overlap_steps
        self.compressed = CompressedExchange(flats, variant.compress) if variant.compress else None
        self.pending: list[Tensor] | None = None
        self.steps_left = 0
        self.overlapped = 0
        """Rounds that ran behind training (the others blocked)."""
        self.applied_at: list[int] = []
        """Completed steps after which an overlapped round's correction was applied."""

    def _average(self, sources: list[Tensor]) -> Tensor:
        return self.compressed.exchange(sources) if self.compressed else replica_mean(sources)

    @torch.no_grad()
    def boundary(self, next_h: int, finished: bool) -> None:
        """The round a boundary closes; ``next_h`` and ``finished`` are the tracker's after it."""
        assert self.pending is None, "a round is still in flight at a boundary"
        if self.tau and not finished and next_h > self.tau:
            snapshots = [f.clone() for f in self.flats]
            mean = self._average(snapshots)
            self.pending = [mean - s for s in snapshots]
            self.steps_left = self.tau
            self.overlapped += 1
            return
        total = self._average(self.flats)
        for flat in self.flats:
            flat.copy_(total)

    @torch.no_grad()
    def after_step(self, completed_steps: int) -> None:
        """A step that closed no round: apply the correction in flight when it is due."""
        if self.pending is None:
            return
        self.steps_left -= 1
        if self.steps_left == 0:
            for flat, correction in zip(self.flats, self.pending):
                flat.copy_(correction + flat)  # OverlappedRound.finish: snapshot += x, then x <- snapshot
            self.pending = None
            self.applied_at.append(completed_steps)
