"""The Triton back-end: one launch packs a list of tensors, one launch unpacks them.

Pointer table: the tensors of one launch share a dtype; each is addressed as a signed
element offset ("delta") from the first tensor's pointer, so one typed base pointer
reaches them all and Triton's pointer arithmetic (and its alignment analysis) applies.
A block table (tensor index, first element) cuts the work into BLOCK-element pieces, one
program each; a piece never spans two tensors, so every access is one masked vector.
When every pointer, offset and size is a multiple of VEC elements, the launch says so
(tl.multiple_of) and loads and stores go 16 bytes wide.

The unpack launch writes the fp32 (or other) target and the rounded bf16/fp16 model copy
from the same loaded values, and zeroes the reset tensors of the target's dtype in the
same grid (their blocks come after the targets'). Tables are cached per call signature
(the same buckets every round), so a round costs two small kernel launches per bucket.

On CPU this runs only under TRITON_INTERPRET=1 (tests); ``load(cpu)`` says so otherwise.
Values are converted through fp32, which is exact for the interpreter too.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

import triton
import triton.language as tl

from .reference import ReferenceKernels

BLOCK = 4096
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TABLE_CACHE_LIMIT = 256


@triton.jit
def _pack_kernel(src_base, bucket, deltas, numels, offsets, block_tensor, block_start, scale,
                 BLOCK: tl.constexpr, VEC: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    delta = tl.multiple_of(tl.load(deltas + t), VEC)
    n = tl.multiple_of(tl.load(numels + t), VEC)
    off = tl.multiple_of(tl.load(offsets + t), VEC)
    idx = start + tl.arange(0, BLOCK)
    mask = idx < n
    x = tl.load(src_base + delta + idx, mask=mask)
    tl.store(bucket + off + idx, x.to(tl.float32) * scale, mask=mask)


@triton.jit
def _unpack_kernel(bucket, dst_base, copy_base, deltas, copy_deltas, numels, offsets, block_tensor, block_start,
                   n_targets, HAS_COPY: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    delta = tl.multiple_of(tl.load(deltas + t), VEC)
    n = tl.multiple_of(tl.load(numels + t), VEC)
    idx = start + tl.arange(0, BLOCK)
    mask = idx < n
    if t < n_targets:
        off = tl.multiple_of(tl.load(offsets + t), VEC)
        v = tl.load(bucket + off + idx, mask=mask)
        tl.store(dst_base + delta + idx, v.to(dst_base.dtype.element_ty), mask=mask)
        if HAS_COPY:
            cdelta = tl.multiple_of(tl.load(copy_deltas + t), VEC)
            tl.store(copy_base + cdelta + idx, v.to(copy_base.dtype.element_ty), mask=mask)
    else:  # a reset tensor of the target dtype
        zero = tl.zeros([BLOCK], dtype=dst_base.dtype.element_ty)
        tl.store(dst_base + delta + idx, zero, mask=mask)


@triton.jit
def _nonfinite_kernel(base, deltas, numels, block_tensor, block_start, flags, BLOCK: tl.constexpr,
                      VEC: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    delta = tl.multiple_of(tl.load(deltas + t), VEC)
    n = tl.multiple_of(tl.load(numels + t), VEC)
    idx = start + tl.arange(0, BLOCK)
    mask = idx < n
    x = tl.load(base + delta + idx, mask=mask, other=0.0).to(tl.float32)
    bad = tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=0)
    if bad > 0:
        tl.store(flags + t, 1)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def load(device: torch.device) -> tuple["TritonKernels | None", str]:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None, "CUDA is not available"
        return TritonKernels(), ""
    if device.type == "cpu" and _interpreting():
        return TritonKernels(), ""
    return None, f"Triton kernels run on CUDA tensors (on CPU only under TRITON_INTERPRET=1), not {device.type}"


def _ok(t: Tensor, device: torch.device) -> bool:
    return t.is_contiguous() and t.dtype in FAST_DTYPES and t.device == device


def _vec(ptrs: Sequence[tuple[int, int]], numels: Sequence[int], offsets: Sequence[int]) -> int:
    """The largest element count (16 bytes of the narrowest dtype at most) that divides every
    size and offset, with every (pointer, element size) aligned to that many elements or 16 bytes."""
    vec = 16 // min(size for _, size in ptrs)
    while vec > 1:
        if all(p % min(16, vec * size) == 0 for p, size in ptrs) and all(n % vec == 0 for n in numels) and all(
                o % vec == 0 for o in offsets):
            return vec
        vec //= 2
    return 1


class _Tables:
    """Device-side int64 tables for one launch."""

    def __init__(self, device, deltas, numels, offsets, copy_deltas=None):
        blocks_t, blocks_s = [], []
        for i, n in enumerate(numels):
            for s in range(0, n, BLOCK):
                blocks_t.append(i)
                blocks_s.append(s)
        rows = [deltas, numels, offsets or [0] * len(numels), copy_deltas or [0] * len(numels)]
        packed = torch.tensor(rows, dtype=torch.int64) if numels else torch.zeros((4, 0), dtype=torch.int64)
        blocks = torch.tensor([blocks_t, blocks_s], dtype=torch.int64).reshape(2, -1)
        both = torch.cat([packed.reshape(-1), blocks.reshape(-1)]).to(device, non_blocking=False)
        k = len(numels)
        self.deltas, self.numels, self.offsets, self.copy_deltas = (both[i * k:(i + 1) * k] for i in range(4))
        nb = len(blocks_t)
        self.block_tensor = both[4 * k:4 * k + nb]
        self.block_start = both[4 * k + nb:]
        self.grid = (nb,)


class TritonKernels:
    name = "triton"

    def __init__(self) -> None:
        self._reference = ReferenceKernels()
        self._tables: dict[tuple, _Tables] = {}

    # -- table cache --------------------------------------------------------------------
    def _cached(self, key: tuple, make) -> _Tables:
        tables = self._tables.get(key)
        if tables is None:
            if len(self._tables) >= _TABLE_CACHE_LIMIT:
                self._tables.clear()
            tables = self._tables[key] = make()
        return tables

    # -- pack -----------------------------------------------------------------------------
    def pack(self, sources: Sequence[Tensor], bucket: Tensor, offsets: Sequence[int], scale: float) -> None:
        device = bucket.device
        groups: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(sources):
            if t.numel() == 0:
                continue
            if _ok(t, device):
                groups.setdefault(t.dtype, []).append(i)
            else:  # same two steps as the reference: copy into fp32, then scale
                view = bucket[offsets[i]: offsets[i] + t.numel()]
                view.view(t.shape).copy_(t)
                view.mul_(scale)
        for dtype, idx in groups.items():
            base = sources[idx[0]]
            elsize = base.element_size()
            ptrs = [sources[i].data_ptr() for i in idx]
            numels = [sources[i].numel() for i in idx]
            offs = [offsets[i] for i in idx]
            key = ("pack", dtype, bucket.data_ptr(), tuple(ptrs), tuple(numels), tuple(offs))

            def make():
                deltas = [(p - ptrs[0]) // elsize for p in ptrs]
                return _Tables(device, deltas, numels, offs)

            tb = self._cached(key, make)
            vec = _vec([(p, elsize) for p in ptrs] + [(bucket.data_ptr(), 4)], numels, offs)
            _pack_kernel[tb.grid](base, bucket, tb.deltas, tb.numels, tb.offsets, tb.block_tensor, tb.block_start,
                                  float(scale), BLOCK=BLOCK, VEC=vec, num_warps=8)

    # -- unpack ---------------------------------------------------------------------------
    def unpack(self, bucket: Tensor, targets: Sequence[Tensor], offsets: Sequence[int],
               copies: Sequence[Tensor | None], resets: Sequence[Tensor] = ()) -> None:
        device = bucket.device
        copies = list(copies) if copies else [None] * len(targets)
        groups: dict[tuple, list[int]] = {}
        for i, (t, c) in enumerate(zip(targets, copies)):
            if t.numel() == 0:
                continue
            if _ok(t, device) and (c is None or _ok(c, device)):
                groups.setdefault((t.dtype, None if c is None else c.dtype), []).append(i)
            else:
                view = bucket[offsets[i]: offsets[i] + t.numel()].view(t.shape)
                t.copy_(view)
                if c is not None:
                    c.copy_(view)
        reset_groups: dict[torch.dtype, list[Tensor]] = {}
        for r in resets:
            if r.numel() == 0:
                continue
            if _ok(r, device):
                reset_groups.setdefault(r.dtype, []).append(r)
            else:
                r.zero_()
        if not groups and reset_groups:  # resets alone: a launch over them as "targets" of nothing
            for dtype, rs in reset_groups.items():
                self._launch_unpack(bucket, [], [], [], rs)
            return
        for key, idx in groups.items():
            rs = reset_groups.pop(key[0], [])  # resets of the target dtype ride in the same launch
            self._launch_unpack(bucket, [targets[i] for i in idx], [offsets[i] for i in idx],
                                [copies[i] for i in idx], rs)
        for rs in reset_groups.values():
            self._launch_unpack(bucket, [], [], [], rs)

    def _launch_unpack(self, bucket: Tensor, targets, offsets, copies, resets) -> None:
        device = bucket.device
        every = list(targets) + list(resets)
        base = every[0]
        elsize = base.element_size()
        ptrs = [t.data_ptr() for t in every]
        numels = [t.numel() for t in every]
        has_copy = bool(copies) and copies[0] is not None
        cptrs = [c.data_ptr() for c in copies] if has_copy else []
        key = ("unpack", base.dtype, copies[0].dtype if has_copy else None, bucket.data_ptr(), tuple(ptrs),
               tuple(numels), tuple(offsets), tuple(cptrs), len(targets))

        def make():
            deltas = [(p - ptrs[0]) // elsize for p in ptrs]
            cdeltas = [(p - cptrs[0]) // copies[0].element_size() for p in cptrs] if has_copy else None
            return _Tables(device, deltas, numels, list(offsets) + [0] * len(resets),
                           (cdeltas + [0] * len(resets)) if has_copy else None)

        tb = self._cached(key, make)
        csize = copies[0].element_size() if has_copy else elsize
        vec = _vec([(p, elsize) for p in ptrs] + [(p, csize) for p in cptrs] + [(bucket.data_ptr(), 4)], numels,
                   list(offsets))
        copy_base = copies[0] if has_copy else base
        _unpack_kernel[tb.grid](bucket, base, copy_base, tb.deltas, tb.copy_deltas, tb.numels, tb.offsets,
                                tb.block_tensor, tb.block_start, len(targets), HAS_COPY=has_copy, BLOCK=BLOCK,
                                VEC=vec, num_warps=8)

    # -- non-finite scan ------------------------------------------------------------------
    def first_nonfinite(self, tensors: Sequence[Tensor]) -> int:
        if not tensors:
            return -1
        device = tensors[0].device
        if not all(_ok(t, device) for t in tensors):
            from .cpp import _first_nonfinite_slow

            return _first_nonfinite_slow(self._reference, tensors)
        flags = torch.zeros(len(tensors), dtype=torch.int32, device=device)
        groups: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            if t.numel():
                groups.setdefault(t.dtype, []).append(i)
        for dtype, idx in groups.items():
            base = tensors[idx[0]]
            elsize = base.element_size()
            ptrs = [tensors[i].data_ptr() for i in idx]
            numels = [tensors[i].numel() for i in idx]
            key = ("scan", dtype, tuple(ptrs), tuple(numels))
            tb = self._cached(key, lambda: _Tables(device, [(p - ptrs[0]) // elsize for p in ptrs], numels, None))
            vec = _vec([(p, elsize) for p in ptrs], numels, [])
            sub = torch.zeros(len(idx), dtype=torch.int32, device=device)
            _nonfinite_kernel[tb.grid](base, tb.deltas, tb.numels, tb.block_tensor, tb.block_start, sub,
                                       BLOCK=BLOCK, VEC=vec, num_warps=8)
            flags[torch.tensor(idx, device=device)] = sub
        bad = flags.nonzero()
        return int(bad[0, 0]) if bad.numel() else -1
