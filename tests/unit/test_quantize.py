"""Compressed-round kernels: the reference against the stated math, the fused back-ends against it.

quantize: d = (x - a) + e; q = bf16(d) or int8 blocks (scale = max|d| / 127); e = d - deQ(q).
dequantize: value = a + (deQ(q_0) + deQ(q_1) + ...) * inv_count, written to target, anchor, copy.
C++ and Triton (CUDA, or the interpreter in a child process) must match the reference bit
for bit: q, scales, residuals, fp32/fp16 targets; a bf16 target or copy in the interpreter
is one rounding (it truncates), as in test_kernels.py.

Non-finite input (the pre-check refuses it before any round, so this is only what happens if
a caller skips it): an int8 block holding NaN/Inf gets scale NaN and q 0, its residual turns
NaN, other blocks are untouched; bf16 maps NaN to NaN and Inf to Inf (residual NaN).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from qsr_ds.kernels.reference import ReferenceKernels, quantize_int8_blocks

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
REFERENCE = ReferenceKernels()
INT8_BOUND = 0.5 + 2.0**-15  # |d - deQ(q)| <= scale * INT8_BOUND (derivation in the report / compress.py)
BF16_BOUND = 2.0**-8  # |d - bf16(d)| <= 2^-8 |d| (half an ulp of an 8-bit significand)


# fixtures cpp_kernels and fused: tests/unit/conftest.py


def _sizes(block: int, device) -> list[int]:
    large = [] if INTERPRETING else [200_003]
    return [0, 1, block - 1, block, block + 1, 3 * block + 5] + large


def _layout(sizes, block):
    offsets, block_offsets, pos, blocks = [], [], 0, 0
    for n in sizes:
        offsets.append(pos)
        block_offsets.append(blocks)
        pos += n
        blocks += -(-n // block)
    return offsets, block_offsets, pos, blocks


def _inputs(sizes, block, dtype, device, seed):
    """Sources with a zero block, a tiny block (127 / max overflows) and fp32 subnormals; anchors near them.

    (No bf16 subnormals: the Triton interpreter converts those to fp32 inexactly, CUDA does not.)
    """
    gen = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(n, generator=gen, dtype=torch.float64) * 3).to(dtype) for n in sizes]
    big = xs[5]
    big[:block] = 0  # d = 0: a zero block (anchor and residual are 0 there, see below)
    tiny = torch.linspace(1e-37, 2e-37, block) * (-1) ** torch.arange(block)  # (zeros in fp16)
    big[block: 2 * block] = tiny.to(dtype)
    anchors = [x + (torch.randn(x.shape, generator=gen) * 0.01).to(dtype) for x in xs]
    anchors[5][: 2 * block] = 0
    if dtype == torch.float32:
        big[2 * block: 2 * block + 3] = torch.tensor([1e-42, -3e-41, 2e-39])  # subnormals in a normal block
    residuals = [torch.randn(x.shape, generator=gen) * 1e-3 for x in xs]
    residuals[5][: 2 * block] = 0
    return ([x.to(device) for x in xs], [a.to(device) for a in anchors], [e.to(device) for e in residuals])


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _run_quantize(backend, mode, block, xs, anchors, residuals, device):
    offsets, block_offsets, total, blocks = _layout([x.numel() for x in xs], block)
    q = torch.full((total,), 99 if mode == "int8" else float("nan"),
                   dtype=torch.int8 if mode == "int8" else torch.bfloat16, device=device)
    scales = torch.full((blocks,), -1.0, device=device) if mode == "int8" else None
    residuals = [None if e is None else e.clone() for e in residuals]
    backend.quantize(mode, block, xs, anchors, residuals, q, scales, offsets, block_offsets)
    return q, scales, residuals


# ----------------------------------------------------------------- the reference's math
def test_int8_reference_is_the_stated_math():
    d = torch.tensor([1.0, -2.0, 0.5, 4.0, 0.0, 0.0, -0.0, 0.0, 3.0, -1.5], dtype=torch.float32)
    q, scale = quantize_int8_blocks(d, 4)
    four, three = torch.tensor(4.0), torch.tensor(3.0)
    assert torch.equal(scale, torch.stack([four / 127, torch.tensor(0.0), three / 127]))
    # 1 * 127/4 = 31.75 -> 32; 2 * 127/4 = 63.5 -> 64 (half to even); 1.5 * 127/3 = 63.5 -> 64
    assert q.tolist() == [32, -64, 16, 127, 0, 0, 0, 0, 127, -64]
    assert not scale.isnan().any()
    # correctly rounded divisions (torch's ``127 / t`` is 127 * (1 / t), which rounds twice)
    amax = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) + 1e-3
    d = torch.stack([amax, -amax * 0.3], 1).reshape(-1)
    q, scales = quantize_int8_blocks(d, 2)
    a, b = amax.numpy(), d.view(-1, 2)[:, 1].numpy()
    assert torch.equal(scales, torch.from_numpy(a / np.float32(127)))
    assert torch.equal(q.view(-1, 2)[:, 1], torch.from_numpy(np.rint(b * (np.float32(127) / a)).astype(np.int8)))


@pytest.mark.parametrize("backend_name", ["torch", "cpp"])
def test_error_bounds(backend_name, request):
    backend = REFERENCE if backend_name == "torch" else request.getfixturevalue("cpp_kernels")
    gen = torch.Generator().manual_seed(1)
    block = 256
    # blocks of very different magnitudes, so a global scale would lose the small ones
    n = 40 * block + 17
    d = torch.randn(n, generator=gen) * torch.logspace(-6, 3, 41).repeat_interleave(block)[:n]
    for mode in ("int8", "bf16"):
        q, scales, (e,) = _run_quantize(backend, mode, block, [d], [None], [torch.zeros_like(d)], d.device)
        if mode == "int8":
            per_elem = scales.repeat_interleave(block)[: d.numel()]
            assert (e.abs() <= per_elem * INT8_BOUND).all()
            assert torch.equal(e, d - q.float() * per_elem)
            peaks = q.view(-1)[: 40 * block].view(40, block).abs().amax(1)
            assert (peaks == 127).all()  # the largest |d| of every block maps to +-127
        else:
            assert torch.equal(q, d.to(torch.bfloat16))
            assert (e.abs() <= BF16_BOUND * d.abs()).all()
            assert torch.equal(e, d - q.float())


# --------------------------------------------------------------- fused against reference
@pytest.mark.parametrize("mode,block", [("int8", 64), ("int8", 100), ("int8", 1), ("bf16", 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_anchor,with_residual", [(True, True), (False, True), (True, False)])
def test_quantize_matches_reference(fused, mode, block, dtype, with_anchor, with_residual):
    backend, device, _ = fused
    if block == 1 and (dtype != torch.float32 or INTERPRETING):
        pytest.skip("block 1: one dtype, and not in the interpreter (a program per element)")
    sizes = _sizes(max(block, 8), device)
    xs, anchors, residuals = _inputs(sizes, max(block, 8), dtype, device, seed=block + len(mode))
    anchors = anchors if with_anchor else [None] * len(xs)
    residuals = residuals if with_residual else [None] * len(xs)
    want = _run_quantize(REFERENCE, mode, block, [x.cpu() for x in xs], [a if a is None else a.cpu() for a in anchors],
                         [e if e is None else e.cpu() for e in residuals], torch.device("cpu"))
    got = _run_quantize(backend, mode, block, xs, anchors, residuals, device)
    assert torch.equal(_bits(got[0]), _bits(want[0])), "q differs"
    if mode == "int8":
        assert torch.equal(_bits(got[1]), _bits(want[1])), "scales differ"
        assert not want[1].isnan().any() and (want[1] == 0).any()  # zero and tiny blocks: scale 0, no NaN
    for g, w in zip(got[2], want[2]):
        assert (g is None) == (w is None)
        if g is not None:
            assert torch.equal(_bits(g), _bits(w)), "residual differs"


def test_quantize_non_contiguous_and_mixed_calls(fused):
    backend, device, _ = fused
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(6, 7, generator=gen).to(device).t(), torch.randn(300, generator=gen).to(device)]
    anchors = [torch.zeros(42, device=device), torch.zeros(300, dtype=torch.float64, device=device)]  # 2nd: other dtype
    residuals = [torch.randn(42, generator=gen).to(device) * 1e-3, torch.zeros(300, device=device)]
    for mode in ("int8", "bf16"):
        want = _run_quantize(REFERENCE, mode, 64, [x.cpu() for x in xs], [a.cpu() for a in anchors],
                             [e.cpu() for e in residuals], torch.device("cpu"))
        got = _run_quantize(backend, mode, 64, xs, anchors, residuals, device)
        assert torch.equal(_bits(got[0]), _bits(want[0]))
        assert all(torch.equal(_bits(g), _bits(w)) for g, w in zip(got[2], want[2]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_policy(fused, bad):
    backend, device, _ = fused
    gen = torch.Generator().manual_seed(3)
    block = 64
    clean = torch.randn(3 * block + 9, generator=gen)
    poisoned = clean.clone()
    poisoned[block + 5] = bad
    for be, dev in ((REFERENCE, torch.device("cpu")), (backend, device)):
        for mode in ("int8", "bf16"):
            zeros = torch.zeros(clean.numel(), device=dev)
            q0, s0, (e0,) = _run_quantize(be, mode, block, [clean.to(dev)], [None], [zeros], dev)
            q1, s1, (e1,) = _run_quantize(be, mode, block, [poisoned.to(dev)], [None], [zeros], dev)
            hit = slice(block, 2 * block)
            rest = torch.ones(clean.numel(), dtype=torch.bool)
            rest[hit] = False
            if mode == "int8":
                assert s1[1].isnan() and not (q1[hit] != 0).any() and e1[hit].isnan().all()
                assert torch.equal(s1[[0, 2, 3]], s0[[0, 2, 3]])
            else:
                assert q1[block + 5].float().item() == bad or (bad != bad and q1[block + 5].isnan())
                assert e1[block + 5].isnan()
                rest[hit] = True
                rest[block + 5] = False
            assert torch.equal(_bits(q1.cpu()[rest]), _bits(q0.cpu()[rest]))
            assert torch.equal(e1.cpu()[rest], e0.cpu()[rest])


DEQ_CASES = [(torch.float32, None), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
             (torch.bfloat16, None), (torch.float16, torch.float32)]


@pytest.mark.parametrize("mode", ["int8", "bf16"])
@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("target_dtype,copy_dtype", DEQ_CASES, ids=lambda d: str(d).replace("torch.", ""))
def test_dequantize_matches_reference(fused, mode, rows, target_dtype, copy_dtype):
    backend, device, exact = fused
    block = 64
    gen = torch.Generator().manual_seed(rows)
    sizes = _sizes(block, device)
    offsets, block_offsets, total, blocks = _layout(sizes, block)
    if mode == "int8":
        q_rows = torch.randint(-127, 128, (rows, total), generator=gen, dtype=torch.int8)
        scale_rows = torch.rand(rows, blocks, generator=gen) * 1e-2
        scale_rows[:, 0] = 0  # a zero block of every replica
    else:
        q_rows = (torch.randn(rows, total, generator=gen) * 1e-2).to(torch.bfloat16)
        scale_rows = None
    anchor_values = [torch.randn(n, generator=gen).to(target_dtype) for n in sizes]

    def run(be, dev):
        targets = [torch.full((n,), float("nan"), dtype=target_dtype, device=dev) for n in sizes]
        anchors = [a.clone().to(dev) for a in anchor_values]
        anchors[1] = None  # a target without an anchor gets the mean alone
        copies = [torch.full((n,), float("nan"), dtype=copy_dtype, device=dev) if copy_dtype else None for n in sizes]
        be.dequantize(mode, block, q_rows.to(dev), None if scale_rows is None else scale_rows.to(dev), targets,
                      anchors, copies, offsets, block_offsets, 1.0 / rows)
        return targets, anchors, copies

    want, got = run(REFERENCE, torch.device("cpu")), run(backend, device)
    loose = not exact
    for w_list, g_list in zip(want, got):
        for w, g in zip(w_list, g_list):
            if w is None:
                assert g is None
                continue
            if loose and w.dtype == torch.bfloat16:
                step = (_bits(g).int() - _bits(w).int()).abs()
                assert (step <= 1).all()  # the interpreter truncates where CUDA and C++ round
            else:
                assert torch.equal(_bits(g), _bits(w))
    # anchor and target hold the same value
    for t, a in zip(want[0], want[1]):
        if a is not None:
            assert torch.equal(_bits(t), _bits(a))


def test_dequantize_is_the_ordered_fp32_sum():
    gen = torch.Generator().manual_seed(4)
    q_rows = torch.randint(-127, 128, (3, 10), generator=gen, dtype=torch.int8)
    scale_rows = torch.rand(3, 1, generator=gen)
    anchor = torch.randn(10, generator=gen)
    target, a = torch.empty(10), anchor.clone()
    REFERENCE.dequantize("int8", 16, q_rows, scale_rows, [target], [a], [None], [0], [0], 1 / 3)
    terms = [q_rows[r].float() * scale_rows[r] for r in range(3)]
    want = anchor + ((terms[0] + terms[1]) + terms[2]) * torch.tensor(1 / 3, dtype=torch.float32)
    assert torch.equal(target, want) and torch.equal(a, want)


def test_cpp_rejects_bad_calls_clearly(cpp_kernels):
    ops = cpp_kernels.ops
    x = [torch.ones(10)]
    with pytest.raises(RuntimeError, match="block must be in"):
        ops.quantize(True, 5000, x, [None], [None], torch.zeros(10, dtype=torch.int8), torch.zeros(1), [0], [0])
    with pytest.raises(RuntimeError, match="q must be a flat contiguous CPU int8"):
        ops.quantize(True, 4, x, [None], [None], torch.zeros(10), torch.zeros(3), [0], [0])
    with pytest.raises(RuntimeError, match="does not fit scales"):
        ops.quantize(True, 4, x, [None], [None], torch.zeros(10, dtype=torch.int8), torch.zeros(2), [0], [0])
    with pytest.raises(RuntimeError, match="anchor #0 must match"):
        ops.quantize(False, 4, x, [torch.ones(10, dtype=torch.float64)], [None],
                     torch.zeros(10, dtype=torch.bfloat16), None, [0], [0])
    with pytest.raises(RuntimeError, match="does not fit q rows"):
        ops.dequantize(False, 4, torch.zeros(2, 5, dtype=torch.bfloat16), None, x, [None], [None], [0], [0], 0.5)


@pytest.mark.skipif(INTERPRETING or CUDA, reason="already running Triton directly")
def test_triton_interpreter(triton_in_interpreter):
    """The Triton tests of this file, in a child pytest under TRITON_INTERPRET=1."""
    triton_in_interpreter(timeout_s=600)
