"""CompressedAverager on real gloo ranks: R = 2 and 3 replicas, one rank each.

Stated bounds (per element, one round, x̄ = the exact mean of the replicas' tensors):
    x' - x̄ = mean_r(e_r before) - mean_r(e_r after)      (+ fp32 rounding of the sums)
with |e| <= 2^-8 |d| for bf16 and |e| <= (0.5 + 2^-15) * scale of its block for int8
(scale = max |d| of the block / 127). Over many rounds the errors telescope: with error
feedback the result trails the exact trajectory by mean_r e_r of the last round only;
without it they add up.
"""
import pytest
import torch
import torch.distributed as dist

from tests.ranks import run_ranks

pytestmark = pytest.mark.timeout(300)

BF16_REL = 2.0**-8
INT8_STEP = 0.5 + 2.0**-15
EPS32 = 2.0**-24
BLOCK = 64


def _start_tensors():
    """The same start on every replica (as after the start-up broadcast)."""
    gen = torch.Generator().manual_seed(0)
    return [
        ("w", torch.randn(40, 30, generator=gen)),
        ("b", torch.randn(7, generator=gen)),
        ("big", torch.randn(5000, generator=gen)),  # chunked with bucket_mb=0.005
        ("half", torch.randn(300, generator=gen).to(torch.bfloat16)),
        ("t", torch.randn(9, 11, generator=gen).t()),  # not contiguous
        ("zero", torch.zeros(130)),  # never moves: zero blocks every round
    ]


def _drift(named, replica: int, round_no: int):
    gen = torch.Generator().manual_seed(1000 * replica + round_no)
    for name, t in named:
        if name != "zero":
            t.add_((torch.randn(t.shape, generator=gen) * 0.05 * (replica + 1)).to(t.dtype))


def _gather(t: torch.Tensor, world: int) -> torch.Tensor:
    rows = [torch.empty_like(t.contiguous()) for _ in range(world)]
    dist.all_gather(rows, t.contiguous())
    return torch.stack(rows)


def _block_peaks(d: torch.Tensor, block: int) -> torch.Tensor:
    """max |d| of each element's block (per-tensor blocks, the last one partial)."""
    flat = d.reshape(-1)
    n = flat.numel()
    pad = torch.zeros(-(-n // block) * block, dtype=flat.dtype)
    pad[:n] = flat.abs()
    return pad.view(-1, block).amax(1).repeat_interleave(block)[:n]


def _digest(tensors) -> list[int]:
    return [int(t.float().contiguous().view(torch.int32).long().sum()) for t in tensors]


def _run_rounds(topo, mode, route, kernel, bucket_mb, rounds, world, check_bounds):
    from qsr_ds.sync.compress import CompressedAverager

    named = [(n, t.clone()) for n, t in _start_tensors()]
    copies = {"w": torch.zeros(40, 30, dtype=torch.bfloat16), "big": torch.zeros(5000, dtype=torch.float16)}
    avg = CompressedAverager(named, topology=topo, mode=mode, route=route, block=BLOCK, kernel=kernel,
                             bucket_mb=bucket_mb, copies=copies, anchored=True)
    history, saved = [], None
    for k in range(rounds):
        if k == 2:  # what a checkpoint after round 2 holds
            saved = ({n: t.clone() for n, t in named},
                     {key: ({n: v.clone() for n, v in val.items()} if isinstance(val, dict) else val)
                      for key, val in avg.state_dict().items()})
        _drift(named, topo.replica_index, k)
        before = [t.clone() for _, t in named]
        residual_before = [None if e is None else e.clone() for e in avg.residuals]
        anchor_before = [a.clone() for a in avg.anchors]
        stats = avg.average(step=k)
        if check_bounds:
            _check_round(avg, named, before, anchor_before, residual_before, world, mode)
        for (name, t), a in zip(named, avg.anchors):
            assert torch.equal(t.reshape(-1), a), f"{name}: anchor is not the written value"
        assert torch.equal(copies["w"], named[0][1].to(torch.bfloat16))
        assert torch.equal(copies["big"], named[2][1].to(torch.float16))
        history.append(_digest([t for _, t in named]) + _digest(avg.anchors) + _digest(avg.residuals))
    return avg, named, history, saved, stats


def _check_round(avg, named, before, anchor_before, residual_before, world, mode):
    for i, (name, t) in enumerate(named):
        xs = _gather(before[i].float(), world).double()
        mean = xs.mean(0)
        e_old = _gather(residual_before[i].view(t.shape), world).double()
        e_new = _gather(avg.residuals[i].view(t.shape), world).double()
        d = xs - anchor_before[i].view(t.shape).double() + e_old  # what each replica quantized
        if mode == "bf16":
            assert (e_new.abs() <= BF16_REL * d.abs()).all(), f"{name}: a bf16 residual above 2^-8 |d|"
        else:
            peaks = torch.stack([_block_peaks(d[r].reshape(-1), BLOCK).view(t.shape) for r in range(world)])
            assert (e_new.abs() <= INT8_STEP * peaks / 127 * (1 + 2**-20)).all(), f"{name}: int8 residual too large"
        bound = e_old.abs().mean(0) + e_new.abs().mean(0)
        slack = 8 * EPS32 * (mean.abs() + d.abs().amax(0))
        if t.dtype != torch.float32:  # the result is rounded once more to the tensor's dtype
            slack = slack + torch.finfo(t.dtype).eps * mean.abs()
        err = (t.double() - mean).abs()
        assert (err <= bound + slack).all(), f"{name}: {float((err - bound - slack).max())} above the bound"


def _rounds_worker(rank, world, route):
    from qsr_ds.sync.averager import RoundStats
    from qsr_ds.sync.compress import CompressedAverager
    from qsr_ds.kernels import cpp
    from qsr_ds.topology import Topology

    topo = Topology.create(1)
    fused = "cpp" if cpp.load(torch.device("cpu"))[0] is not None else "torch"
    out = {"fused": fused}
    for mode in ("bf16", "int8"):
        runs = {}
        for kernel, bucket_mb in (("torch", 64.0), (fused, 0.005)):
            # the per-round bound below counts the replicas' residuals, not the owners' (see the drift test)
            avg, named, history, saved, stats = _run_rounds(topo, mode, route, kernel, bucket_mb, 4, world,
                                                            check_bounds=kernel == "torch" and route == "gather")
            runs[kernel, bucket_mb] = history
            out[mode, "bytes", bucket_mb] = (stats.bytes, avg.bytes_per_round, avg.link_bytes_per_round,
                                             [[(s.numel, s.blocks, s.row_bytes) for s in b.segments]
                                              for b in avg.wire])
            out[mode, "peak"] = avg.peak_extra_bytes
        out[mode, "history"] = runs
        # resume from the state after round 2: the same rounds 3 and 4, bit for bit
        values, state = saved
        named = [(n, values[n]) for n, _ in _start_tensors()]
        copies = {"w": torch.zeros(40, 30, dtype=torch.bfloat16), "big": torch.zeros(5000, dtype=torch.float16)}
        resumed = CompressedAverager(named, topology=topo, mode=mode, route=route, block=BLOCK, kernel=fused,
                                     bucket_mb=0.005, copies=copies, anchored=False)  # the state says it is
        resumed.load_state_dict(state)
        again = []
        for k in (2, 3):
            _drift(named, topo.replica_index, k)
            resumed.average(step=k)
            again.append(_digest([t for _, t in named]) + _digest(resumed.anchors) + _digest(resumed.residuals))
        out[mode, "resumed"] = again
        # exchange on snapshots gives what average gives, and leaves the live tensors alone
        live = [(n, t.clone()) for n, t in _start_tensors()]
        twin = [(n, t.clone()) for n, t in _start_tensors()]
        a = CompressedAverager(live, topology=topo, mode=mode, route=route, block=BLOCK, kernel=fused, anchored=True)
        b = CompressedAverager(twin, topology=topo, mode=mode, route=route, block=BLOCK, kernel=fused, anchored=True)
        _drift(live, topo.replica_index, 0)
        _drift(twin, topo.replica_index, 0)
        snapshots = [t.clone() for _, t in twin]
        outputs = [torch.empty_like(t) for _, t in twin]
        a.average(step=0)
        b.exchange(snapshots, outputs)
        assert all(torch.equal(x, y) for (_, x), y in zip(live, outputs)), "exchange differs from average"
        assert all(torch.equal(x, y) for (_, x), y in zip(twin, snapshots)), "exchange wrote its sources"
        assert all(torch.equal(x, y) for x, y in zip(a.anchors, b.anchors))
        # overlapped rounds: reduce_corrections leaves a' - x_s in a flat fp32 snapshot
        third = [(n, t.clone()) for n, t in _start_tensors()]
        c = CompressedAverager(third, topology=topo, mode=mode, route=route, block=BLOCK, kernel=fused,
                               bucket_mb=0.005, anchored=True)
        _drift(third, topo.replica_index, 0)
        snapshot = torch.cat([t.reshape(-1).float() for _, t in third])
        x_s = snapshot.clone()
        scratch = [torch.empty(max(w.numel for w in c.wire)) for _ in range(2)]
        c.reduce_corrections(snapshot, 1 << 20, scratch, RoundStats())
        # a' of the blocking round (fp32 there; a bf16 tensor got bf16(a'): compare its rounding)
        offset = 0
        for (name, t), (_, full) in zip(third, live):
            got = snapshot[offset: offset + t.numel()] + x_s[offset: offset + t.numel()]
            want = full.reshape(-1).float()
            if t.dtype == torch.float32:
                got_c = snapshot[offset: offset + t.numel()]
                assert torch.equal(got_c, want - x_s[offset: offset + t.numel()]), f"{name}: not a' - x_s"
            else:
                assert (got.to(t.dtype).float() - want).abs().le(torch.finfo(t.dtype).eps * want.abs()).all(), name
            offset += t.numel()
        assert all(torch.equal(x, y) for x, y in zip(a.anchors, c.anchors))
    return out


@pytest.mark.parametrize("replicas,route", [(2, "gather"), (3, "gather"), (3, "owner")])
def test_compressed_rounds(replicas, route):
    results = run_ranks(_rounds_worker, replicas, route, timeout_s=240)
    first = results[0]
    for mode in ("bf16", "int8"):
        runs = first[mode, "history"]
        width = 2 * len(_start_tensors())  # tensors and anchors; residuals are each replica's own
        for res in results[1:]:  # every replica holds the same bits after every round
            for key, history in runs.items():
                assert [h[:width] for h in res[mode, "history"][key]] == [h[:width] for h in history]
        (ref_key, ref), (fused_key, fused) = runs.items()
        # and the same bits with either back-end and bucket size
        assert [h[:width] for h in ref] == [h[:width] for h in fused], f"{mode}: {ref_key} vs {fused_key}"
        for res in results:
            assert res[mode, "history"][fused_key][2:] == res[mode, "resumed"], f"{mode}: resume differs"
        # bytes: a row per bucket of 1 (gather) or R (owner) segments, each 2n (bf16) or n + 4 * blocks
        # (int8) padded to 16
        numel = sum(t.numel() for _, t in _start_tensors())
        blocks = sum(-(-t.numel() // BLOCK) for _, t in _start_tensors())
        fp32_ring = 2 * (replicas - 1) / replicas * 4 * numel  # what an exact round's ring all-reduce sends
        for bucket_mb in (64.0, 0.005):
            sent, per_round, link, buckets = first[mode, "bytes", bucket_mb]
            segments = [s for b in buckets for s in b]
            assert all(len(b) == (replicas if route == "owner" else 1) for b in buckets)
            assert sum(n for n, _, _ in segments) == numel and sum(k for _, k, _ in segments) == (
                blocks if mode == "int8" else 0)
            for n, k, row in segments:
                assert row == -(-(2 * n if mode == "bf16" else n + 4 * k) // 16) * 16
            assert sent == per_round == sum(row for _, _, row in segments)
            if route == "gather":
                assert link == (replicas - 1) * per_round
            else:  # all_to_all of the other segments, then a ring all-gather of the widest
                assert link == sum(sum(r for _, _, r in b) - b[0][2] + (replicas - 1) * max(r for _, _, r in b)
                                   for b in buckets)
            ratio = link / fp32_ring
            target = (0.5 if mode == "bf16" else 0.25) * (replicas / 2 if route == "gather" else 1)
            assert target <= ratio < target * 1.1 + 0.01, (bucket_mb, ratio)
        sent = first[mode, "bytes", 64.0][0]
        if route == "gather":
            assert sent == -(-(2 * numel if mode == "bf16" else numel + 4 * blocks) // 16) * 16
        # anchors (tensor dtype) + fp32 residuals + two buckets of R rows
        anchors = sum(t.numel() * t.element_size() for _, t in _start_tensors())
        assert first[mode, "peak"] >= anchors + 4 * numel


def _drift_worker(rank, world, rounds, route):
    from qsr_ds.sync.compress import CompressedAverager
    from qsr_ds.topology import Topology

    topo = Topology.create(1)
    gen = torch.Generator().manual_seed(7)
    start = torch.randn(1000, generator=gen) * 0.1
    # replica r moves by m + u_r every round: a small mean move m, a large spread u_r (sum 0)
    m = torch.randn(1000, generator=gen) * 1e-5
    u = [torch.randn(1000, generator=gen) * 1e-2 for _ in range(world - 1)]
    steps = [m + v for v in u] + [m - sum(u)]
    mean_step = torch.stack([s.double() for s in steps]).mean(0)
    out = {}
    for mode in ("bf16", "int8"):
        for feedback in (True, False):
            x = start.clone()
            avg = CompressedAverager([("x", x)], topology=topo, mode=mode, block=BLOCK, error_feedback=feedback,
                                     route=route, anchored=True)
            for k in range(rounds):
                x.add_(steps[topo.replica_index])
                avg.average(step=k)
            exact = start.double() + rounds * mean_step
            err = (x.double() - exact).abs()
            # fp32 rounding of the local step and of a + mean, every round
            slack = 3 * rounds * EPS32 * float(exact.abs().max() + 0.1)
            if feedback:
                # what the last round left behind: the replicas' mean residual and the owners' residuals
                last = float(_gather(avg.residuals[0], world).double().mean(0).abs().max())
                owners = torch.tensor([max((float(f.abs().max()) for f in avg.owner_residuals
                                            if f is not None and f.numel()), default=0.0)])
                dist.all_reduce(owners, op=dist.ReduceOp.MAX)
                out[mode, feedback] = (float(err.max()), last + float(owners), slack)
            else:
                out[mode, feedback] = (float(err.max()), None, slack)
    return out


@pytest.mark.parametrize("replicas,route", [(2, "gather"), (3, "owner")])
def test_error_feedback_keeps_1000_rounds_bounded(replicas, route):
    rounds = 1000
    results = run_ranks(_drift_worker, replicas, rounds, route, timeout_s=240)
    for res in results:
        for mode in ("bf16", "int8"):
            err_fb, last_residual, slack = res[mode, True]
            err_plain, _, _ = res[mode, False]
            # with feedback the error is what the last round left in the residuals (plus fp32 rounding)
            assert err_fb <= last_residual + slack, (mode, err_fb, last_residual, slack)
            # without it, the rounding of every round adds up
            assert err_plain > 20 * (last_residual + slack), (mode, err_plain, err_fb)
    assert all(res == results[0] for res in results)


def _edge_worker(rank, world):
    from qsr_ds.sync.compress import CompressedAverager
    from qsr_ds.topology import Topology

    topo = Topology.create(1)
    # owner route, a bucket smaller than R blocks: replica 1 owns an empty segment
    small = [("x", torch.arange(10.0))]
    owner = CompressedAverager(small, topology=topo, mode="int8", block=BLOCK, route="owner", anchored=True)
    assert [s.numel for s in owner.wire[0].segments] == [10, 0]
    small[0][1].add_(rank)
    owner.average(step=0)
    mean = small[0][1].clone()
    # not anchored (built between rounds, replicas differ): the first round is the exact fp32 mean
    from qsr_ds.sync.averager import ReplicaAverager

    gen = torch.Generator().manual_seed(rank)
    start = [("w", torch.randn(300, generator=gen)), ("h", torch.randn(70, generator=gen).to(torch.bfloat16))]
    exact = [(n, t.clone()) for n, t in start]
    late = CompressedAverager(start, topology=topo, mode="int8", block=BLOCK, anchored=False)
    stats = late.average(step=0)
    ReplicaAverager(exact, topology=topo, kernel="torch").average(step=0)
    assert all(torch.equal(t, e) for (_, t), (_, e) in zip(start, exact)), "first round is not the exact mean"
    assert all(torch.equal(t.reshape(-1), a) for (_, t), a in zip(start, late.anchors))
    assert stats.bytes == 4 * 370 and late.anchored
    start[0][1].add_(0.01 * (rank + 1))
    late.average(step=1)
    digest = [t.float().sum().item() for _, t in start]
    # composed with an overlapped round (qsr_ds/sync/overlap.py): x = a' + this replica's own later steps
    from qsr_ds.sync.overlap import OverlappedRound

    x0 = torch.randn(3000, generator=torch.Generator().manual_seed(5))
    live, twin = [("x", x0.clone())], [("x", x0.clone())]
    overlapped = CompressedAverager(live, topology=topo, mode="int8", block=BLOCK, anchored=True, bucket_mb=0.005)
    blocking = CompressedAverager(twin, topology=topo, mode="int8", block=BLOCK, anchored=True, bucket_mb=0.005)
    for t in (live[0][1], twin[0][1]):
        t.add_(torch.randn(3000, generator=torch.Generator().manual_seed(rank)) * 0.01)
    rounds = OverlappedRound(overlapped, overlap_steps=1, segment_mb=0.005)
    rounds.start(0)
    live[0][1].add_(1e-3 * (rank + 1))  # a local step while the round is in flight
    rounds.finish(1)
    blocking.average(step=0)
    want = twin[0][1] + 1e-3 * (rank + 1)
    assert torch.equal(overlapped.anchors[0], blocking.anchors[0])
    assert (live[0][1] - want).abs().max() <= 4 * EPS32 * want.abs().max()  # x + (a' - x_s) vs a' + step
    errors = []
    named = [("x", torch.ones(10))]
    for kwargs in ({"mode": "fp8"}, {"block": 0}, {"block": 5000}, {"route": "ring"}):
        try:
            CompressedAverager(named, topology=topo, **kwargs)
        except ValueError as err:
            errors.append(str(err))
    avg = CompressedAverager(named, topology=topo, mode="int8", anchored=False)
    state = avg.state_dict()
    anchors_before = avg.anchors[0].clone()
    for bad in ({**state, "mode": "bf16"}, {**state, "anchors": {}},
                {**state, "residuals": {"x": torch.zeros(11)}}):
        try:
            avg.load_state_dict(bad)
        except ValueError as err:
            errors.append(str(err))
    assert torch.equal(avg.anchors[0], anchors_before)
    return errors, mean, digest


def test_empty_owner_segment_late_averager_and_bad_arguments():
    (errors, mean, digest), (_, other, other_digest) = run_ranks(_edge_worker, 2)
    assert torch.equal(mean, other)
    assert digest == other_digest  # the late averager's anchors agree: the next rounds stay identical
    # d = rank: replica 1's q is exact, so only the owner's re-quantization of 0.5 can round
    assert (mean - (torch.arange(10.0) + 0.5)).abs().max() <= INT8_STEP * 0.5 / 127
    assert errors[0] == "compress mode 'fp8' is not one of bf16, int8"
    assert "block must be an integer in [1, 4096], got 0" in errors[1]
    assert "got 5000" in errors[2]
    assert errors[3] == "compress route 'ring' is not one of gather, owner"
    assert "has mode='bf16', this averager 'int8'" in errors[4]
    assert "anchors missing ['x']" in errors[5]
    assert "residuals['x'] is (11,)" in errors[6]
