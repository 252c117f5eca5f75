import os
import sys
import time

import pytest

# examples/ and tests/ helpers import by path; keep runs single-threaded per rank
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_sessionstart(session):
    """Compile the C++ back-end before any test, and before any spawned rank needs it.

    kernel="auto" picks it for CPU tensors; built lazily inside a multi-rank test, the one-time
    compile (1-2 min on 2 cores, longer on a loaded machine) would eat into that test's timeout.
    Here, at session start, no per-test timeout applies. A failure to build only means the
    reference back-end is used (and the C++ kernel tests skip, saying why).
    """
    import torch

    from qsr_ds.kernels import cpp

    started = time.perf_counter()
    _, why_not = cpp.load(torch.device("cpu"))
    print(f"\n[conftest] C++ kernels {'unavailable: ' + why_not if why_not else 'ready'} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)


@pytest.fixture(scope="session")
def needs_deepspeed_fp16():
    """Skip a test whose subject is DeepSpeed fp16 where the accelerator has none (naming the CPU feature).

    Session-scoped so that it runs (and skips) before a module-scoped spawned world is built.
    """
    from tests.ranks import deepspeed_fp16_missing

    reason = deepspeed_fp16_missing()
    if reason:
        pytest.skip(reason)
