"""OverlappedRound on real gloo ranks: the all-reduce runs behind local steps, then x += mean(x_s) - x_s."""
import io
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist

from qsr_ds.sync.averager import ReplicaAverager, ReplicaMismatchError
from qsr_ds.sync.overlap import OverlappedRound
from tests.ranks import run_ranks
from qsr_ds.topology import Topology

pytestmark = pytest.mark.timeout(180)

# t2 is an fp32 master with a bf16 model copy; t4 (300k fp32) is all-reduced in place by a blocking round
SHAPES = [(3,), (17, 5), (4000,), (2, 3, 7), (300_000,), (70_000,), (0,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32, torch.bfloat16, torch.float32]
BUCKET_MB = 0.25  # 65,536 floats: the 374,221-element snapshot goes out in 6 segments
TAU = 2


def make_tensors(replica: int, shard: int):
    gen = torch.Generator().manual_seed(1000 * replica + shard)
    return [(f"t{i}", torch.randn(s, generator=gen).to(d)) for i, (s, d) in enumerate(zip(SHAPES, DTYPES))]


def local_step(named, replica: int, shard: int, k: int) -> None:
    gen = torch.Generator().manual_seed(77 + 1000 * replica + 10 * shard + k)
    for _, t in named:
        t.add_((0.01 * torch.randn(t.shape, generator=gen)).to(t.dtype))


def build(named, topo, kernel="torch"):
    copies = {"t2": named[2][1].to(torch.bfloat16)}
    averager = ReplicaAverager(named, topology=topo, copies=copies, bucket_mb=BUCKET_MB, kernel=kernel)
    return averager, copies, OverlappedRound(averager, overlap_steps=TAU)


def _overlap_worker(rank, world, ranks_per_replica, kernel):
    topo = Topology.create(ranks_per_replica)
    R, replica, shard = topo.num_replicas, topo.replica_index, topo.shard_rank
    named = make_tensors(replica, shard)
    averager, copies, overlap = build(named, topo, kernel)
    message = None
    if R == 2 and ranks_per_replica == 2:
        # a NaN in one replica's x_s refuses the round on every rank before anything starts
        if rank == 3:
            named[3][1][1, 2, 3] = float("nan")
        before = [t.clone() for _, t in named]
        with pytest.raises(ReplicaMismatchError) as caught:
            overlap.start(10)
        message = str(caught.value)
        assert not overlap.in_flight and averager.totals.rounds == 0
        assert all(torch.equal(a, t) or (a.isnan() == t.isnan()).all() for a, (_, t) in zip(before, named))
        named[3][1].copy_(make_tensors(replica, shard)[3][1])

    # replica 1's background thread waits until its training thread has run the probes below, so
    # every other replica runs them with its own all-reduce provably still in flight
    gate = threading.Event()
    if replica == 1:
        reduce = averager.reduce_corrections
        averager.reduce_corrections = lambda *args: (gate.wait(), reduce(*args))
    x_s = [t.clone() for _, t in named]
    overlap.start(10)
    assert overlap.in_flight and overlap.apply_step == 10 + TAU
    expected_local = [t.clone() for t in x_s]
    for k in range(TAU):  # local steps, with training's own collectives on the other groups
        local_step(named, replica, shard, k)
        local_step(list(zip(range(99), expected_local)), replica, shard, k)
        probe = torch.ones(4)
        dist.all_reduce(probe, group=topo.world_group)
        assert probe.tolist() == [world] * 4
        if ranks_per_replica > 1:
            dist.all_reduce(probe, group=topo.shard_group)
            assert probe.tolist() == [world * ranks_per_replica] * 4
    gate.set()
    # the background thread only ever touches the snapshot
    assert all(torch.equal(t, want) for (_, t), want in zip(named, expected_local))
    local = [t.double() for _, t in named]
    stats = overlap.finish(10 + TAU)
    assert not overlap.in_flight and averager.totals.rounds == 1

    everyone = [make_tensors(r, shard) for r in range(R)]
    eps32 = torch.finfo(torch.float32).eps
    for i, (name, t) in enumerate(named):
        stacked = torch.stack([e[i][1].double() for e in everyone])
        mean, mag = stacked.mean(0), stacked.abs().mean(0)
        want = mean + (local[i] - x_s[i].double())
        # fp32: the mean's R - 1 additions, the subtraction of x_s and the addition of x each round once
        tol = eps32 * ((R - 1) * mag + (mean - x_s[i].double()).abs() + want.abs())
        if t.dtype != torch.float32:  # then rounded once more to the tensor's own format
            tol = tol + torch.finfo(t.dtype).eps * want.abs() + torch.finfo(t.dtype).tiny
        assert ((t.double() - want).abs() <= tol).all(), name
    assert torch.equal(copies["t2"], named[2][1].to(torch.bfloat16)), "the low-precision copy was not refreshed"

    numel = sum(torch.Size(s).numel() for s in SHAPES)
    segment = min(averager.bucket_numel, numel)
    assert stats.bytes == 4 * numel and stats.buckets == -(-numel // segment) == 6
    assert overlap.peak_extra_bytes == 4 * (numel + 2 * segment)
    assert averager.scratch_bytes == 4 * 2 * segment  # the blocking round's scratch is the same two buckets
    assert stats.overlap_steps == TAU and (stats.started_step, stats.apply_step) == (10, 10 + TAU)
    assert stats.comm_s >= 0 and stats.hidden_s >= 0 and stats.background_s > 0

    # a blocking round afterwards still averages right, on the same (shared) scratch buffers
    current = [t.float() for _, t in named]
    averager.average(step=20)
    assert averager.scratch_bytes == 4 * 2 * segment
    for (name, t), c in zip(named, current):
        rows = [torch.empty_like(c) for _ in range(R)]
        dist.all_gather(rows, c, group=topo.replica_group)
        stacked = torch.stack([r.double() for r in rows])
        mean = stacked.mean(0)
        tol = (R - 1) * eps32 * stacked.abs().mean(0)
        if t.dtype != torch.float32:
            tol = tol + torch.finfo(t.dtype).eps * mean.abs() + torch.finfo(t.dtype).tiny
        assert ((t.double() - mean).abs() <= tol).all(), name
    return message, [t.float().view(torch.int32).sum().item() for _, t in named]


@pytest.mark.parametrize("world, ranks_per_replica, kernel", [(2, 1, "auto"), (3, 1, "torch"), (4, 2, "torch")])
def test_overlapped_round_is_the_mean_plus_the_local_steps(world, ranks_per_replica, kernel):
    results = run_ranks(_overlap_worker, world, ranks_per_replica, kernel)
    if ranks_per_replica == 2:
        for message, _ in results:
            assert "replica 1 (rank 3)" in message and "NaN or Inf" in message
        assert "'t3'" in results[1][0]
    # after the blocking round every replica of a shard holds the same bits
    for shard in range(ranks_per_replica):
        digests = [d for r, (_, d) in enumerate(results) if r % ranks_per_replica == shard]
        assert all(d == digests[0] for d in digests)


class _OwnRounds(ReplicaAverager):
    """Stands for an averager with its own rounds (e.g. compressed) and no overlapped reduction."""

    def average(self, step=None, **kwargs):
        raise NotImplementedError


def _resume_worker(rank, world):
    topo = Topology.create(1)
    init = make_tensors(rank, 0)
    names = [n for n, _ in init]

    # uninterrupted: start after step 10, two local steps, apply after step 12
    named_a = [(n, t.clone()) for n, t in init]
    _, copies_a, overlap_a = build(named_a, topo)
    started = overlap_a.start(10, lr=0.1 * (rank + 1))
    assert started.lr == 0.1  # replica 0's learning rate, as for a blocking round
    for k in range(TAU):
        local_step(named_a, rank, 0, k)
    assert overlap_a.finish(12) is started

    # interrupted: a checkpoint after step 11 with the round in flight, then a fresh process resumes
    named_b = [(n, t.clone()) for n, t in init]
    averager_b, _, overlap_b = build(named_b, topo)
    verdict = averager_b.check(10, lr=0.5)  # the pre-check run by the caller, as the sync core does
    assert overlap_b.start(10, verdict=verdict).lr == 0.5
    local_step(named_b, rank, 0, 0)
    saved = io.BytesIO()
    torch.save({"tensors": [t for _, t in named_b], "overlap": overlap_b.state_dict()}, saved)
    saved.seek(0)
    ckpt = torch.load(saved)
    assert ckpt["overlap"]["apply_step"] == 12 and ckpt["overlap"]["overlap_steps"] == TAU
    named_c = list(zip(names, ckpt["tensors"]))
    averager_c, copies_c, overlap_c = build(named_c, topo)
    overlap_c.load_state_dict(ckpt["overlap"])
    assert overlap_c.in_flight and overlap_c.apply_step == 12
    local_step(named_c, rank, 0, 1)
    with pytest.raises(ValueError, match="applies after step 12 .*not after step 11"):
        overlap_c.finish(11)
    stats = overlap_c.finish(12)
    assert stats.started_step == 10 and stats.buckets == 6 and averager_c.totals.rounds == 1
    assert all(torch.equal(a, c) for (_, a), (_, c) in zip(named_a, named_c)), "resume is not bitwise exact"
    assert torch.equal(copies_a["t2"], copies_c["t2"])

    # misuse fails clearly, before any collective
    with pytest.raises(RuntimeError, match="no overlapped sync round is in flight"):
        overlap_c.finish()
    with pytest.raises(ValueError, match="overlap_steps must be an integer >= 1"):
        OverlappedRound(averager_c, overlap_steps=0)
    with pytest.raises(TypeError, match="_OwnRounds averages its own way but does not define reduce_corrections"):
        OverlappedRound(_OwnRounds(init, topology=topo), overlap_steps=1)
    assert overlap_c.state_dict() == {"overlap_steps": TAU, "in_flight": False}
    other = [(n, t.clone()) for n, t in init[:-2]]
    _, _, overlap_other = build(other, topo)
    with pytest.raises(ValueError, match="different set of averaged tensors"):
        overlap_other.load_state_dict(ckpt["overlap"])
    overlap_c.start(20)
    with pytest.raises(RuntimeError, match=r"round 2 \(started after step 20\) is still in flight"):
        overlap_c.start(21)
    overlap_c.finish()

    # flat fp32 shards whose averager bucket spans them all (a blocking round all-reduces them in
    # place): the snapshot still goes out in segment_mb pieces, two buffers of scratch
    flat = torch.randn(100_000, generator=torch.Generator().manual_seed(rank))
    everyone = torch.stack([torch.randn(100_000, generator=torch.Generator().manual_seed(r)) for r in range(world)])
    flat_averager = ReplicaAverager([("flat", flat)], topology=topo, bucket_mb=8 * 100_000 / 2**20, kernel="torch")
    flat_overlap = OverlappedRound(flat_averager, overlap_steps=1, segment_mb=0.1)
    assert flat_overlap.peak_extra_bytes == 4 * (100_000 + 2 * 26_214)
    assert flat_overlap.start(3).buckets == 4
    flat_overlap.finish(4)
    mean, x_s = everyone.double().mean(0), everyone[rank].double()
    assert ((flat.double() - mean).abs() <= torch.finfo(torch.float32).eps * ((mean - x_s).abs() + mean.abs())).all()
    with pytest.raises(ValueError, match="segment_mb must be > 0"):
        OverlappedRound(flat_averager, overlap_steps=1, segment_mb=0)

    # composes with compressed rounds: the correction is a' - x_s of a blocking compressed round
    from qsr_ds.sync.compress import CompressedAverager

    live, twin = ([(n, t.clone()) for n, t in make_tensors(0, 0)] for _ in range(2))  # one anchor everywhere
    compressed, blocking = (CompressedAverager(t, topology=topo, mode="int8", kernel="torch") for t in (live, twin))
    local_step(live, rank, 0, 5)
    local_step(twin, rank, 0, 5)
    x_s = [t.clone() for _, t in live]
    compressed_overlap = OverlappedRound(compressed, overlap_steps=1)
    compressed_overlap.start(30)
    local_step(live, rank, 0, 6)
    x_local = [t.clone() for _, t in live]
    compressed_overlap.finish(31)
    blocking.average(step=30)
    assert all(torch.equal(a, b) for a, b in zip(compressed.anchors, blocking.anchors))
    for (name, t), (_, a_new), xs, xl in zip(live, twin, x_s, x_local):
        if t.dtype == torch.float32:
            assert torch.equal(t, (a_new - xs) + xl), name

    # one replica (R = 1): nothing to send, nothing held, nothing changes
    one = Topology.create(world)
    named_one = [(n, t.clone()) for n, t in init]
    _, _, overlap_one = build(named_one, one)
    assert overlap_one.peak_extra_bytes == 0
    overlap_one.start(5)
    assert overlap_one.finish(5 + TAU).bytes == 0
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(init, named_one))
    return True


def test_checkpoint_with_a_round_in_flight_resumes_bitwise():
    assert run_ranks(_resume_worker, 2) == [True, True]


def _dead_peer_worker(rank, world, how):
    topo = Topology.create(1, timeout_s=3)
    named = [("big", torch.randn(2_000_000, generator=torch.Generator().manual_seed(rank)))]
    averager = ReplicaAverager(named, topology=topo, bucket_mb=0.25, kernel="torch")
    overlap = OverlappedRound(averager, overlap_steps=1)
    if rank == 1 and how == "hang":
        averager.reduce_corrections = lambda *args: time.sleep(8)  # alive, but never sends
    before = named[0][1].clone()
    overlap.start(1)
    if rank == 1:
        if how == "hang":
            time.sleep(8)  # past rank 0's 3 s timeout
        os._exit(1)  # dies with the round in flight
    start = time.perf_counter()
    try:
        overlap.finish(2)
    except RuntimeError as err:
        assert torch.equal(named[0][1], before), "a failed round applied something"
        assert not overlap.in_flight
        return type(err).__name__, str(err), time.perf_counter() - start
    return "no error", "", 0.0


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_peer_lost_mid_flight_fails_finish_within_the_timeout(how):
    results = run_ranks(_dead_peer_worker, 2, how, timeout_s=90, missing_ok=True)
    assert results[1] is None
    name, message, seconds = results[0]
    assert name == "ReplicaCommError" and "overlapped sync round 1 (started after step 1)" in message, message
    assert "nothing was applied" in message
    assert seconds < 30  # the 3 s process-group timeout, with room for a loaded machine
