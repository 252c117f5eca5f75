"""The C++ back-end: csrc/multi_tensor.cpp (+ csrc/quantize.cpp), compiled just in time on first use.

Nothing is built when qsr_ds is imported or installed. The first ``load(cpu)`` compiles
the op with torch.utils.cpp_extension.load (-O3 -fopenmp -ffp-contract=off; no -march,
since the cache may be reused on another CPU; no fused multiply-add, which would round
differently from the torch reference) into a per-user cache, ``$QSR_DS_EXTENSIONS_DIR`` or
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/qsr_ds/torch_extensions``, under a folder named
after the Python and torch versions and the torch installation. An exclusive file lock
(fcntl) around the build lets concurrent ranks build once and the others load the result;
the lock dies with its process, unlike torch's own baton file, which a killed build can
leave behind (we remove such a stale baton while holding the lock). If the op cannot be built, ``load`` returns
(None, why) and the caller falls back to the reference back-end; the reason is kept for
``qsr-ds info``. ``QSR_DS_NO_CPP=1`` turns the back-end off.

Tensors the op cannot take (non-contiguous, dtypes other than fp32/fp64/bf16/fp16) are
handled per tensor with the same torch ops as the reference, so results never differ.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .reference import ReferenceKernels

NAME = "qsr_ds_multi_tensor"
SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "multi_tensor.cpp"
QUANTIZE_SOURCE = SOURCE.parent / "quantize.cpp"  # compressed rounds; one module with SOURCE
FAST_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_lock = threading.Lock()
_module = None
_failure: str | None = None


def cache_dir() -> Path:
    root = os.environ.get("QSR_DS_EXTENSIONS_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "qsr_ds" / "torch_extensions"
    # one folder per torch installation: two virtual environments with the same torch version
    # would otherwise rewrite each other's build.ninja (include paths) and rebuild in turns
    where = hashlib.sha1(str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:8]
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__.split('+')[0]}_{where}"
    return base / tag / NAME


def _build():
    """Compile (or load the cached build of) csrc/multi_tensor.cpp; raises on failure."""
    for source in (SOURCE, QUANTIZE_SOURCE):
        if source.is_file():
            continue
        raise FileNotFoundError(
            f"{source} is missing (qsr_ds was installed without its csrc/ folder; use an editable install "
            "or a source checkout)"
        )
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja), torch needs it to build extensions")
    build = cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(build.parent / f"{NAME}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # one builder at a time across processes
        try:
            baton = build / "lock"
            if baton.exists():  # left by a build that was killed; nobody else holds our lock
                baton.unlink()
            verbose = os.environ.get("QSR_DS_VERBOSE_BUILD") == "1"
            return cpp_extension.load(
                name=NAME,
                sources=[str(SOURCE), str(QUANTIZE_SOURCE)],
                extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build),
                verbose=verbose,
            )
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _explain(err: Exception) -> str:
    """One line: the compiler's first error if there is one, else the exception's last line."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    first_error = next((line for line in lines if "error:" in line or "Error:" in line), None)
    detail = first_error or (lines[-1] if lines else "")
    return (f"building {SOURCE.name} in {cache_dir()} failed: {type(err).__name__}: {detail[:300]} "
            "(QSR_DS_VERBOSE_BUILD=1 shows the whole build)")


def module():
    """The compiled op module, building it on first use; raises RuntimeError with the reason."""
    global _module, _failure
    with _lock:
        if _module is None and _failure is None:
            if os.environ.get("QSR_DS_NO_CPP") == "1":
                _failure = "turned off by QSR_DS_NO_CPP=1"
            else:
                try:
                    _module = _build()
                except Exception as err:  # noqa: BLE001 - any build failure means "fall back"
                    _failure = _explain(err)
        if _module is None:
            raise RuntimeError(_failure)
        return _module


def load(device: torch.device) -> tuple["CppKernels | None", str]:
    device = torch.device(device)
    if device.type != "cpu":
        return None, f"the C++ op runs on CPU tensors only, not {device.type}"
    try:
        return CppKernels(module()), ""
    except RuntimeError as err:
        return None, str(err)


def _fast(t: Tensor) -> bool:
    return t.is_contiguous() and t.dtype in FAST_DTYPES and t.device.type == "cpu"


class CppKernels:
    name = "cpp"

    def __init__(self, ops) -> None:
        self.ops = ops
        self._reference = ReferenceKernels()

    def pack(self, sources: Sequence[Tensor], bucket: Tensor, offsets: Sequence[int], scale: float) -> None:
        fast = [i for i, t in enumerate(sources) if _fast(t)]
        if len(fast) == len(sources):
            self.ops.pack(list(sources), bucket, list(offsets), float(scale))
            return
        self.ops.pack([sources[i] for i in fast], bucket, [offsets[i] for i in fast], float(scale))
        for i, t in enumerate(sources):
            if not _fast(t):  # same two steps as the reference: copy into fp32, then scale
                view = bucket[offsets[i] : offsets[i] + t.numel()]
                view.view(t.shape).copy_(t)
                view.mul_(scale)

    def unpack(
        self,
        bucket: Tensor,
        targets: Sequence[Tensor],
        offsets: Sequence[int],
        copies: Sequence[Tensor | None],
        resets: Sequence[Tensor] = (),
    ) -> None:
        copies = list(copies) if copies else [None] * len(targets)
        slow = [
            i for i, (t, c) in enumerate(zip(targets, copies)) if not _fast(t) or (c is not None and not _fast(c))
        ]
        fast_resets = [r for r in resets if r.is_contiguous() and r.device.type == "cpu"]
        if not slow and len(fast_resets) == len(resets):
            self.ops.unpack(bucket, list(targets), list(offsets), copies, list(resets))
            return
        keep = [i for i in range(len(targets)) if i not in set(slow)]
        self.ops.unpack(bucket, [targets[i] for i in keep], [offsets[i] for i in keep], [copies[i] for i in keep],
                        fast_resets)
        for i in slow:
            view = bucket[offsets[i] : offsets[i] + targets[i].numel()].view(targets[i].shape)
            targets[i].copy_(view)
            if copies[i] is not None:
                copies[i].copy_(view)
        for r in resets:
            if not (r.is_contiguous() and r.device.type == "cpu"):
                r.zero_()

    def quantize(self, mode: str, block: int, sources: Sequence[Tensor], anchors: Sequence[Tensor | None],
                 residuals: Sequence[Tensor | None], q: Tensor, scales: Tensor | None, offsets: Sequence[int],
                 block_offsets: Sequence[int]) -> None:
        anchors = list(anchors) if anchors else [None] * len(sources)
        residuals = list(residuals) if residuals else [None] * len(sources)
        fast = [i for i, x in enumerate(sources) if _fast(x) and (anchors[i] is None or (
            _fast(anchors[i]) and anchors[i].dtype == x.dtype)) and (residuals[i] is None or _fast_fp32(residuals[i]))]
        slow = sorted(set(range(len(sources))) - set(fast))
        self.ops.quantize(mode == "int8", block, *_pick(fast, sources, anchors, residuals), q, scales,
                          *_pick(fast, offsets, block_offsets))
        if slow:
            self._reference.quantize(mode, block, *_pick(slow, sources, anchors, residuals), q, scales,
                                     *_pick(slow, offsets, block_offsets))

    def dequantize(self, mode: str, block: int, q_rows: Tensor, scale_rows: Tensor | None,
                   targets: Sequence[Tensor], anchors: Sequence[Tensor | None], copies: Sequence[Tensor | None],
                   offsets: Sequence[int], block_offsets: Sequence[int], inv_count: float) -> None:
        anchors = list(anchors) if anchors else [None] * len(targets)
        copies = list(copies) if copies else [None] * len(targets)
        fast = [i for i, t in enumerate(targets) if _fast(t) and (anchors[i] is None or (
            _fast(anchors[i]) and anchors[i].dtype == t.dtype)) and (copies[i] is None or _fast(copies[i]))]
        slow = sorted(set(range(len(targets))) - set(fast))
        self.ops.dequantize(mode == "int8", block, q_rows, scale_rows, *_pick(fast, targets, anchors, copies),
                            *_pick(fast, offsets, block_offsets), float(inv_count))
        if slow:
            self._reference.dequantize(mode, block, q_rows, scale_rows, *_pick(slow, targets, anchors, copies),
                                       *_pick(slow, offsets, block_offsets), inv_count)

    def first_nonfinite(self, tensors: Sequence[Tensor]) -> int:
        if all(_fast(t) for t in tensors):
            return int(self.ops.first_nonfinite(list(tensors)))
        return _first_nonfinite_slow(self._reference, tensors)


def _fast_fp32(t: Tensor) -> bool:
    return t.is_contiguous() and t.dtype == torch.float32 and t.device.type == "cpu"


def _pick(index: Sequence[int], *lists: Sequence) -> list[list]:
    return [[values[i] for i in index] for values in lists]


def _first_nonfinite_slow(reference: ReferenceKernels, tensors: Sequence[Tensor]) -> int:
    """The reference on the non-empty tensors (its inf-norm has no value for an empty one)."""
    keep = [i for i, t in enumerate(tensors) if t.numel()]
    found = reference.first_nonfinite([tensors[i] for i in keep])
    return keep[found] if found >= 0 else -1
