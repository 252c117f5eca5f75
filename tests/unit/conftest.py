"""Fixtures of the kernel tests (test_kernels.py, test_quantize.py): the back-ends that can run here."""
import os

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
