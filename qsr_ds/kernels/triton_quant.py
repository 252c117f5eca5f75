"""Triton kernels of compressed rounds: quantize in the pack, dequantize-and-accumulate in the unpack.

The math is the reference's (qsr_ds/kernels/__init__.py). One program per tile: an int8
block (its scale computed in the program) or, in bf16 mode, TILE elements. Tensors of one
launch share their dtypes and are addressed by element deltas from the first one's pointer,
as in triton_bucket.py. bf16 rounding is done on the bits (round to nearest even, NaN to
0x7FC0, as c10::BFloat16), divisions with div_rn and no fused multiply-add
(enable_fp_fusion=False), so q, scales and residuals match the reference bit for bit on
CUDA and under TRITON_INTERPRET=1, and fp32 / fp16 targets too; a bf16 target or copy is
bitwise on CUDA and one rounding (truncation) in the interpreter.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

import triton
import triton.language as tl

BF16_TILE = 2048
NUM_WARPS = 4
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PLAN_CACHE_LIMIT = 256
FLT_MAX = 3.4028234663852886e38


@triton.jit
def _quantize_kernel(x_base, a_base, e_base, q_ptr, s_ptr, x_deltas, a_deltas, e_deltas, numels, offsets,
                     tile_tensor, tile_start, tile_scale, block, TILE: tl.constexpr, INT8: tl.constexpr,
                     HAS_A: tl.constexpr, HAS_E: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid)
    start = tl.load(tile_start + pid)
    n = tl.load(numels + t)
    idx = start + tl.arange(0, TILE)
    if INT8:
        mask = idx < tl.minimum(n, start + block)
    else:
        mask = idx < n
    xd = tl.load(x_deltas + t)
    d = tl.load(x_base + xd + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_A:
        d = d - tl.load(a_base + tl.load(a_deltas + t) + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_E:
        ed = tl.load(e_deltas + t)
        d = d + tl.load(e_base + ed + idx, mask=mask, other=0.0)
    off = tl.load(offsets + t)
    if INT8:
        mag = tl.abs(d)
        bad = tl.max((((mag > FLT_MAX) | (d != d)) & mask).to(tl.int32), axis=0) > 0
        amax = tl.max(tl.where(mask & (mag <= FLT_MAX), mag, 0.0), axis=0)
        scale = tl.div_rn(amax, 127.0)
        inv = tl.div_rn(127.0, amax)
        tiny = (inv > FLT_MAX) | (amax == 0.0)
        scale = tl.where(tiny, 0.0, scale)
        inv = tl.where(tiny, 0.0, inv)
        scale = tl.where(bad, float("nan"), scale)
        r = (d * inv + 12582912.0) - 12582912.0  # round half to even (|d * inv| <= 127)
        r = tl.where(bad, 0.0, tl.minimum(tl.maximum(r, -127.0), 127.0))
        qi = r.to(tl.int32)
        tl.store(q_ptr + off + idx, qi.to(tl.int8), mask=mask)
        tl.store(s_ptr + tl.load(tile_scale + pid), scale)
        lost = d - qi.to(tl.float32) * scale
    else:
        u = d.to(tl.uint32, bitcast=True)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        rounded = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)
        tl.store(q_ptr + off + idx, rounded.to(tl.int16), mask=mask)  # q viewed as int16
        lost = d - (rounded << 16).to(tl.float32, bitcast=True)
    if HAS_E:
        tl.store(e_base + ed + idx, lost, mask=mask)


@triton.jit
def _dequantize_kernel(q_ptr, q_stride, s_ptr, s_stride, rows, t_base, a_base, c_base, t_deltas, a_deltas, c_deltas,
                       numels, offsets, tile_tensor, tile_start, tile_scale, block, inv_count, TILE: tl.constexpr,
                       INT8: tl.constexpr, HAS_A: tl.constexpr, HAS_C: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid)
    start = tl.load(tile_start + pid)
    n = tl.load(numels + t)
    idx = start + tl.arange(0, TILE)
    if INT8:
        mask = idx < tl.minimum(n, start + block)
    else:
        mask = idx < n
    off = tl.load(offsets + t)
    acc = tl.full([TILE], -0.0, tl.float32)  # -0.0 + x == x for every x, so replica 0 enters unchanged
    for r in range(0, rows):  # replica 0, 1, ...: the same order on every rank
        qv = tl.load(q_ptr + r * q_stride + off + idx, mask=mask, other=0)
        if INT8:
            term = qv.to(tl.float32) * tl.load(s_ptr + r * s_stride + tl.load(tile_scale + pid))
        else:
            term = ((qv.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        acc = acc + term
    v = acc * inv_count
    td = tl.load(t_deltas + t)
    if HAS_A:
        ad = tl.load(a_deltas + t)
        v = tl.load(a_base + ad + idx, mask=mask, other=0.0).to(tl.float32) + v
        tl.store(a_base + ad + idx, v.to(a_base.dtype.element_ty), mask=mask)
    tl.store(t_base + td + idx, v.to(t_base.dtype.element_ty), mask=mask)
    if HAS_C:
        tl.store(c_base + tl.load(c_deltas + t) + idx, v.to(c_base.dtype.element_ty), mask=mask)


def _fast(t: Tensor | None, device: torch.device, dtypes=FAST_DTYPES) -> bool:
    return t is None or (t.is_contiguous() and t.dtype in dtypes and t.device == device)


def _deltas(tensors: Sequence[Tensor | None]) -> list[int]:
    present = [t for t in tensors if t is not None]
    if not present:
        return [0] * len(tensors)
    base, size = present[0].data_ptr(), present[0].element_size()
    return [(t.data_ptr() - base) // size if t is not None else 0 for t in tensors]


def _sig(t: Tensor | None) -> tuple | None:
    return None if t is None else (t.data_ptr(), t.numel(), t.dtype, t.device)


class TritonQuantKernels:
    """quantize / dequantize for TritonKernels; launch tables cached per call signature."""

    def __init__(self, reference) -> None:
        self._reference = reference
        self._plans: dict[tuple, object] = {}

    def _tables(self, key: tuple, device, numels: Sequence[int], int8: bool, block: int, block_offsets, extra):
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _PLAN_CACHE_LIMIT:
                self._plans.clear()
            step = block if int8 else BF16_TILE
            tiles_t, tiles_s, tiles_k = [], [], []
            for i, n in enumerate(numels):
                for j, s in enumerate(range(0, n, step)):
                    tiles_t.append(i)
                    tiles_s.append(s)
                    tiles_k.append(block_offsets[i] + j if int8 else 0)
            k, nt = len(numels), len(tiles_t)
            host = torch.tensor(list(numels) + [v for row in extra for v in row] + tiles_t + tiles_s + tiles_k,
                                dtype=torch.int64)
            dev = host.to(device)
            rows = [dev[i * k:(i + 1) * k] for i in range(1 + len(extra))]
            base = (1 + len(extra)) * k
            plan = self._plans[key] = (rows, dev[base:base + nt], dev[base + nt:base + 2 * nt],
                                       dev[base + 2 * nt:], nt)
        return plan

    def quantize(self, mode, block, sources, anchors, residuals, q, scales, offsets, block_offsets) -> None:
        anchors = list(anchors) if anchors else [None] * len(sources)
        residuals = list(residuals) if residuals else [None] * len(sources)
        int8 = mode == "int8"
        groups: dict[tuple, list[int]] = {}
        slow = []
        for i, x in enumerate(sources):
            a, e = anchors[i], residuals[i]
            if x.numel() == 0:
                continue
            if _fast(x, q.device) and _fast(a, q.device, (x.dtype,)) and _fast(e, q.device, (torch.float32,)):
                groups.setdefault((x.dtype, a is not None, e is not None), []).append(i)
            else:
                slow.append(i)
        if slow:
            pick = lambda values: [values[i] for i in slow]  # noqa: E731
            self._reference.quantize(mode, block, pick(sources), pick(anchors), pick(residuals), q, scales,
                                     pick(offsets), pick(block_offsets))
        q_out = q if int8 else q.view(torch.int16)
        tile = triton.next_power_of_2(block) if int8 else BF16_TILE
        for (_, has_a, has_e), idx in groups.items():
            xs, as_, es = [sources[i] for i in idx], [anchors[i] for i in idx], [residuals[i] for i in idx]
            key = ("q", mode, block, _sig(q), tuple(map(_sig, xs)), tuple(map(_sig, as_)), tuple(map(_sig, es)),
                   tuple(offsets[i] for i in idx), tuple(block_offsets[i] for i in idx))
            rows, tt, ts, tk, nt = self._tables(
                key, q.device, [x.numel() for x in xs], int8, block, [block_offsets[i] for i in idx],
                [_deltas(xs), _deltas(as_), _deltas(es), [offsets[i] for i in idx]])
            _quantize_kernel[(nt,)](xs[0], as_[0] if has_a else xs[0], es[0] if has_e else q_out, q_out,
                                    scales if int8 else q_out, rows[1], rows[2], rows[3], rows[0], rows[4], tt, ts,
                                    tk, block, TILE=tile, INT8=int8, HAS_A=has_a, HAS_E=has_e,
                                    num_warps=NUM_WARPS, enable_fp_fusion=False)

    def dequantize(self, mode, block, q_rows, scale_rows, targets, anchors, copies, offsets, block_offsets,
                   inv_count) -> None:
        anchors = list(anchors) if anchors else [None] * len(targets)
        copies = list(copies) if copies else [None] * len(targets)
        int8 = mode == "int8"
        device = q_rows.device
        groups: dict[tuple, list[int]] = {}
        slow = []
        for i, t in enumerate(targets):
            a, c = anchors[i], copies[i]
            if t.numel() == 0:
                continue
            if _fast(t, device) and _fast(a, device, (t.dtype,)) and _fast(c, device):
                groups.setdefault((t.dtype, a is not None, None if c is None else c.dtype), []).append(i)
            else:
                slow.append(i)
        if slow:
            pick = lambda values: [values[i] for i in slow]  # noqa: E731
            self._reference.dequantize(mode, block, q_rows, scale_rows, pick(targets), pick(anchors), pick(copies),
                                       pick(offsets), pick(block_offsets), inv_count)
        q_in = q_rows if int8 else q_rows.view(torch.int16)
        tile = triton.next_power_of_2(block) if int8 else BF16_TILE
        s_in = scale_rows if int8 else q_in
        for (_, has_a, copy_dtype), idx in groups.items():
            ts_, as_, cs = [targets[i] for i in idx], [anchors[i] for i in idx], [copies[i] for i in idx]
            key = ("d", mode, block, _sig(q_rows), q_rows.stride(0), tuple(map(_sig, ts_)), tuple(map(_sig, as_)),
                   tuple(map(_sig, cs)), tuple(offsets[i] for i in idx), tuple(block_offsets[i] for i in idx))
            rows, tt, tstart, tk, nt = self._tables(
                key, device, [t.numel() for t in ts_], int8, block, [block_offsets[i] for i in idx],
                [_deltas(ts_), _deltas(as_), _deltas(cs), [offsets[i] for i in idx]])
            _dequantize_kernel[(nt,)](q_in, q_in.stride(0), s_in, s_in.stride(0), q_rows.shape[0], ts_[0],
                                      as_[0] if has_a else ts_[0], cs[0] if copy_dtype is not None else ts_[0],
                                      rows[1], rows[2], rows[3], rows[0], rows[4], tt, tstart, tk, block,
                                      float(inv_count), TILE=tile, INT8=int8, HAS_A=has_a,
                                      HAS_C=copy_dtype is not None, num_warps=NUM_WARPS, enable_fp_fusion=False)
