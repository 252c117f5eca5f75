"""Fixtures of the kernel tests (test_kernels.py, test_quantize.py): the back-ends that can run here."""
import os
import subprocess
import sys

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def cpp_kernels():
    from qsr_ds.kernels import cpp

    backend, why = cpp.load(torch.device("cpu"))
    if backend is None:
        pytest.skip(f"C++ back-end unavailable: {why}")
    return backend


@pytest.fixture(params=["cpp", "triton"])
def fused(request):
    """(back-end, device, exact_low_precision) for each fused back-end that can run here."""
    if request.param == "cpp":
        if INTERPRETING:
            pytest.skip("the interpreter child process tests Triton only")
        return request.getfixturevalue("cpp_kernels"), torch.device("cpu"), True
    from qsr_ds.kernels import triton_bucket  # noqa: F401 - import errors fail loudly here

    if CUDA:
        backend, why = triton_bucket.load(torch.device("cuda"))
        assert backend is not None, why
        return backend, torch.device("cuda"), True
    if not INTERPRETING:
        pytest.skip("Triton on CPU runs in the TRITON_INTERPRET=1 child (test_triton_interpreter)")
    backend, why = triton_bucket.load(torch.device("cpu"))
    assert backend is not None, why
    return backend, torch.device("cpu"), False


@pytest.fixture
def triton_in_interpreter(request):
    """Runs the Triton tests of the requesting file in a child pytest under TRITON_INTERPRET=1 (no C++
    back-end there), asserting they passed; ``no_skips`` also fails on a skip among them."""
    pytest.importorskip("triton")

    def run(*, timeout_s: float, no_skips: bool = False) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(request.path), "-k",
             "triton and not test_triton_interpreter"],
            env={**os.environ, "TRITON_INTERPRET": "1", "QSR_DS_NO_CPP": "1"}, capture_output=True, text=True,
            timeout=timeout_s,
        )
        tail = (done.stdout + done.stderr)[-4000:]
        assert done.returncode == 0, tail
        assert " passed" in done.stdout, tail
        if no_skips:
            assert "skipped" not in done.stdout.splitlines()[-1], tail

    return run
