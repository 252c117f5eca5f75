"""How a round lays out its tensors: the model signature and layout fingerprint every replica
must agree on, the in-place tensors and packed buckets of a round, and flat fp32 parameter
buffers (all-reduced in place, no packing at all)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor


@dataclass
class Bucket:
    """Pieces of tensors packed into one fp32 buffer, all-reduced as one."""

    device: torch.device
    sources: list[Tensor] = field(default_factory=list)
    copies: list[Tensor | None] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    numel: int = 0
    capacity: int = 0


def _flat_chunks(tensor: Tensor, chunk: int) -> list[Tensor]:
    if not tensor.is_contiguous() or tensor.numel() <= chunk:
        return [tensor]
    flat = tensor.view(-1)
    return [flat[i : i + chunk] for i in range(0, flat.numel(), chunk)]


def layout_of(named: Sequence[tuple[str, Tensor]]) -> list[tuple[str, tuple, str]]:
    return [(name, tuple(t.shape), str(t.dtype).replace("torch.", "")) for name, t in named]


def module_signature(module) -> list[tuple[str, tuple, str]]:
    """(name, shape, dtype) of every parameter of a module, in registration order.

    For averagers whose tensors are flat shards (ZeRO): two replicas running different model
    code can hold shards of the same size, which the shards' own layout cannot tell apart.
    Partitioned ZeRO-3 parameters report their full shape (``ds_shape``).
    """
    return [
        (f"module:{name}", tuple(getattr(p, "ds_shape", None) or p.shape), str(p.dtype).replace("torch.", ""))
        for name, p in module.named_parameters()
    ]


def fingerprint(layout: Iterable[tuple]) -> int:
    digest = hashlib.sha256(repr(list(layout)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


def params_digest(named: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 of names, shapes and fp32 bytes: equal iff the tensors are bitwise equal (summaries, tests)."""
    digest = hashlib.sha256()
    for name, t in named:
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        digest.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def plan_buckets(named: Sequence[tuple[str, Tensor]], copies: Mapping[str, Tensor],
                 bucket_numel: int) -> tuple[list[Tensor], list[Bucket]]:
    """A round's layout: the contiguous fp32 tensors of at least half a bucket (without a model
    copy) are all-reduced in place; the rest go, in order, into buckets per (device, dtype). The
    k-th bucket of a kind holds at most min(bucket, lead * 2^k, half of what is left of that kind),
    lead = bucket / 16: the first pack and the last unpack, which nothing overlaps, stay short.
    Tensors are cut into pieces of max(lead, min(bucket, 64K)) elements."""
    lead = max(1, bucket_numel // 16)
    piece = max(lead, min(bucket_numel, 1 << 16))  # tiny buckets: no flood of tiny views
    in_place: list[Tensor] = []
    pieces: list[tuple[tuple, Tensor, Tensor | None]] = []
    for name, t in named:
        copy = copies.get(name)
        if copy is None and t.dtype == torch.float32 and t.is_contiguous() and t.numel() >= bucket_numel // 2:
            in_place.append(t)
            continue
        sources = _flat_chunks(t, piece)
        copy_chunks = _flat_chunks(copy, piece) if copy is not None else [None] * len(sources)
        if len(copy_chunks) != len(sources):  # a non-contiguous copy: keep the tensor whole
            sources, copy_chunks = [t], [copy]
        pieces += [((t.device, t.dtype), src, cp) for src, cp in zip(sources, copy_chunks)]
    left: dict[tuple, int] = {}
    for key, src, _ in pieces:
        left[key] = left.get(key, 0) + src.numel()
    buckets: list[Bucket] = []
    open_buckets: dict[tuple, Bucket] = {}
    made: dict[tuple, int] = {}
    for key, src, cp in pieces:
        bucket = open_buckets.get(key)
        if bucket is None or bucket.numel + src.numel() > bucket.capacity and bucket.sources:
            k = made[key] = made.get(key, -1) + 1
            capacity = min(bucket_numel, lead << min(k, 62), max(lead, left[key] // 2))
            bucket = open_buckets[key] = Bucket(key[0], capacity=capacity)
            buckets.append(bucket)
        bucket.sources.append(src)
        bucket.copies.append(cp)
        bucket.offsets.append(bucket.numel)
        bucket.numel += src.numel()
        left[key] -= src.numel()
    return in_place, buckets


def flatten_into_buffer(tensors: Sequence[Tensor]) -> Tensor:
    """Re-point fp32 tensors (e.g. parameters) as views of one new flat fp32 buffer.

    Later rounds all-reduce that buffer in place: no packing at all.
    """
    if not tensors:
        raise ValueError("nothing to flatten")
    devices = {t.device for t in tensors}
    if len(devices) != 1 or any(t.dtype != torch.float32 for t in tensors):
        raise TypeError("flatten_into_buffer needs fp32 tensors on one device")
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=torch.float32, device=devices.pop())
    offset = 0
    for t in tensors:
        view = flat[offset : offset + t.numel()].view_as(t)
        view.copy_(t)
        t.data = view
        offset += t.numel()
    return flat
