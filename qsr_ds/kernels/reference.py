"""The torch reference back-end: a few foreach ops per bucket, always available.

Every fused back-end is tested against this one, the compressed-round kernels too
(``quantize`` / ``dequantize``: see qsr_ds/kernels/__init__.py for their exact math).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

INT8_MAX = 127


class ReferenceKernels:
    name = "torch"

    def pack(self, sources: Sequence[Tensor], bucket: Tensor, offsets: Sequence[int], scale: float) -> None:
        if not sources:
            return
        views = [bucket[o : o + t.numel()].view(t.shape) for t, o in zip(sources, offsets)]
        torch._foreach_copy_(views, list(sources))
        bucket[: offsets[-1] + sources[-1].numel()].mul_(scale)

    def unpack(
        self,
        bucket: Tensor,
        targets: Sequence[Tensor],
        offsets: Sequence[int],
        copies: Sequence[Tensor | None],
        resets: Sequence[Tensor] = (),
    ) -> None:
        views = [bucket[o : o + t.numel()].view(t.shape) for t, o in zip(targets, offsets)]
        torch._foreach_copy_(list(targets), views)
        pairs = [(c, v) for c, v in zip(copies, views) if c is not None]
        if pairs:
            torch._foreach_copy_([c for c, _ in pairs], [v for _, v in pairs])
        if resets:
            torch._foreach_zero_(list(resets))

    def first_nonfinite(self, tensors: Sequence[Tensor]) -> int:
        index = [i for i, t in enumerate(tensors) if t.numel()]  # an empty tensor holds no NaN
        if not index:
            return -1
        # max |x| propagates NaN and Inf and cannot overflow, unlike a sum or a 2-norm
        peaks = torch.stack([m.float() for m in torch._foreach_norm([tensors[i] for i in index], float("inf"))])
        bad = (~torch.isfinite(peaks)).nonzero()
        return index[int(bad[0, 0])] if bad.numel() else -1

    # -- compressed rounds ---------------------------------------------------------------
    def quantize(self, mode: str, block: int, sources: Sequence[Tensor], anchors: Sequence[Tensor | None],
                 residuals: Sequence[Tensor | None], q: Tensor, scales: Tensor | None, offsets: Sequence[int],
                 block_offsets: Sequence[int]) -> None:
        for i, x in enumerate(sources):
            n = x.numel()
            if n == 0:
                continue
            a = anchors[i] if anchors else None
            e = residuals[i] if residuals else None
            d = x.reshape(-1).float()
            if a is not None:
                d = d - a.reshape(-1).float()
            if e is not None:
                d = d + e.reshape(-1)
            out = q[offsets[i]: offsets[i] + n]
            if mode == "bf16":
                qv = d.to(torch.bfloat16)
                out.copy_(qv)
                lost = d - qv.float()
            else:
                qv, scale = quantize_int8_blocks(d, block)
                out.copy_(qv)
                scales[block_offsets[i]: block_offsets[i] + scale.numel()] = scale
                lost = d - qv.float() * scale.repeat_interleave(block)[:n]
            if e is not None:
                e.view(-1).copy_(lost)

    def dequantize(self, mode: str, block: int, q_rows: Tensor, scale_rows: Tensor | None,
                   targets: Sequence[Tensor], anchors: Sequence[Tensor | None], copies: Sequence[Tensor | None],
                   offsets: Sequence[int], block_offsets: Sequence[int], inv_count: float) -> None:
        for i, t in enumerate(targets):
            n = t.numel()
            if n == 0:
                continue
            o = offsets[i]
            acc = None
            for r in range(q_rows.shape[0]):  # replica 0, 1, ...: the same order on every rank
                term = q_rows[r, o: o + n].float()
                if mode == "int8":
                    nb = -(-n // block)
                    bo = block_offsets[i]
                    term = term * scale_rows[r, bo: bo + nb].repeat_interleave(block)[:n]
                acc = term if acc is None else acc + term
            value = acc * inv_count
            a = anchors[i] if anchors else None
            if a is not None:
                value = a.reshape(-1).float() + value
                a.view(-1).copy_(value)
            t.copy_(value.view(t.shape))
            c = copies[i] if copies else None
            if c is not None:
                c.copy_(value.view(c.shape))


def quantize_int8_blocks(d: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """(q int8, scale fp32 per block) of a flat fp32 tensor; blocks of ``block`` elements, the last partial.

    scale = max|d| / 127 and q = round-half-even(d * (127 / max|d|)) clamped to +-127; a block whose
    127 / max|d| is not finite (all zeros, or max|d| < 127 / FLT_MAX) gets scale 0 and q 0; a block
    holding NaN or Inf gets scale NaN and q 0.
    """
    n = d.numel()
    nb = -(-n // block)
    padded = torch.zeros(nb * block, dtype=torch.float32, device=d.device)
    padded[:n] = d
    blocks = padded.view(nb, block)
    finite = torch.isfinite(blocks).all(1)
    blocks = torch.where(finite[:, None], blocks, 0.0)
    amax = blocks.abs().amax(1)
    scale = amax / INT8_MAX
    inv = torch.full_like(amax, INT8_MAX) / amax  # IEEE division: ``127 / amax`` is 127 * (1 / amax)
    tiny = ~torch.isfinite(inv)
    scale = torch.where(tiny, 0.0, scale)
    inv = torch.where(tiny, 0.0, inv)
    scale = torch.where(finite, scale, float("nan"))
    q = (blocks * inv[:, None]).round().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.view(-1)[:n], scale
