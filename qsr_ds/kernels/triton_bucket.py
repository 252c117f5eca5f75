"""The Triton back-end: one launch packs a list of tensors, one launch unpacks them.

Pointer table: the tensors of one launch share a dtype; each is addressed as a signed
element offset ("delta") from the first tensor's pointer, so one typed base pointer
reaches them all and Triton's pointer arithmetic (and its alignment analysis) applies.
A block table (tensor index, first element) cuts the work into BLOCK-element pieces, one
program each; a piece never spans two tensors, so every access is one masked vector.
When every pointer, offset and size is a multiple of VEC elements, the launch says so
(tl.multiple_of) and loads and stores go up to 16 bytes wide.

The unpack launch writes the fp32 (or other) target and the rounded bf16/fp16 model copy
from the same loaded values, and zeroes the reset tensors of the target's dtype in the
same grid (their blocks come after the targets'). Launch plans (device tables, widths)
are cached per call signature (pointers, sizes, dtypes, offsets): the averager passes the
same buckets every round, so a round costs two kernel launches per bucket and a dict
lookup, and the calls can be captured in a CUDA graph.

On CPU this runs only under TRITON_INTERPRET=1 (tests); ``load(cpu)`` says so otherwise.
The interpreter rounds fp32 to bf16 by truncation, so there bf16 results are one rounding
but not always round-to-nearest-even; on CUDA the conversion is round-to-nearest-even and
results match the torch reference bit for bit.
"""
from __future__ import annotations

from collections import OrderedDict

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

import triton
import triton.language as tl

from .reference import ReferenceKernels

# 2048 x 4 warps: on an H100 (benchmarks/results/sync_round_gpu.json) as fast as 4096 x 8
# and 8192 x 8 on 16-byte-aligned layouts (~98% of copy_), and 1-3% ahead on odd ones
BLOCK = 2048
NUM_WARPS = 4
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PLAN_CACHE_LIMIT = 4096  # least recently used out; FSDP2 at 70B, S = 8 is ~550 buckets x (pack, unpack)


@triton.jit
def _pack_kernel(src_base, bucket, deltas, numels, offsets, block_tensor, block_start, scale,
                 BLOCK: tl.constexpr, VEC: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.multiple_of(tl.load(block_start + pid), BLOCK)  # starts are multiples of BLOCK
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
    start = tl.multiple_of(tl.load(block_start + pid), BLOCK)  # starts are multiples of BLOCK
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
def _nonfinite_kernel(base, deltas, numels, ids, block_tensor, block_start, flags, BLOCK: tl.constexpr,
                      VEC: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.multiple_of(tl.load(block_start + pid), BLOCK)  # starts are multiples of BLOCK
    delta = tl.multiple_of(tl.load(deltas + t), VEC)
    n = tl.multiple_of(tl.load(numels + t), VEC)
    idx = start + tl.arange(0, BLOCK)
    mask = idx < n
    x = tl.load(base + delta + idx, mask=mask, other=0.0).to(tl.float32)
    exponent = x.to(tl.int32, bitcast=True) & 0x7F800000  # all ones: NaN, +Inf or -Inf
    bad = tl.max((exponent == 0x7F800000).to(tl.int32), axis=0)
    if bad > 0:
        tl.store(flags + tl.load(ids + t), 1)


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


def _sig(t: Tensor | None) -> tuple | None:
    if t is None:
        return None
    return t.data_ptr(), t.numel(), t.dtype, t.device, t.is_contiguous()


def _fast(sig: tuple | None, device: torch.device) -> bool:
    return sig is not None and sig[4] and sig[2] in FAST_DTYPES and sig[3] == device


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


@dataclass
class _Launch:
    """One kernel launch: which tensors of the call, its device tables and vector width."""

    members: list[int]      # indices into the call's tensors (targets, then resets for unpack)
    deltas: Tensor
    numels: Tensor
    offsets: Tensor
    extra: Tensor           # copy deltas (unpack) or original indices (scan)
    block_tensor: Tensor
    block_start: Tensor
    grid: tuple
    vec: int
    n_targets: int = 0
    copy_index: int | None = None  # index of the first member's copy (unpack with copies)


def _launch(device, block: int, members, ptrs, elsize, numels, offsets, extra, vec, **kw) -> _Launch:
    deltas = [(p - ptrs[0]) // elsize for p in ptrs]
    blocks_t, blocks_s = [], []
    for i, n in enumerate(numels):
        for s in range(0, n, block):
            blocks_t.append(i)
            blocks_s.append(s)
    k, nb = len(numels), len(blocks_t)
    host = torch.tensor(deltas + list(numels) + list(offsets) + list(extra) + blocks_t + blocks_s, dtype=torch.int64)
    dev = host.to(device)
    rows = [dev[i * k:(i + 1) * k] for i in range(4)]
    return _Launch(members, *rows, dev[4 * k:4 * k + nb], dev[4 * k + nb:], (nb,), vec, **kw)


class TritonKernels:
    name = "triton"

    def __init__(self, block: int = BLOCK, num_warps: int = NUM_WARPS) -> None:
        self.block = block
        self.num_warps = num_warps
        self._reference = ReferenceKernels()
        self._plans: OrderedDict[tuple, object] = OrderedDict()

    def _plan(self, key: tuple, make):
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _PLAN_CACHE_LIMIT:
                self._plans.popitem(last=False)
            plan = self._plans[key] = make()
        else:
            self._plans.move_to_end(key)
        return plan

    # -- pack -----------------------------------------------------------------------------
    def pack(self, sources: Sequence[Tensor], bucket: Tensor, offsets: Sequence[int], scale: float) -> None:
        sigs = tuple(_sig(t) for t in sources)
        key = ("pack", _sig(bucket), tuple(offsets), sigs)
        launches, slow = self._plan(key, lambda: self._pack_plan(bucket, sigs, offsets))
        for i in slow:  # same two steps as the reference: copy into fp32, then scale
            t = sources[i]
            view = bucket[offsets[i]: offsets[i] + t.numel()]
            view.view(t.shape).copy_(t)
            view.mul_(scale)
        for ln in launches:
            _pack_kernel[ln.grid](sources[ln.members[0]], bucket, ln.deltas, ln.numels, ln.offsets, ln.block_tensor,
                                  ln.block_start, float(scale), BLOCK=self.block, VEC=ln.vec,
                                  num_warps=self.num_warps)

    def _pack_plan(self, bucket: Tensor, sigs, offsets):
        device = bucket.device
        groups: dict[torch.dtype, list[int]] = {}
        slow = []
        for i, sig in enumerate(sigs):
            if sig[1] == 0:
                continue
            if _fast(sig, device):
                groups.setdefault(sig[2], []).append(i)
            else:
                slow.append(i)
        launches = []
        for dtype, idx in groups.items():
            elsize = torch.empty((), dtype=dtype).element_size()
            ptrs = [sigs[i][0] for i in idx]
            numels = [sigs[i][1] for i in idx]
            offs = [offsets[i] for i in idx]
            vec = _vec([(p, elsize) for p in ptrs] + [(bucket.data_ptr(), 4)], numels, offs)
            launches.append(_launch(device, self.block, idx, ptrs, elsize, numels, offs, [0] * len(idx), vec))
        return launches, slow

    # -- unpack ---------------------------------------------------------------------------
    def unpack(self, bucket: Tensor, targets: Sequence[Tensor], offsets: Sequence[int],
               copies: Sequence[Tensor | None], resets: Sequence[Tensor] = ()) -> None:
        copies = list(copies) if copies else [None] * len(targets)
        tsigs = tuple(_sig(t) for t in targets)
        csigs = tuple(_sig(c) for c in copies)
        rsigs = tuple(_sig(r) for r in resets)
        key = ("unpack", _sig(bucket), tuple(offsets), tsigs, csigs, rsigs)
        launches, slow, slow_resets = self._plan(key, lambda: self._unpack_plan(bucket, tsigs, csigs, rsigs, offsets))
        for i in slow:
            t, c = targets[i], copies[i]
            view = bucket[offsets[i]: offsets[i] + t.numel()].view(t.shape)
            t.copy_(view)
            if c is not None:
                c.copy_(view)
        for j in slow_resets:
            resets[j].zero_()
        n = len(targets)
        for ln in launches:
            first = ln.members[0]
            base = targets[first] if first < n else resets[first - n]
            has_copy = ln.copy_index is not None
            copy_base = copies[ln.copy_index] if has_copy else base
            _unpack_kernel[ln.grid](bucket, base, copy_base, ln.deltas, ln.extra, ln.numels, ln.offsets,
                                    ln.block_tensor, ln.block_start, ln.n_targets, HAS_COPY=has_copy,
                                    BLOCK=self.block, VEC=ln.vec, num_warps=self.num_warps)

    def _unpack_plan(self, bucket: Tensor, tsigs, csigs, rsigs, offsets):
        device = bucket.device
        n = len(tsigs)
        groups: dict[tuple, list[int]] = {}
        slow = []
        for i, (ts, cs) in enumerate(zip(tsigs, csigs)):
            if ts[1] == 0:
                continue
            if _fast(ts, device) and (cs is None or _fast(cs, device)):
                groups.setdefault((ts[2], None if cs is None else cs[2]), []).append(i)
            else:
                slow.append(i)
        reset_groups: dict[torch.dtype, list[int]] = {}
        slow_resets = []
        for j, rs in enumerate(rsigs):
            if rs[1] == 0:
                continue
            if _fast(rs, device):
                reset_groups.setdefault(rs[2], []).append(j)
            else:
                slow_resets.append(j)
        launches = []
        for (dtype, copy_dtype), idx in groups.items():
            rs = reset_groups.pop(dtype, [])  # resets of the target dtype ride in the same launch
            launches.append(self._unpack_launch(bucket, tsigs, csigs, rsigs, offsets, idx, rs, copy_dtype))
        for dtype, rs in reset_groups.items():
            launches.append(self._unpack_launch(bucket, tsigs, csigs, rsigs, offsets, [], rs, None))
        return launches, slow, slow_resets

    def _unpack_launch(self, bucket, tsigs, csigs, rsigs, offsets, idx, rs, copy_dtype) -> _Launch:
        n = len(tsigs)
        every = [tsigs[i] for i in idx] + [rsigs[j] for j in rs]
        elsize = torch.empty((), dtype=every[0][2]).element_size()
        ptrs = [s[0] for s in every]
        numels = [s[1] for s in every]
        offs = [offsets[i] for i in idx]
        pairs = [(p, elsize) for p in ptrs] + [(bucket.data_ptr(), 4)]
        cdeltas = [0] * len(every)
        if copy_dtype is not None:
            csize = torch.empty((), dtype=copy_dtype).element_size()
            cptrs = [csigs[i][0] for i in idx]
            cdeltas = [(p - cptrs[0]) // csize for p in cptrs] + [0] * len(rs)
            pairs += [(p, csize) for p in cptrs]
        vec = _vec(pairs, numels, offs)
        return _launch(bucket.device, self.block, list(idx) + [n + j for j in rs], ptrs, elsize, numels,
                       offs + [0] * len(rs), cdeltas, vec, n_targets=len(idx),
                       copy_index=idx[0] if copy_dtype is not None else None)

    # -- compressed rounds (qsr_ds/kernels/triton_quant.py) --------------------------------
    def quantize(self, *args) -> None:
        self._quant().quantize(*args)

    def dequantize(self, *args) -> None:
        self._quant().dequantize(*args)

    def _quant(self):
        if getattr(self, "_quant_kernels", None) is None:
            from .triton_quant import TritonQuantKernels

            self._quant_kernels = TritonQuantKernels(self._reference)
        return self._quant_kernels

    # -- non-finite scan ------------------------------------------------------------------
    def first_nonfinite(self, tensors: Sequence[Tensor]) -> int:
        if not tensors:
            return -1
        device = tensors[0].device
        sigs = tuple(_sig(t) for t in tensors)
        if not all(_fast(s, device) for s in sigs):
            from .cpp import _first_nonfinite_slow

            return _first_nonfinite_slow(self._reference, tensors)
        launches, flags = self._plan(("scan", sigs), lambda: self._scan_plan(device, sigs))
        flags.zero_()
        for ln in launches:
            _nonfinite_kernel[ln.grid](tensors[ln.members[0]], ln.deltas, ln.numels, ln.extra, ln.block_tensor,
                                       ln.block_start, flags, BLOCK=self.block, VEC=ln.vec,
                                       num_warps=self.num_warps)
        bad = flags.nonzero()
        return int(bad[0, 0]) if bad.numel() else -1

    def _scan_plan(self, device, sigs):
        groups: dict[torch.dtype, list[int]] = {}
        for i, s in enumerate(sigs):
            if s[1]:
                groups.setdefault(s[2], []).append(i)
        launches = []
        for dtype, idx in groups.items():
            elsize = torch.empty((), dtype=dtype).element_size()
            ptrs = [sigs[i][0] for i in idx]
            numels = [sigs[i][1] for i in idx]
            vec = _vec([(p, elsize) for p in ptrs], numels, [])
            launches.append(_launch(device, self.block, idx, ptrs, elsize, numels, [0] * len(idx), idx, vec))
        return launches, torch.zeros(len(sigs), dtype=torch.int32, device=device)
