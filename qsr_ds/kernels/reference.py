"""The torch reference back-end: a few foreach ops per bucket, always available.

Every fused back-end is tested against this one.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


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
