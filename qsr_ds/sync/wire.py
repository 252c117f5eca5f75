"""The wire layout of compressed rounds (qsr_ds/sync/compress.py): buckets, segments, rows.

A bucket holds pieces: flat element ranges of the averaged tensors (a tensor larger than a
bucket is cut at multiples of the int8 block, a non-contiguous one stays whole), so the
quantization never depends on the bucket size. A bucket's row is what one rank sends for
it, one or more segments, each [fp32 scales | q | padding to 16 bytes]; the all-gather
route has one segment per bucket, the owner route R (segment j reduced by replica j),
cut at block boundaries with about the same number of elements each.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

ROW_ALIGN = 16  # bytes: every segment (and so every replica's scales) stays 16-byte aligned
FP32_BYTES = 4


@dataclass
class Piece:
    """Elements [start, end) of averaged tensor ``index``; ``offset`` / ``block_offset``: its first
    element in the segment's q and its first block in the segment's scales."""

    index: int
    start: int
    end: int
    offset: int = 0
    block_offset: int = 0

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass
class Segment:
    pieces: list[Piece] = field(default_factory=list)
    numel: int = 0
    blocks: int = 0
    byte_offset: int = 0
    """Where the segment starts in its bucket's row."""
    scale_bytes: int = 0
    row_bytes: int = 0
    """Scales, q and padding."""

    def add(self, index: int, start: int, end: int, block: int, int8: bool) -> None:
        self.pieces.append(Piece(index, start, end, self.numel, self.blocks))
        self.numel += end - start
        self.blocks += -(-(end - start) // block) if int8 else 0

    def close(self, byte_offset: int, int8: bool) -> None:
        self.byte_offset = byte_offset
        self.scale_bytes = FP32_BYTES * self.blocks
        q_bytes = self.numel * (1 if int8 else 2)
        self.row_bytes = -(-(self.scale_bytes + q_bytes) // ROW_ALIGN) * ROW_ALIGN


@dataclass
class WireBucket:
    device: torch.device
    pieces: list[Piece] = field(default_factory=list)
    numel: int = 0
    segments: list[Segment] = field(default_factory=list)

    @property
    def blocks(self) -> int:
        return sum(s.blocks for s in self.segments)

    @property
    def row_bytes(self) -> int:
        return sum(s.row_bytes for s in self.segments)


def plan_wire(tensors: Sequence[Tensor], copies: Sequence[Tensor | None], *, int8: bool, block: int,
              bucket_numel: int, parts: int) -> list[WireBucket]:
    """Buckets of at most ``bucket_numel`` elements (a multiple of ``block``), each cut into ``parts`` segments."""
    buckets: list[WireBucket] = []
    open_by_device: dict[torch.device, WireBucket] = {}
    for i, t in enumerate(tensors):
        n, copy = t.numel(), copies[i]
        whole = not t.is_contiguous() or (copy is not None and not copy.is_contiguous())
        ranges = [(0, n)] if whole or n <= bucket_numel else [
            (s, min(n, s + bucket_numel)) for s in range(0, n, bucket_numel)]
        for start, end in ranges:
            bucket = open_by_device.get(t.device)
            if bucket is None or (bucket.pieces and bucket.numel + end - start > bucket_numel):
                bucket = open_by_device[t.device] = WireBucket(t.device)
                buckets.append(bucket)
            bucket.pieces.append(Piece(i, start, end, bucket.numel))
            bucket.numel += end - start
    for bucket in buckets:
        bucket.segments = _split(bucket, tensors, int8=int8, block=block, parts=parts)
    return buckets


def _split(bucket: WireBucket, tensors: Sequence[Tensor], *, int8: bool, block: int, parts: int) -> list[Segment]:
    step = block if int8 else 1  # cuts fall on block boundaries of the tensor
    target = -(-bucket.numel // parts)
    segments = [Segment()]
    for piece in bucket.pieces:
        t = tensors[piece.index]
        start = piece.start
        while start < piece.end:
            if segments[-1].numel >= target and len(segments) < parts:
                segments.append(Segment())
            room = target - segments[-1].numel
            if not t.is_contiguous() or len(segments) == parts:
                end = piece.end
            else:
                end = min(piece.end, start + -(-room // step) * step)
            segments[-1].add(piece.index, start, end, block, int8)
            start = end
    segments += [Segment() for _ in range(parts - len(segments))]
    offset = 0
    for s in segments:
        s.close(offset, int8)
        offset += s.row_bytes
    return segments


def view(t: Tensor | None, piece: Piece) -> Tensor | None:
    """The piece's elements of a tensor (or of its anchor / residual), or the tensor when not contiguous."""
    if t is None or not t.is_contiguous():
        return t
    return t.view(-1)[piece.start: piece.end]


def row_views(segment: Segment, rows: Tensor, int8: bool) -> tuple[Tensor, Tensor | None]:
    """(q, scales) of a segment inside ``rows`` (uint8 [..., bytes] starting at the segment)."""
    if segment.numel == 0:  # (an owner with nothing to reduce: a bucket smaller than R blocks)
        shape = (*rows.shape[:-1], 0)
        q = torch.empty(shape, dtype=torch.int8 if int8 else torch.bfloat16, device=rows.device)
        return q, torch.empty(shape, dtype=torch.float32, device=rows.device) if int8 else None
    q_bytes = segment.numel * (1 if int8 else 2)
    q = rows[..., segment.scale_bytes: segment.scale_bytes + q_bytes].view(torch.int8 if int8 else torch.bfloat16)
    scales = rows[..., : segment.scale_bytes].view(torch.float32) if int8 else None
    return q, scales
