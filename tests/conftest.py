import os
import sys

import pytest

# examples/ and tests/ helpers import by path; keep runs single-threaded per rank
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session", autouse=True)
def _build_cpp_kernels_once():
    """Compile the C++ back-end before any spawned ranks need it.

    kernel="auto" picks it for CPU tensors; built lazily inside a multi-rank test, the
    one-time compile (25-65 s on 2 cores) would eat into that test's timeout.
    """
    import torch

    from qsr_ds.kernels import cpp

    cpp.load(torch.device("cpu"))  # a failure to build just means the reference back-end is used


@pytest.fixture(scope="session")
def needs_deepspeed_fp16():
    """Skip a test whose subject is DeepSpeed fp16 where the accelerator has none (naming the CPU feature).

    Session-scoped so that it runs (and skips) before a module-scoped spawned world is built.
    """
    from qsr_ds.testing import deepspeed_fp16_missing

    reason = deepspeed_fp16_missing()
    if reason:
        pytest.skip(reason)
