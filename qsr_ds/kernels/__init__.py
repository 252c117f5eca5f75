"""Pack / unpack back-ends for the averager, behind one small interface.

A back-end implements:
    pack(sources, bucket, offsets, scale)      bucket[o:o+n] = source * scale (in fp32)
    unpack(bucket, targets, offsets, copies, resets=())
                                               target = bucket slice (rounded once to its
                                               dtype); copy (a low-precision model copy, or
                                               None) = the same slice rounded; resets zeroed
    first_nonfinite(tensors) -> int            index of the first tensor with NaN/Inf, or -1

and, for compressed rounds (qsr_ds/sync/compress.py; all arithmetic in fp32, no fused multiply-add):
    quantize(mode, block, sources, anchors, residuals, q, scales, offsets, block_offsets)
        per source x with anchor a and residual e (None entries: a = 0, e = 0 and not kept):
        d = (x - a) + e; q[o:o+n] = Q(d); e = d - deQ(q).  mode "bf16": Q = round to nearest
        even bf16.  mode "int8": blocks of ``block`` elements from the start of each source (the
        last one partial) at scales[bo + j]; scale = max|d| / 127, q = rne(d * (127 / max|d|))
        clamped to +-127, deQ = q * scale; 127 / max|d| not finite (a zero block): scale 0, q 0;
        a block holding NaN/Inf: scale NaN, q 0 (so e and every later result is NaN there).
    dequantize(mode, block, q_rows, scale_rows, targets, anchors, copies, offsets, block_offsets,
               inv_count)
        mean = (deQ(q_rows[0]) + deQ(q_rows[1]) + ... ) * inv_count, summed in that order;
        value = a + mean (or mean without an anchor); target, anchor and copy = value, each
        rounded once to its dtype.
"""
from __future__ import annotations

import torch

from .reference import ReferenceKernels

CHOICES = ("auto", "triton", "cpp", "torch")


class KernelUnavailable(RuntimeError):
    """An explicitly requested back-end cannot run here; the message says why."""


def get_backend(name: str, device: torch.device):
    """The back-end for tensors on ``device``; ``auto`` falls back to the torch reference."""
    if name not in CHOICES:
        raise KernelUnavailable(f"unknown kernel back-end {name!r}; expected one of {', '.join(CHOICES)}")
    if name == "torch":
        return ReferenceKernels()
    loaders = {"triton": _load_triton, "cpp": _load_cpp}
    if name != "auto":
        backend, why = loaders[name](device)
        if backend is None:
            raise KernelUnavailable(f"kernel back-end {name!r} is unavailable for {device} tensors: {why}")
        return backend
    preferred = "triton" if device.type == "cuda" else "cpp"
    backend, _ = loaders[preferred](device)
    return backend if backend is not None else ReferenceKernels()


def describe_backends() -> dict:
    """For each back-end: whether it can run here (CPU, and CUDA when present) and why not.

    Loads the C++ op, which compiles it on first use (about half a minute, once per machine).
    """
    cuda = torch.device("cuda") if torch.cuda.is_available() else None
    report: dict = {"torch": {"available": True, "devices": ["cpu"] + (["cuda"] if cuda else []), "reason": ""}}
    for name, loader, device in (("cpp", _load_cpp, torch.device("cpu")),
                                 ("triton", _load_triton, cuda or torch.device("cpu"))):
        backend, why = loader(device)
        report[name] = {"available": backend is not None, "devices": [device.type] if backend else [], "reason": why}
    report["auto"] = {d.type: get_backend("auto", d).name for d in [torch.device("cpu")] + ([cuda] if cuda else [])}
    return report


def _load_triton(device: torch.device):
    try:
        from .triton_bucket import load
    except ImportError as err:
        return None, f"triton back-end not importable ({err})"
    return load(device)


def _load_cpp(device: torch.device):
    try:
        from .cpp import load
    except ImportError as err:
        return None, f"C++ back-end not importable ({err})"
    return load(device)
