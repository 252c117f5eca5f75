"""The outer optimizer (QSR-DiLoCo) through LocalOptimizer on 2 and 3 gloo replicas.

Every round is checked against a float64 reference of the outer step computed from what the
replicas held before it (recorded by an optimizer post-step hook), replicas must be bitwise
equal after it, sgd lr 1 momentum 0 must be plain averaging to the bit, and a state_dict()
resumed mid-round must continue bitwise as the uninterrupted run.
"""
import pytest
import torch
from torch import nn

from qsr_ds import LocalOptimizer, SyncSchedule, Topology
from tests.ranks import run_ranks

pytestmark = pytest.mark.timeout(240)

STEPS = 16
SCHEDULE = SyncSchedule(rule="qsr", h_base=3, alpha=0.08, warmup_steps=2, total_steps=STEPS)
NESTEROV = {"optimizer": "nesterov", "lr": 0.7, "momentum": 0.9}
HEAVY_BALL = {"optimizer": "sgd", "lr": 0.6, "momentum": 0.5}
PLAIN_SGD = {"optimizer": "sgd", "lr": 0.8, "momentum": 0.0}
AVERAGING = {"optimizer": "sgd", "lr": 1.0, "momentum": 0.0}


def lr_at(step):
    return 0.05 * (1 - step / (STEPS + 1))


def flat(model):
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def make(topo, outer, flatten):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    with torch.no_grad():  # replicas start apart: the start-up broadcast must even them, theta with them
        model[0].bias.add_(topo.replica_index)
    opt = torch.optim.AdamW(model.parameters(), lr=lr_at(0), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s) / lr_at(0))
    local = LocalOptimizer(opt, model, schedule=SCHEDULE, topology=topo, lr_scheduler=sched, outer=outer,
                           flatten_params=flatten, average=("params", "exp_avg"), bucket_mb=0.0001)
    return model, opt, local


def train(model, opt, local, topo, start, stop):
    """Per step: (the replica's x before any round, x after the step, whether a round ran)."""
    record, before = [], {}
    hook = opt.register_step_post_hook(lambda *_: before.update(x=flat(model)))
    for step in range(start, stop):
        gen = torch.Generator().manual_seed(1000 * step + topo.replica_index)
        x = torch.randn(12, 5, generator=gen)
        nn.functional.mse_loss(model(x), x[:, :2].sin()).backward()
        local.step()
        local.zero_grad()
        record.append((before["x"], flat(model), local.last_round is not None))
    hook.remove()
    return record


def _worker(rank, world, outer, flatten):
    from qsr_ds.config import QSRConfigError

    topo = Topology.create(1)
    out = {}
    for bad in ({"optimizer": "adam"}, {"optimizer": "nesterov", "lr": 0.7, "momentum": 1.0}):
        try:
            make(topo, bad, flatten)
        except QSRConfigError as err:
            out.setdefault("errors", []).append(str(err))
    model, opt, local = make(topo, outer, flatten)
    out["start"] = flat(model)
    out["record"] = train(model, opt, local, topo, 0, STEPS)
    out["outer_bytes"] = local.outer.bytes if local.outer is not None else 0
    # resume mid-round from a state_dict into a freshly built model and optimizer
    model, opt, local = make(topo, outer, flatten)
    train(model, opt, local, topo, 0, 7)
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "local": local.state_dict()}
    model, opt, local = make(topo, outer, flatten)
    model.load_state_dict(saved["model"])
    local.load_state_dict(saved["local"])
    out["resumed"] = train(model, opt, local, topo, 7, STEPS)[-1][1]
    return out


def reference_rounds(results, outer):
    """The float64 outer step at each round, from the replicas' x before it and theta after the last."""
    lr, mu, nesterov = outer["lr"], outer["momentum"], outer["optimizer"] == "nesterov"
    theta, buf, checked = results[0]["start"].double(), None, 0
    for step, (_, after, rounded) in enumerate(results[0]["record"]):
        if not rounded:
            continue
        mean = torch.stack([r["record"][step][0].double() for r in results]).mean(0)
        delta = theta - mean
        if mu:
            buf = delta.clone() if buf is None else mu * buf + delta
            delta = delta + mu * buf if nesterov else buf
        expected = theta - lr * delta
        assert torch.allclose(after.double(), expected, rtol=1e-5, atol=1e-6), (step, (after - expected).abs().max())
        theta, checked = after.double(), checked + 1
    return checked


@pytest.mark.parametrize("replicas,outer,flatten", [
    (2, NESTEROV, True), (3, NESTEROV, False), (2, HEAVY_BALL, False), (3, PLAIN_SGD, True)])
def test_outer_step_matches_a_float64_reference_and_resume_is_exact(replicas, outer, flatten):
    results = run_ranks(_worker, replicas, outer, flatten, timeout_s=200)
    for r in results:
        assert len(r["errors"]) == 2 and "qsr.outer.optimizer" in r["errors"][0] and "outer.momentum" in r["errors"][1]
        for step, (_, after, _) in enumerate(r["record"]):
            if results[0]["record"][step][2]:
                assert torch.equal(after, results[0]["record"][step][1]), f"replicas differ after the round at {step}"
        assert torch.equal(r["resumed"], r["record"][-1][1]), "resumed run differs from the uninterrupted one"
        n = results[0]["start"].numel()
        assert r["outer_bytes"] == 4 * n * (2 if outer["momentum"] else 1)  # theta (+ the momentum buffer)
    assert reference_rounds(results, outer) >= 3


def test_sgd_with_lr_1_and_no_momentum_is_plain_averaging_bit_for_bit():
    with_outer = run_ranks(_worker, 2, AVERAGING, True, timeout_s=200)
    without = run_ranks(_worker, 2, None, True, timeout_s=200)
    for a, b in zip(with_outer, without):
        assert all(torch.equal(x[1], y[1]) for x, y in zip(a["record"], b["record"]))
        assert sum(x[2] for x in a["record"]) >= 3
