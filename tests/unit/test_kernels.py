"""Fused back-ends (C++ on CPU, Triton) against the torch reference.

fp32 results must be bitwise identical; a bf16/fp16 copy must be a single rounding of the
fp32 value (bitwise the reference's round-to-nearest-even for the C++ op and for Triton on
CUDA; the Triton interpreter truncates to bf16, which is still one rounding).

The C++ op is built once per session (module fixture; ~30 s the very first time on a
machine, then cached). Triton runs on CUDA when there is a GPU, else on CPU under
TRITON_INTERPRET=1 in a child pytest process (test_triton_interpreter), so that the
interpreter never leaks into other test modules of the same run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from qsr_ds.kernels import CHOICES, KernelUnavailable, describe_backends, get_backend
from qsr_ds.kernels.reference import ReferenceKernels

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
REFERENCE = ReferenceKernels()


# fixtures cpp_kernels and fused: tests/unit/conftest.py


def _small(device) -> bool:
    return INTERPRETING and device.type == "cpu"


def _sizes(device) -> list[int]:
    large = 40_000 if _small(device) else 3_000_000
    return [0, 1, 2, 3, 5, 17, 4096, 4097, 33_000, 0, 7, large, 1]


def _rand(n: int, dtype, device, gen) -> torch.Tensor:
    return (torch.randn(n, generator=gen, dtype=torch.float64) * 3).to(dtype).to(device)


def _layout(sizes, gap=0):
    offsets, pos = [], 0
    for n in sizes:
        offsets.append(pos)
        pos += n + gap
    return offsets, pos


# ------------------------------------------------------------------------ assertions
def _assert_one_rounding(got: torch.Tensor, value: torch.Tensor, exact: bool) -> None:
    """got (bf16/fp16) is the round-to-nearest-even of value (fp32), or with exact=False one of
    its two neighbours in that dtype (a single rounding in another mode)."""
    got, value = got.cpu().reshape(-1), value.cpu().reshape(-1).float()
    rne = value.to(got.dtype)
    if exact:
        assert torch.equal(got.view(torch.int16), rne.view(torch.int16)), "not the round-to-nearest-even value"
        return
    same = got.view(torch.int16) == rne.view(torch.int16)
    step = (got.view(torch.int16).int() - rne.view(torch.int16).int()).abs()
    g, r, v = got.double(), rne.double(), value.double()
    brackets = (g - v) * (r - v) <= 0  # the other neighbour lies on the other side of the value
    ok = same | ((step == 1) & brackets)
    assert bool(ok.all()), f"{int((~ok).sum())} values are not a single rounding, e.g. {value[~ok][:3].tolist()}"


def _assert_same(got: torch.Tensor, want: torch.Tensor, exact: bool) -> None:
    if got.dtype in (torch.bfloat16, torch.float16) and not exact:
        _assert_one_rounding(got, want.float(), exact=False)
    else:
        assert got.dtype == want.dtype
        assert torch.equal(got.cpu(), want.cpu()), "results differ from the reference"


# ------------------------------------------------------------------------------ pack
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("scale", [0.5, 1 / 3])
def test_pack_matches_reference(fused, dtype, scale):
    backend, device, _ = fused
    gen = torch.Generator().manual_seed(hash((str(dtype), scale)) % 2**31)
    sizes = _sizes(device)
    sources = [_rand(n, dtype, device, gen) for n in sizes]
    offsets, total = _layout(sizes, gap=3)  # gaps: nothing may be written outside the slices
    want = torch.full((total,), float("nan"), device=device)
    got = want.clone()
    REFERENCE.pack(sources, want, offsets, scale)
    backend.pack(sources, got, offsets, scale)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    # and the reference is what it says: one rounding to fp32, then one fp32 product
    flat = torch.cat([s.reshape(-1).float() for s in sources]) * torch.tensor(scale, dtype=torch.float32)
    assert torch.equal(torch.cat([want[o:o + n] for o, n in zip(offsets, sizes)]), flat)


def test_pack_mixed_dtypes_shapes_and_aligned_layout(fused):
    backend, device, _ = fused
    gen = torch.Generator().manual_seed(1)
    n = 4096 if _small(device) else 1 << 20
    shapes = [(8, 16), (n,), (3, 8), (64,), (2, n // 2)]  # every size and offset a multiple of 8
    sources = [_rand(int(torch.tensor(s).prod()), d, device, gen).view(s)
               for s, d in zip(shapes, [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32])]
    offsets, total = _layout([s.numel() for s in sources])
    want, got = torch.zeros(total, device=device), torch.ones(total, device=device)
    REFERENCE.pack(sources, want, offsets, 0.25)
    backend.pack(sources, got, offsets, 0.25)
    assert torch.equal(got, want)


def test_pack_non_contiguous_sources(fused):
    backend, device, _ = fused
    gen = torch.Generator().manual_seed(2)
    sources = [_rand(42, torch.float32, device, gen).view(6, 7).t(), _rand(10, torch.bfloat16, device, gen),
               _rand(60, torch.float32, device, gen).view(6, 10)[:, ::2], _rand(5, torch.float32, device, gen)]
    assert not sources[0].is_contiguous() and not sources[2].is_contiguous()
    offsets, total = _layout([s.numel() for s in sources])
    want, got = torch.zeros(total, device=device), torch.ones(total, device=device)
    REFERENCE.pack(sources, want, offsets, 0.5)
    backend.pack(sources, got, offsets, 0.5)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------- unpack
UNPACK_CASES = [
    (torch.float32, None), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.bfloat16, None), (torch.float16, None), (torch.float64, torch.bfloat16), (torch.float32, torch.float32),
]


@pytest.mark.parametrize("target_dtype,copy_dtype", UNPACK_CASES, ids=lambda d: str(d).replace("torch.", ""))
def test_unpack_matches_reference(fused, target_dtype, copy_dtype):
    backend, device, exact = fused
    gen = torch.Generator().manual_seed(3)
    sizes = _sizes(device)
    offsets, total = _layout(sizes, gap=2)
    bucket = _rand(total, torch.float32, device, gen)
    poison = float("nan")

    def outputs():
        targets = [torch.full((n,), poison, dtype=target_dtype, device=device) for n in sizes]
        copies = [torch.full((n,), poison, dtype=copy_dtype, device=device) if copy_dtype else None for n in sizes]
        resets = [_rand(9, target_dtype, device, gen), _rand(4, torch.bfloat16, device, gen)]
        return targets, copies, resets

    want_t, want_c, want_r = outputs()
    got_t, got_c, got_r = outputs()
    REFERENCE.unpack(bucket, want_t, offsets, want_c, want_r)
    backend.unpack(bucket, got_t, offsets, got_c, got_r)
    for n, got, want in zip(sizes, got_t, want_t):
        _assert_same(got, want, exact)
    if copy_dtype is not None:
        for got, want in zip(got_c, want_c):
            _assert_same(got, want, exact)
    for r in got_r:
        assert not r.any()
    # the copy is a rounding of the fp32 value in the bucket, not of the rounded target
    if copy_dtype in (torch.bfloat16, torch.float16):
        for o, n, c in zip(offsets, sizes, got_c):
            _assert_one_rounding(c, bucket[o:o + n], exact)


def test_unpack_non_contiguous_targets_copies_and_resets(fused):
    backend, device, exact = fused
    gen = torch.Generator().manual_seed(4)
    bucket = _rand(200, torch.float32, device, gen)
    shapes = [(7, 6), (10,), (5, 4)]

    def outputs():
        targets = [torch.zeros(6, 7, device=device).t(), torch.zeros(10, device=device),
                   torch.zeros(5, 8, device=device)[:, ::2]]
        copies = [torch.zeros(7, 6, dtype=torch.bfloat16, device=device),
                  torch.zeros(20, dtype=torch.bfloat16, device=device)[::2], None]
        resets = [torch.ones(8, 3, device=device).t(), torch.ones(5, device=device)]
        return targets, copies, resets

    offsets = [0, 50, 100]
    want_t, want_c, want_r = outputs()
    got_t, got_c, got_r = outputs()
    REFERENCE.unpack(bucket, want_t, offsets, want_c, want_r)
    backend.unpack(bucket, got_t, offsets, got_c, got_r)
    for got, want, shape in zip(got_t, want_t, shapes):
        assert got.shape == shape
        assert torch.equal(got, want)
    for got, want in zip(got_c[:2], want_c[:2]):
        _assert_same(got, want, exact)
    assert not any(r.any() for r in got_r)


def test_resets_alone_and_empty_calls(fused):
    backend, device, _ = fused
    resets = [torch.ones(5, device=device), torch.ones(3, dtype=torch.bfloat16, device=device),
              torch.ones(0, device=device)]
    bucket = torch.zeros(4, device=device)
    backend.unpack(bucket, [], [], [], resets)
    assert not any(r.any() for r in resets)
    backend.pack([torch.ones(0, device=device)], bucket, [0], 0.5)
    backend.unpack(bucket, [torch.ones(0, device=device)], [0], [None])
    assert not bucket.any()


# -------------------------------------------------------------------- first_nonfinite
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_first_nonfinite_finds_each_kind(fused, bad):
    backend, device, _ = fused
    gen = torch.Generator().manual_seed(5)
    big = 40_000 if _small(device) else 2_000_000
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]
    tensors = [_rand(n, d, device, gen) for n, d in zip([10, 0, 33, big, 7], dtypes)]
    assert backend.first_nonfinite(tensors) == -1
    assert backend.first_nonfinite([]) == -1
    for i in (4, 3, 2, 0):  # plant from the back: the answer is always the lowest index
        t = tensors[i]
        t[-1 if i == 3 else t.numel() // 2] = bad
        assert backend.first_nonfinite(tensors) == i
        # (the reference's inf-norm refuses empty tensors, so it sees the non-empty ones)
        assert REFERENCE.first_nonfinite([t for t in tensors if t.numel()]) == i - (i > 1)


def test_first_nonfinite_non_contiguous(fused):
    backend, device, _ = fused
    tensors = [torch.zeros(4, 6, device=device).t(), torch.zeros(3, device=device)]
    assert backend.first_nonfinite(tensors) == -1
    tensors[0][5, 3] = float("inf")
    assert backend.first_nonfinite(tensors) == 0


def test_large_value_range_and_subnormals(fused):
    backend, device, exact = fused
    values = torch.tensor([0.0, -0.0, 1e-40, -1e-42, 3.4e38, -3.3e38, 1e-8, 65519.0, 65520.0, 1.00390625,
                           1.01171875, -1.00390625, 2.0**-133], dtype=torch.float32, device=device)
    for copy_dtype in (torch.bfloat16, torch.float16):
        targets, copies = [torch.empty_like(values)], [torch.empty(values.shape, dtype=copy_dtype, device=device)]
        backend.unpack(values, targets, [0], copies)
        assert torch.equal(targets[0].view(torch.int32), values.view(torch.int32))  # -0.0 and subnormals kept
        if exact:
            assert torch.equal(copies[0].cpu().view(torch.int16), values.cpu().to(copy_dtype).view(torch.int16))


# ------------------------------------------------------------------- C++ specifics
def test_cpp_uses_threads_and_matches(cpp_kernels):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(6)
        sources = [_rand(n, torch.float32, "cpu", gen) for n in (1_500_000, 3, 700_001)]
        offsets, total = _layout([s.numel() for s in sources])
        want, got = torch.zeros(total), torch.zeros(total)
        REFERENCE.pack(sources, want, offsets, 1 / 3)
        cpp_kernels.pack(sources, got, offsets, 1 / 3)
        assert torch.equal(got, want)
        assert cpp_kernels.ops.openmp_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_cpp_rejects_bad_calls_clearly(cpp_kernels):
    ops = cpp_kernels.ops
    with pytest.raises(RuntimeError, match="does not fit the bucket"):
        ops.pack([torch.ones(10)], torch.zeros(5), [0], 1.0)
    with pytest.raises(RuntimeError, match="not contiguous"):
        ops.pack([torch.ones(4, 4).t()], torch.zeros(16), [0], 1.0)
    with pytest.raises(RuntimeError, match="fp32"):
        ops.pack([torch.ones(4)], torch.zeros(4, dtype=torch.float64), [0], 1.0)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops.first_nonfinite([torch.ones(3, dtype=torch.int32)])


def _load_in_rank(rank, world_size):
    from qsr_ds.kernels import cpp

    backend, why = cpp.load(torch.device("cpu"))
    assert backend is not None, why
    bucket = torch.zeros(4)
    backend.pack([torch.full((4,), float(rank + 1))], bucket, [0], 0.5)
    return bucket.tolist()


def test_cpp_concurrent_ranks_share_one_cache(cpp_kernels, tmp_path):
    """Three spawned ranks load from a fresh cache copy at once, past a stale torch baton file
    (what a build killed mid-way leaves behind, which would hang torch's own wait)."""
    from qsr_ds.kernels import cpp
    from tests.ranks import run_ranks

    built = cpp.cache_dir()
    if not (built / f"{cpp.NAME}.so").exists():
        pytest.skip("the C++ op was not built into the default cache")
    env = {"QSR_DS_EXTENSIONS_DIR": str(tmp_path)}
    old = os.environ.get("QSR_DS_EXTENSIONS_DIR")
    os.environ["QSR_DS_EXTENSIONS_DIR"] = str(tmp_path)
    try:
        target = cpp.cache_dir()
    finally:
        if old is None:
            del os.environ["QSR_DS_EXTENSIONS_DIR"]
        else:
            os.environ["QSR_DS_EXTENSIONS_DIR"] = old
    shutil.copytree(built, target)
    (target / "lock").write_text("")  # stale baton
    results = run_ranks(_load_in_rank, 3, timeout_s=120, env=env)
    assert results == [[0.5] * 4, [1.0] * 4, [1.5] * 4]
    assert not (target / "lock").exists()


# ----------------------------------------------------------------- choice of back-end
def test_auto_and_explicit_choices():
    cpu = torch.device("cpu")
    auto = get_backend("auto", cpu)
    from qsr_ds.kernels import cpp

    cpp_ok = cpp.load(cpu)[0] is not None
    assert auto.name == ("cpp" if cpp_ok else "torch")
    assert get_backend("torch", cpu).name == "torch"
    with pytest.raises(KernelUnavailable, match="unknown kernel back-end 'cuda'"):
        get_backend("cuda", cpu)
    with pytest.raises(KernelUnavailable, match="runs on CPU tensors only"):
        get_backend("cpp", torch.device("cuda"))
    if not INTERPRETING:
        with pytest.raises(KernelUnavailable, match="kernel back-end 'triton' is unavailable for cpu.*CUDA"):
            get_backend("triton", cpu)
    assert set(CHOICES) == {"auto", "triton", "cpp", "torch"}


def test_describe_backends_reports_each():
    report = describe_backends()
    assert report["torch"]["available"] is True
    assert set(report) >= {"torch", "cpp", "triton", "auto"}
    for name in ("cpp", "triton"):
        entry = report[name]
        assert isinstance(entry["available"], bool)
        assert entry["available"] or entry["reason"], f"{name} is unavailable without a reason"
    assert report["auto"]["cpu"] in ("cpp", "torch")


def _child(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_cpp_turned_off_falls_back_and_says_why():
    code = (
        "import torch\n"
        "from qsr_ds.kernels import get_backend, describe_backends, KernelUnavailable\n"
        "assert get_backend('auto', torch.device('cpu')).name == 'torch'\n"
        "d = describe_backends()['cpp']\n"
        "assert not d['available'] and 'QSR_DS_NO_CPP' in d['reason'], d\n"
        "try:\n"
        "    get_backend('cpp', torch.device('cpu'))\n"
        "except KernelUnavailable as err:\n"
        "    print('raised:', err)\n"
        "from qsr_ds.cli import main\n"
        "assert main(['info']) == 0\n"
    )
    done = _child(code, QSR_DS_NO_CPP="1")
    assert done.returncode == 0, done.stderr
    assert "raised: kernel back-end 'cpp' is unavailable for cpu tensors: turned off by QSR_DS_NO_CPP=1" in done.stdout
    assert "cpp     unavailable: turned off by QSR_DS_NO_CPP=1" in done.stdout  # what `qsr-ds info` prints


def test_cpp_missing_source_is_reported(monkeypatch, tmp_path):
    from qsr_ds.kernels import cpp

    monkeypatch.delenv("QSR_DS_NO_CPP", raising=False)
    monkeypatch.setattr(cpp, "_module", None)
    monkeypatch.setattr(cpp, "_failure", None)
    monkeypatch.setattr(cpp, "SOURCE", tmp_path / "csrc" / "multi_tensor.cpp")
    backend, why = cpp.load(torch.device("cpu"))
    assert backend is None and "multi_tensor.cpp is missing" in why


def test_import_builds_nothing():
    done = _child("import sys, qsr_ds, qsr_ds.sync.averager; import qsr_ds.kernels.cpp as c; "
                  "print(c._module is None and 'qsr_ds.kernels.triton_bucket' not in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


# ------------------------------------------------------------- Triton interpreter run
@pytest.mark.skipif(INTERPRETING or CUDA, reason="already running Triton directly")
def test_triton_interpreter(triton_in_interpreter):
    """The Triton tests of this file, in a child pytest under TRITON_INTERPRET=1."""
    triton_in_interpreter(timeout_s=300, no_skips=True)


# --------------------------------------------------------------------- plans, averager
def test_launch_plans_follow_repointed_tensors(fused):
    backend, device, _ = fused
    if backend.name != "triton":
        pytest.skip("launch plans are Triton's")
    gen = torch.Generator().manual_seed(7)
    sources = [_rand(n, torch.float32, device, gen) for n in (5, 4100)]
    bucket = torch.zeros(4105, device=device)
    backend.pack(sources, bucket, [0, 5], 1.0)
    backend.pack(sources, bucket, [0, 5], 1.0)  # the cached plan
    plans = len(backend._plans)
    sources[1] = _rand(4100, torch.float32, device, gen)  # new storage, same shape
    backend.pack(sources, bucket, [0, 5], 1.0)
    assert len(backend._plans) == plans + 1
    assert torch.equal(bucket, torch.cat(sources))


def _average_with_each(rank, world_size):
    from qsr_ds.sync.averager import ReplicaAverager
    from qsr_ds.topology import Topology

    topology = Topology.create(1)
    out = {}
    for kernel in ("torch", "cpp"):
        gen = torch.Generator().manual_seed(10 + rank)
        named = [(f"t{i}", torch.randn(n, generator=gen)) for i, n in enumerate((3, 40_000, 1, 5000))]
        copies = {"t1": torch.zeros(40_000, dtype=torch.bfloat16), "t2": torch.zeros(1, dtype=torch.float16)}
        avg = ReplicaAverager(named, topology=topology, copies=copies, kernel=kernel, bucket_mb=0.05)
        avg.average(step=0)
        out[kernel] = (avg.kernel_names, [t for _, t in named], copies)
    return out


def test_averager_rounds_are_bitwise_equal_across_back_ends(cpp_kernels):
    from tests.ranks import run_ranks

    ranks = run_ranks(_average_with_each, 2)
    for out in ranks:
        (names_ref, t_ref, c_ref), (names_cpp, t_cpp, c_cpp) = out["torch"], out["cpp"]
        assert names_ref == ["torch"] and names_cpp == ["cpp"]
        assert all(torch.equal(a, b) for a, b in zip(t_ref, t_cpp))
        assert all(torch.equal(c_ref[k].view(torch.int16), c_cpp[k].view(torch.int16)) for k in c_ref)
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["cpp"][1], ranks[1]["cpp"][1]))  # replicas identical


# ------------------------------------------------------------------------ qsr-ds info
def test_cli_info_prints_versions_and_backends(capsys):
    from qsr_ds.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "kernel back-ends:" in out
    assert "  cpp     " in out and "  triton  " in out and "auto    cpu -> " in out
    assert main(["info", "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"] == torch.__version__
    assert set(report["kernels"]) >= {"torch", "cpp", "triton", "auto"}


def test_reference_handles_empty_inputs():
    from qsr_ds.kernels.reference import ReferenceKernels

    ref = ReferenceKernels()
    bucket = torch.full((4,), 7.0)
    ref.pack([], bucket, [], 0.5)
    assert torch.equal(bucket, torch.full((4,), 7.0))
    nan = torch.tensor([1.0, float("nan")])
    assert ref.first_nonfinite([torch.empty(0), torch.ones(3), torch.empty(0, 2), nan]) == 3
    assert ref.first_nonfinite([torch.empty(0), torch.ones(2)]) == -1
