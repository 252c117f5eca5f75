"""ReplicaAverager on real gloo ranks (spawned processes)."""
import pytest
import torch
import torch.distributed as dist

from qsr_ds.sync.averager import ReplicaAverager, ReplicaMismatchError
from tests.ranks import RankFailure, run_ranks
from qsr_ds.topology import Topology, TopologyError

pytestmark = pytest.mark.timeout(180)

SHAPES = [(3,), (1,), (17, 5), (4000,), (2, 3, 7), (300_000,), (70_000,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.float32, torch.float32, torch.bfloat16]


def make_tensors(replica: int, shard: int):
    gen = torch.Generator().manual_seed(1000 * replica + shard)
    return [(f"t{i}", torch.randn(s, generator=gen).to(d)) for i, (s, d) in enumerate(zip(SHAPES, DTYPES))]


def _mean_worker(rank, world, ranks_per_replica, bucket_mb):
    topo = Topology.create(ranks_per_replica)
    named = make_tensors(topo.replica_index, topo.shard_rank)
    # the expected mean, computed independently in float64 from every replica's inputs
    everyone = [make_tensors(r, topo.shard_rank) for r in range(topo.num_replicas)]
    stacked = [torch.stack([e[i][1].double() for e in everyone]) for i in range(len(named))]
    expected = [s.mean(0) for s in stacked]
    # R - 1 fp32 additions of pre-scaled terms: each may round by half an ulp of a partial sum
    # bounded by mean(|x|); with R = 2 the single addition is correctly rounded (exact mean)
    magnitude = [s.abs().mean(0) for s in stacked]
    averager = ReplicaAverager(named, topology=topo, bucket_mb=bucket_mb, kernel="torch")
    stats = averager.average(step=0)
    out = []
    eps32 = torch.finfo(torch.float32).eps
    for (name, t), want, mag in zip(named, expected, magnitude):
        got = t.double()
        if t.dtype == torch.float32 and topo.num_replicas == 2:
            assert torch.equal(t, want.float()), f"{name}: not the correctly rounded mean"
        elif t.dtype == torch.float32:
            assert (got - want).abs().le((topo.num_replicas - 1) * eps32 * mag).all(), name
        else:
            # averaged in fp32, written back rounded once: within one ulp of the format
            ulp = torch.finfo(t.dtype).eps * want.abs() + torch.finfo(t.dtype).tiny
            assert (got - want).abs().le(ulp + (topo.num_replicas - 1) * eps32 * mag).all(), name
        out.append(t.float().view(torch.int32).sum().item())  # a bitwise digest
    return {"digest": out, "bytes": stats.bytes, "buckets": stats.buckets, "in_place": stats.in_place,
            "replica": topo.replica_index, "shard": topo.shard_rank}


@pytest.mark.parametrize("ranks_per_replica, bucket_mb", [(1, 0.25), (2, 64.0)])
def test_average_is_the_mean_and_replicas_are_bitwise_equal(ranks_per_replica, bucket_mb):
    results = run_ranks(_mean_worker, 4, ranks_per_replica, bucket_mb)
    by_shard = {}
    for res in results:
        by_shard.setdefault(res["shard"], []).append(res["digest"])
    for digests in by_shard.values():
        assert all(d == digests[0] for d in digests)
    numel = sum(torch.Size(s).numel() for s in SHAPES)
    assert all(r["bytes"] == 4 * numel for r in results)
    if bucket_mb < 1:
        # 0.25 MiB = 65,536 floats: the 300,000 tensor is reduced in place, the 70,000 bf16 one
        # is split over two buckets, dtypes never share a bucket
        assert all(r["in_place"] == 1 for r in results)
        assert all(r["buckets"] == 5 for r in results)


def test_three_replicas_mean_within_one_ulp():
    run_ranks(_mean_worker, 3, 1, 0.25)


def _r1_worker(rank, world):
    topo = Topology.create(world)  # one replica of all ranks
    named = make_tensors(0, rank)
    before = [t.clone() for _, t in named]
    stats = ReplicaAverager(named, topology=topo).average(step=5)
    assert all(torch.equal(a, t) for a, (_, t) in zip(before, named))
    return stats.bytes


def test_one_replica_sends_nothing():
    assert run_ranks(_r1_worker, 2) == [0, 0]


def _layout_worker(rank, world):
    topo = Topology.create(1)
    named = make_tensors(rank, 0)
    if rank == 1:
        named[2] = ("t2", torch.zeros(5, 17))
    before = [t.clone() for _, t in named]
    try:
        ReplicaAverager(named, topology=topo, kernel="torch").average(step=0)
    except ReplicaMismatchError as err:
        assert all(torch.equal(a, t) for a, (_, t) in zip(before, named)), "tensors changed"
        return str(err)
    return "no error"


def test_layout_mismatch_names_first_differing_tensor_and_writes_nothing():
    messages = run_ranks(_layout_worker, 2)
    for msg in messages:
        assert "replica 1" in msg and "tensor #2" in msg and "(5, 17)" in msg and "(17, 5)" in msg


def _nonfinite_worker(rank, world, bad_value, step_skew):
    topo = Topology.create(2)
    named = make_tensors(topo.replica_index, topo.shard_rank)
    if rank == 3 and bad_value is not None:
        named[4][1][1, 2, 3] = bad_value
    before = [t.clone() for _, t in named]
    step = 10 + (step_skew if rank == 2 else 0)
    try:
        ReplicaAverager(named, topology=topo, kernel="torch").average(step=step)
    except ReplicaMismatchError as err:
        unchanged = all(torch.equal(a, t) or (a.isnan() == t.isnan()).all() for a, (_, t) in zip(before, named))
        assert unchanged, "a replica was half-averaged"
        return str(err)
    return "no error"


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_on_one_replica_raises_everywhere_and_writes_nothing(bad_value):
    messages = run_ranks(_nonfinite_worker, 4, bad_value, 0)
    for msg in messages:
        assert "replica 1 (rank 3)" in msg and "NaN or Inf" in msg
    # the rank sharing rank 3's layout names the tensor; the others still refuse
    assert "'t4'" in messages[1] and "'t4'" in messages[3]


def test_replicas_at_different_steps_refuse_to_average():
    messages = run_ranks(_nonfinite_worker, 4, None, 1)
    for msg in messages:
        assert "replica 1 (rank 2) is at step 11" in msg and "step 10" in msg


def _topology_errors(rank, world):
    with pytest.raises(TopologyError, match="not a multiple of ranks_per_replica=2"):
        Topology.create(2)
    with pytest.raises(TopologyError, match=">= 1"):
        Topology.create(0)
    topo = Topology.create(3)
    assert (topo.num_replicas, topo.replica_index, topo.shard_rank) == (1, 0, rank)
    topo = Topology.create(1)
    assert (topo.num_replicas, topo.replica_index, topo.replica_group_ranks) == (3, rank, [0, 1, 2])
    return dist.get_world_size(topo.replica_group), dist.get_world_size(topo.shard_group)


def test_topology_shapes_and_errors():
    assert run_ranks(_topology_errors, 3) == [(3, 1)] * 3


def test_topology_needs_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(TopologyError, match="not initialized"):
        Topology.create(1)


def test_run_ranks_reports_failures():
    with pytest.raises(RankFailure, match="rank 1: ZeroDivisionError"):
        run_ranks(_fail_on_rank_one, 2)


def _fail_on_rank_one(rank, world):
    return 1 / (1 - rank)


def _dead_peer_worker(rank, world, where):
    import os
    import time

    topo = Topology.create(1, timeout_s=4)
    named = make_tensors(rank, 0)
    averager = ReplicaAverager(named, topology=topo, kernel="torch")
    averager.average(step=1)
    if rank == 1:
        if where == "hang":
            time.sleep(12)  # alive but never joins round 2 (rank 0 times out after 4 s)
        os._exit(1)  # dies before round 2
    start = time.perf_counter()
    try:
        averager.average(step=2)
    except RuntimeError as err:
        return type(err).__name__, str(err), time.perf_counter() - start
    return "no error", "", 0.0


@pytest.mark.parametrize("where", ["exit", "hang"])
def test_dead_or_hung_peer_fails_within_the_timeout_naming_the_round(where):
    results = run_ranks(_dead_peer_worker, 2, where, timeout_s=60, missing_ok=True)
    assert results[1] is None
    name, message, seconds = results[0]
    assert name == "ReplicaCommError" and "sync round 2" in message, message
    assert seconds < 25
