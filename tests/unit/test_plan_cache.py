"""The Triton back-end's launch-plan cache at real scale: least recently used out, never cleared wholesale."""
import pytest

triton_bucket = pytest.importorskip("qsr_ds.kernels.triton_bucket")


def test_plan_cache_keeps_every_bucket_of_a_large_round_and_evicts_least_recently_used():
    kernels = triton_bucket.TritonKernels()
    built = []

    def make(key):
        built.append(key)
        return key

    buckets = 550  # FSDP2 at 70B with S = 8: ~550 buckets per rank, each packed and unpacked
    for _ in range(3):  # three rounds: every plan is built once, in the first
        for b in range(buckets):
            for op in ("pack", "unpack"):
                assert kernels._plan((op, b), lambda: make((op, b))) == (op, b)
    assert len(built) == 2 * buckets
    limit = triton_bucket._PLAN_CACHE_LIMIT
    kernels._plan(("pack", 0), lambda: make(("pack", 0)))  # touched: now the most recent
    for extra in range(limit - 2 * buckets + 1):
        kernels._plan(("other", extra), lambda: make(("other", extra)))
    assert len(kernels._plans) == limit
    assert ("pack", 0) in kernels._plans and ("unpack", 0) not in kernels._plans
