"""The one sync core under every engine: the drift items it fixed, pinned on gloo ranks.

- LocalOptimizer rebuilds its averager when the tensors change (optimizer state that appears
  after the first round is averaged too);
- LocalOptimizer's flat parameter buffer is what its rounds all-reduce (in place, no packing);
- LocalOptimizer's state_dict carries the LR scheduler it steps;
- FSDP2's rounds honour qsr.timeout_s (a dead replica fails the round in bounded time);
- FSDP2 checkpoints keep every rank's ``extra``;
- the pre-check's success path is two fixed-size all-reduces: no all-gather over the world;
- replicas seeded differently start from replica 0's weights (FSDP2 meta-device build with a
  bf16 MixedPrecisionPolicy, and LocalOptimizer); other model code fails by name on every rank.
"""
import os
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from qsr_ds import LocalOptimizer, SyncSchedule, Topology
from tests.ranks import run_ranks

pytestmark = pytest.mark.timeout(240)

SCHEDULE = SyncSchedule(rule="constant", h_base=2, total_steps=8)


class TwoLayers(nn.Module):
    def __init__(self, hidden=12):
        super().__init__()
        self.first = nn.Linear(6, hidden)
        self.late = nn.Linear(hidden, 1)  # used only from step 3 on: its Adam state appears after round 1
        self.use_late = False

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return self.late(h) if self.use_late else h.sum(1, keepdim=True)


def _batch(step, rank):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, 6, generator=gen)
    return x, x.sum(1, keepdim=True).cos()


def _digest(tensors):
    return [t.detach().clone() for t in tensors]


def _local_worker(rank, world, tmp):
    topo = Topology.create(1, timeout_s=30)
    out = {}
    # per-rank seeds: the replicas must still start equal (replica 0's weights and buffers)
    torch.manual_seed(100 + rank)
    model = TwoLayers()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    local = LocalOptimizer(opt, model, schedule=SCHEDULE, topology=topo, lr_scheduler=sched,
                           average=("params", "exp_avg", "exp_avg_sq"))
    out["start"] = _digest(model.parameters())
    for step in range(SCHEDULE.total_steps):
        model.use_late = step >= 3
        x, y = _batch(step, rank)
        nn.functional.mse_loss(model(x), y).backward()
        local.step()
        local.zero_grad()
        if local.last_round is not None:
            out.setdefault("rounds", []).append((step + 1, local.last_round.in_place, local.last_round.buckets))
    out["late_state"] = _digest([opt.state[model.late.weight]["exp_avg"], opt.state[model.late.weight]["exp_avg_sq"]])
    out["params"] = _digest(model.parameters())
    out["flat_is_averaged"] = local.averager.in_place[0].data_ptr() == local.flat_params.data_ptr()
    # the scheduler it steps is in its state_dict: a fresh wrapper resumes at the same LR
    state = local.state_dict()
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.02)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    local2 = LocalOptimizer(opt2, model, schedule=SCHEDULE, topology=topo, lr_scheduler=sched2)
    local2.load_state_dict(state)
    out["resumed_lr"] = (sched2.last_epoch, opt2.param_groups[0]["lr"], sched.last_epoch, opt.param_groups[0]["lr"])
    # other model code on replica 1: refused at construction, by name, on every rank
    torch.manual_seed(0)
    other = TwoLayers(hidden=12 if rank == 0 else 13)
    try:
        LocalOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), other, schedule=SCHEDULE, topology=topo)
        out["other_model"] = None
    except RuntimeError as err:
        out["other_model"] = f"{type(err).__name__}: {err}"
    return out


def test_local_optimizer_core_behaviour(tmp_path):
    results = run_ranks(_local_worker, 2, str(tmp_path))
    a, b = results
    assert all(torch.equal(x, y) for x, y in zip(a["start"], b["start"])), "replicas start from replica 0's weights"
    # rounds after steps 2, 4, 6, 8; each all-reduces the flat parameter buffer in place
    assert [r[0] for r in a["rounds"]] == [2, 4, 6, 8]
    assert all(in_place >= 1 for _, in_place, _ in a["rounds"]) and a["flat_is_averaged"]
    # the late layer's Adam state appeared after round 1 and is averaged from then on
    assert all(torch.equal(x, y) for x, y in zip(a["late_state"], b["late_state"]))
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    for res in results:
        sched_epoch, lr, want_epoch, want_lr = res["resumed_lr"]
        assert (sched_epoch, lr) == (want_epoch, want_lr) == (8, 0.02 / 9)
        assert res["other_model"].startswith("ReplicaMismatchError: replica 1 (rank 1) has a different model"), res
        assert "first.weight" in res["other_model"] or "model parameter #0" in res["other_model"]


def _precheck_worker(rank, world):
    """Two replicas of two ranks: a round's success path sends no all-gather; a NaN still names its replica."""
    from qsr_ds.sync.averager import ReplicaAverager, ReplicaMismatchError

    topo = Topology.create(2, timeout_s=30)
    tensors = [(f"t{i}", torch.full((5 + i,), float(rank % 2 + i))) for i in range(3)]
    averager = ReplicaAverager(tensors, topology=topo, kernel="torch")
    real_all_gather, real_object = dist.all_gather, dist.all_gather_object

    def refuse(*args, **kwargs):
        raise AssertionError("the pre-check's success path must not all-gather over the world")

    dist.all_gather = dist.all_gather_object = refuse
    try:
        stats = averager.average(step=1, lr=0.5 if topo.replica_index == 0 else 0.25)
    finally:
        dist.all_gather, dist.all_gather_object = real_all_gather, real_object
    if rank == 3:
        tensors[1][1][2] = float("nan")
    try:
        averager.average(step=2)
        message = None
    except ReplicaMismatchError as err:
        message = str(err)
    return stats.lr, [t.tolist() for _, t in tensors], message


def test_precheck_is_fixed_size_and_agrees_on_replica0s_lr():
    results = run_ranks(_precheck_worker, 4)
    for lr, _, message in results:
        assert lr == 0.5  # replica 0's, on every rank of both replicas
        assert message is not None and "replica 1 (rank 3) holds NaN or Inf" in message
    assert "'t1'" in results[1][2] and "'t1'" in results[3][2]
    # ranks 0 and 2 hold the same shard in both replicas: averaged (0 and 0 -> 0, shard 1: 1 and 1)
    assert results[0][1] == results[2][1] and results[1][1][0] == [1.0] * 5


def _refused_round_worker(rank, world, flatten):
    """An Inf on replica 1 at a boundary: the round is refused on both ranks before anything is written,
    and the schedule does not move (a blocking round agrees on NaN/Inf after its first bucket is sent)."""
    from qsr_ds.sync.averager import ReplicaMismatchError

    topo = Topology.create(1, timeout_s=30)
    torch.manual_seed(0)
    model = TwoLayers()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    local = LocalOptimizer(opt, model, schedule=SCHEDULE, topology=topo, bucket_mb=0.0001, flatten_params=flatten)
    for step in range(2):  # step 2 closes the first round
        x, y = _batch(step, rank)  # each replica its own data: after two steps they differ everywhere
        nn.functional.mse_loss(model(x), y).backward()
        if step == 1 and rank == 1:
            with torch.no_grad():
                model.late.bias.fill_(float("inf"))  # the last tensor (unused by the forward, so AdamW skips it)
        tracker = local.tracker.state_dict()
        try:
            local.step()
        except ReplicaMismatchError as err:
            return {"error": str(err), "tracker_unchanged": local.tracker.state_dict() == tracker,
                    "rounds": local.totals.rounds, "adam_steps": opt.state[model.first.weight]["step"].item(),
                    "params": _digest(model.parameters()), "layout": (len(local.averager.in_place),
                                                                      len(local.averager.buckets))}
        local.zero_grad()
    return {"error": None}


@pytest.mark.parametrize("flatten", [True, False])
def test_a_refused_round_writes_nothing_and_leaves_the_schedule(flatten):
    results = run_ranks(_refused_round_worker, 2, flatten)
    for res in results:
        assert res["error"] is not None and "replica 1 (rank 1) holds NaN or Inf" in res["error"], res
        assert res["tracker_unchanged"] and res["rounds"] == 0 and res["adam_steps"] == 2
    # flat: one in-place buffer. Per tensor (26-element buckets): first.weight in place, and the
    # ramp gives first.bias, late.weight, late.bias a bucket each, the first sent before the verdict
    assert results[0]["layout"] == ((1, 0) if flatten else (1, 3))
    assert "late.bias" in results[1]["error"] or flatten, results[1]["error"]
    mine, other = results[0]["params"], results[1]["params"]
    assert all(torch.isfinite(p).all() for p in mine), "replica 0 received replica 1's Inf"
    for a, b in zip(mine[:2], other[:2]):  # first.weight, first.bias: trained apart, not averaged
        assert not torch.equal(a, b)


def _fsdp_worker(rank, world, tmp, mode):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from qsr_ds.fsdp import checkpoint as fsdp_checkpoint
    from qsr_ds.config import QSRConfig
    from qsr_ds.fsdp import FSDPQSR, init_mesh, shard_model

    per_replica = 2 if mode == "mesh" else 1
    config = QSRConfig(rule="constant", h_base=2, total_steps=8, ranks_per_replica=per_replica, timeout_s=3)
    mesh = init_mesh(per_replica, timeout_s=config.timeout_s)
    torch.manual_seed(7 + rank)  # a common slip: per-rank seeds
    with torch.device("meta"):
        model = TwoLayers(hidden=9)
    shard_model(model, mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for module in (model.first, model.late):
            module.reset_parameters()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    qsr = FSDPQSR(model, opt, mesh=mesh, qsr=config)
    start = [p.full_tensor().clone() for p in model.parameters()]
    if mode == "dead":
        x, y = _batch(0, rank)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if rank == 1:
            os._exit(0)  # replica 1 dies before the round that closes after step 2
        began = time.perf_counter()
        try:
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        except RuntimeError as err:
            return type(err).__name__, str(err)[:200], time.perf_counter() - began
        return "no error", "", time.perf_counter() - began
    path = os.path.join(tmp, "ckpt")
    fsdp_checkpoint.save(path, qsr, extra={"rank": torch.tensor(rank)})
    loaded = fsdp_checkpoint.load(path, qsr, extra={"rank": torch.tensor(-1)})
    return start, int(loaded["rank"])


def test_fsdp_replicas_start_equal_and_checkpoints_keep_every_ranks_extra(tmp_path):
    results = run_ranks(_fsdp_worker, 4, str(tmp_path), "mesh")
    for rank, (start, extra_rank) in enumerate(results):
        assert extra_rank == rank
        assert all(torch.equal(a, b) for a, b in zip(start, results[0][0])), f"rank {rank} started apart"


def test_fsdp_dead_replica_fails_the_round_within_the_timeout(tmp_path):
    results = run_ranks(_fsdp_worker, 2, str(tmp_path), "dead", timeout_s=90, missing_ok=True)
    assert results[1] is None
    name, message, seconds = results[0]
    assert name == "ReplicaCommError" and "sync round 1" in message, (name, message)
    assert seconds < 30
