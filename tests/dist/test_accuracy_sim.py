"""benchmarks/accuracy.py simulates R replicas in one process; check it against the real path.

The same tiny config runs (a) through the benchmark's in-process simulation and (b) through
qsr_ds.LocalOptimizer on R gloo ranks (S = 1, one replica per rank, torch reference
kernels). Same initialization, data streams, LR floats and schedule, so the round
boundaries must be identical. With R = 2 the final parameters must be bitwise equal:
an average is x0/2 + x1/2, the same float in either order. With R = 4 they agree to
1e-6 of the largest parameter, not bitwise: the simulation sums the 4 pre-scaled addends
in replica order, gloo's ring all-reduce in an order that depends on the element's chunk
(((x[c+2] + x[c+3]) + x[c+1]) + x[c] for chunk c here), and floating-point addition is not
associative.
"""
import dataclasses

import pytest
import torch
from torch import nn

from benchmarks import accuracy as acc
from qsr_ds import LocalOptimizer, Topology
from qsr_ds.testing import run_ranks

pytestmark = pytest.mark.timeout(120)

CFG = dataclasses.replace(acc.Config(**acc.SMOKE), steps=40, warmup=4, replicas=4, seeds=(0,))
SEED = 3


def _rank(rank, world, cfg, method, seed):
    topo = Topology.create(1)
    train, _ = acc.split(acc.corpus())
    model, opt = acc.build(cfg, seed)
    local = LocalOptimizer(opt, model, schedule=acc.schedule_for(method, cfg), topology=topo,
                           lr_scheduler=acc.SetLR(opt, acc.lr_fn(cfg)), kernel="torch")
    stream = acc.Stream(train, cfg, seed, topo.replica_index)
    events = []
    for _ in range(cfg.steps):
        x, y = stream.next()
        nn.functional.cross_entropy(model(x), y).backward()
        local.step()
        local.zero_grad()
        if local.last_round is not None:
            events.append(local.tracker.completed_steps)
    return {"events": events, "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()])}


@pytest.mark.parametrize("replicas", [2, 4])
def test_simulated_replicas_match_local_optimizer_on_gloo_ranks(replicas):
    cfg = dataclasses.replace(CFG, replicas=replicas)
    method = "qsr"
    schedule = acc.schedule_for(method, cfg)
    planned = schedule.boundaries(acc.lr_fn(cfg))
    hs = [h for _, h in schedule.rounds(acc.lr_fn(cfg))]
    assert len(set(hs)) > 2 and len(planned) > 3, f"the tiny QSR schedule should grow H over several rounds: {hs}"

    train, val = acc.split(acc.corpus())
    sim = acc.run(method, SEED, cfg, train, val, curves=False)
    ranks = run_ranks(_rank, replicas, cfg, method, SEED)

    assert sim["boundaries"] == planned
    for res in ranks:
        assert res["events"] == planned
        assert torch.equal(res["params"], ranks[0]["params"]), "replicas must be bitwise equal after an average"
    real, mine = ranks[0]["params"], sim["params"]
    init = torch.cat([p.detach().reshape(-1) for p in acc.build(cfg, SEED)[0].parameters()])
    assert (mine - init).abs().max().item() > 1e-3, "the simulation should have trained"
    if replicas == 2:
        # x0/2 + x1/2 is the same float in either order: everything else is the same arithmetic
        assert torch.equal(real, mine)
    else:
        # 4 addends: association order differs (ring chunks), so about an ulp per average
        scale = real.abs().max().item()
        err = (real - mine).abs().max().item()
        assert err <= 1e-6 * scale, f"max |difference| {err:.3g} vs max |param| {scale:.3g}"
