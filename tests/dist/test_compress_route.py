"""The "compress_route" setting from the "qsr" section to the wire, on R = 3 gloo replicas.

At R = 3 the gather route puts (R - 1) = 2 quantized rows on each rank's link per round, the
owner route about 2 (R - 1) / R = 4/3; both leave the replicas bitwise identical after
every round and stay close to exact fp32 rounds.
"""
import pytest
import torch
from torch import nn

from qsr_ds import LocalOptimizer, SyncSchedule, Topology
from qsr_ds.config import from_dict
from tests.ranks import run_ranks

pytestmark = pytest.mark.timeout(180)

STEPS = 12
SCHEDULE = SyncSchedule(rule="constant", h_base=2, alpha=0.0, warmup_steps=0, total_steps=STEPS)


def _worker(rank, world, compress, route):
    topo = Topology.create(1, timeout_s=30)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    settings = from_dict({"compress": compress, "compress_route": route, "total_steps": STEPS}).settings()
    local = LocalOptimizer(opt, model, schedule=SCHEDULE, topology=topo, compress=settings.compress,
                           compress_route=settings.compress_route)
    after_rounds = []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(8, 64, generator=gen)
        nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin()).backward()
        local.step()
        local.zero_grad()
        if local.last_round is not None:
            after_rounds.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
    averager = local.averager
    return {"after_rounds": after_rounds, "route": getattr(averager, "route", None),
            "link_bytes": getattr(averager, "link_bytes_per_round", None), "rounds": local.rounds}


@pytest.fixture(scope="module")
def runs():
    return {(c, r): run_ranks(_worker, 3, c, r) for c, r in (("int8", "gather"), ("int8", "owner"), (None, "gather"))}


def test_the_route_reaches_the_averager_and_sends_fewer_bytes_at_three_replicas(runs):
    gather, owner = runs["int8", "gather"][0], runs["int8", "owner"][0]
    assert (gather["route"], owner["route"]) == ("gather", "owner")
    assert gather["rounds"] == owner["rounds"] == STEPS // 2
    # 2 rows against 4/3 of a row (plus segment padding, small at these 4,225 elements)
    assert 0.6 < owner["link_bytes"] / gather["link_bytes"] < 0.75


@pytest.mark.parametrize("route", ["gather", "owner"])
def test_replicas_identical_after_every_round_and_close_to_exact(runs, route):
    ranks = runs["int8", route]
    for i, mine in enumerate(ranks[0]["after_rounds"]):
        for other in ranks[1:]:
            assert torch.equal(mine, other["after_rounds"][i]), f"{route}: replicas differ after round {i + 1}"
    exact = runs[None, "gather"][0]["after_rounds"][-1]
    assert (ranks[0]["after_rounds"][-1] - exact).abs().max() < 0.05
