"""LocalOptimizer: Local AdamW with QSR on real gloo ranks."""
import math

import pytest
import torch
from torch import nn

from qsr_ds import LocalOptimizer, SyncSchedule, Topology
from tests.ranks import run_ranks

pytestmark = pytest.mark.timeout(180)

STEPS, WARMUP, PEAK = 60, 6, 0.05


def lr_at(step):
    if step < WARMUP:
        return PEAK * (step + 1) / WARMUP
    return 1e-4 + 0.5 * (PEAK - 1e-4) * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


SCHEDULE = SyncSchedule(rule="qsr", h_base=2, alpha=0.12, warmup_steps=WARMUP, total_steps=STEPS)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
        self.unused = nn.Linear(3, 3)  # never gets a gradient: must still be averaged

    def forward(self, x):
        return self.body(x)


def batch(step, replica, shard):
    gen = torch.Generator().manual_seed(hash((step, replica, shard)) % 2**31)
    x = torch.randn(16, 8, generator=gen)
    return x, x.sum(1, keepdim=True).sin()


def make(topo, average):
    torch.manual_seed(0)
    model = Net()
    # replicas start apart on purpose, so an average is visible
    with torch.no_grad():
        model.unused.weight.add_(topo.replica_index)
    opt = torch.optim.AdamW(model.parameters(), lr=lr_at(0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s) / lr_at(0))
    if topo.ranks_per_replica > 1:
        model = nn.parallel.DistributedDataParallel(model, process_group=topo.shard_group, find_unused_parameters=True)
    local = LocalOptimizer(opt, model, schedule=SCHEDULE, topology=topo, lr_scheduler=sched, average=average, bucket_mb=0.001)
    return model, local


def train(model, local, topo, start, stop, events):
    for step in range(start, stop):
        x, y = batch(step, topo.replica_index, topo.shard_rank)
        nn.functional.mse_loss(model(x), y).backward()
        local.step()
        local.zero_grad()
        if local.last_round is not None:
            events.append(local.tracker.completed_steps)


def digest(model):
    return [t.detach().clone() for t in model.state_dict().values()]


def _worker(rank, world, ranks_per_replica, average, stop_at):
    topo = Topology.create(ranks_per_replica)
    model, local = make(topo, average)
    events = []
    if stop_at is None:
        train(model, local, topo, 0, STEPS, events)
    else:
        train(model, local, topo, 0, stop_at, events)
        saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "local": local.state_dict()}
        assert local.tracker.completed_steps < local.tracker.next_boundary, "stop must be mid-round"
        h, boundary = local.tracker.current_h, local.tracker.next_boundary
        model, local = make(topo, average)  # a fresh process would build the same objects
        model.load_state_dict(saved["model"])
        local.load_state_dict(saved["local"])
        local.lr_scheduler.last_epoch = stop_at
        for g in local.optimizer.param_groups:
            g["lr"] = lr_at(stop_at)
        assert (local.tracker.current_h, local.tracker.next_boundary) == (h, boundary)
        train(model, local, topo, stop_at, STEPS, events)
    params = [p.detach().clone() for p in model.parameters()]
    return {"events": events, "rounds": local.rounds, "state": digest(model), "params": params,
            "bytes": local.averager.totals.bytes, "replica": topo.replica_index}


def planned():
    return SCHEDULE.boundaries(lr_at)


@pytest.mark.parametrize("ranks_per_replica", [1, 2])
def test_local_adamw_with_qsr_rounds_and_identical_replicas(ranks_per_replica):
    results = run_ranks(_worker, 4, ranks_per_replica, ("params", "buffers", "exp_avg", "exp_avg_sq"), None)
    want = planned()
    assert 1 < len(want) < STEPS // SCHEDULE.h_base, "the schedule should grow H in this test"
    for rank, res in enumerate(results):
        assert res["events"] == want and res["rounds"] == len(want)
        # same shard rank: everything equal, BatchNorm statistics included; inside a replica
        # DDP keeps parameters equal, while each shard rank's running stats follow its own batches
        peer = results[rank % ranks_per_replica]
        for a, b in zip(res["state"], peer["state"]):
            if a.is_floating_point():
                assert torch.equal(a, b)
        for a, b in zip(res["params"], results[0]["params"]):
            assert torch.equal(a, b)
    # the never-updated layer started apart on each replica and was averaged too
    assert results[0]["bytes"] > 0


def test_resume_mid_round_is_exact():
    full = run_ranks(_worker, 2, 1, ("params",), None)
    stop_at = next(b for b in planned() if b > 20) - 1
    resumed = run_ranks(_worker, 2, 1, ("params",), stop_at)
    for a, b in zip(full, resumed):
        assert a["events"] == b["events"]
        assert all(torch.equal(x, y) for x, y in zip(a["state"], b["state"]))
