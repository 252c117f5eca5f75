"""Overlapped and compressed rounds through the sync core, as a user runs them (LocalOptimizer,
FSDP2), on 2 gloo ranks = 2 replicas.

- tau = 0 and no compression are today's blocking rounds, bit for bit;
- with overlap_steps = tau the rounds are the planned ones, the round whose next H is at most
  tau (and the last round) blocks, and training ends with bitwise identical replicas;
- an overlapped round applies exactly x + (mean(x_s) - x_s) tau steps after its boundary
  (checked against a float64 reference built from both replicas' logged tensors);
- compressed rounds (bf16, int8) leave replicas bitwise identical after every round;
- a checkpoint taken with a round in flight (or with compression anchors) resumes exactly.
"""
import pytest
import torch
from torch import nn

from qsr_ds import LocalOptimizer, SyncSchedule, Topology
from tests.ranks import run_ranks

pytestmark = pytest.mark.timeout(240)

STEPS, WARMUP = 24, 4
SCHEDULE = SyncSchedule(rule="qsr", h_base=2, alpha=0.02, warmup_steps=WARMUP, total_steps=STEPS)


def lr_at(step):
    return 0.01 * (step + 1) / WARMUP if step < WARMUP else 0.01 * (1 - (step - WARMUP) / (STEPS - WARMUP)) + 1e-4


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def _run(rank, tau, compress, *, stop=STEPS, state=None):
    """Train steps [start, stop); returns ({step: (params after the optimizer, after the round)}, round log,
    wrapper, model)."""
    topo = Topology.create(1, timeout_s=30)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    local = LocalOptimizer(opt, model, schedule=SCHEDULE, topology=topo, lr_scheduler=sched, bucket_mb=0.0001,
                           overlap_steps=tau, compress=compress)
    after_optimizer = {}  # params right after the torch optimizer's step, before any round of that step
    opt.register_step_post_hook(lambda *_: after_optimizer.update(x=_params(model)))
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        local.load_state_dict(state["local"])
        start = local.tracker.completed_steps
    log, snapshots = [], {}
    for step in range(start, stop):
        gen = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(6, 5, generator=gen)
        nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin()).backward()
        local.step()
        local.zero_grad()
        snapshots[step + 1] = (after_optimizer["x"], _params(model))
        stats = local.last_round
        if stats is not None:
            log.append((step + 1, type(stats).__name__, getattr(stats, "apply_step", None)))
    return snapshots, log, local, model


def _worker(rank, world, tau, compress):
    snapshots, log, local, model = _run(rank, tau, compress)
    out = {"log": log, "final": snapshots[STEPS][1], "rounds": local.rounds, "memory": local.round_memory_bytes,
           "steps": {s: v[1] for s, v in snapshots.items()}, "pre": {s: v[0] for s, v in snapshots.items()}}
    # resume from a checkpoint taken mid-flight / mid-round, exactly
    cut = next((s for s, kind, _ in log if kind == "OverlapStats"), 9)
    _, _, half, half_model = _run(rank, tau, compress, stop=cut)
    state = {"model": half_model.state_dict(), "local": half.state_dict()}
    resumed, _, _, _ = _run(rank, tau, compress, state=state)
    out["resumed_final"] = resumed[STEPS][1]
    out["cut"] = cut
    return out


CASES = {"blocking": (0, None), "tau1": (1, None), "tau2": (2, None), "bf16": (0, "bf16"), "int8": (0, "int8"),
         "tau1_int8": (1, "int8")}


class _Runs(dict):
    def __missing__(self, name):  # each case's 2-rank world runs once, when a test first needs it
        self[name] = run_ranks(_worker, 2, *CASES[name])
        return self[name]


@pytest.fixture(scope="module")
def runs():
    return _Runs()


def _planned():
    return SCHEDULE.boundaries(lr_at)


@pytest.mark.parametrize("case", ["blocking", "tau1", "tau2", "bf16", "int8", "tau1_int8"])
def test_rounds_as_planned_and_replicas_identical_at_the_end(runs, case):
    a, b = runs[case]
    assert a["rounds"] == b["rounds"] == len(_planned())
    assert torch.equal(a["final"], b["final"]), "training must end on identical replicas"
    assert torch.equal(a["resumed_final"], a["final"]) and torch.equal(b["resumed_final"], b["final"]), \
        f"resume from step {a['cut']} is not exact"


@pytest.mark.parametrize("case", ["tau1", "tau2"])
def test_overlapped_round_applies_the_boundary_average_plus_local_steps(runs, case):
    tau = {"tau1": 1, "tau2": 2}[case]
    a, b = runs[case]
    # an overlapped round is logged where it starts (its boundary) and where it is applied
    overlapped = [(s, apply) for s, kind, apply in a["log"] if kind == "OverlapStats" and apply is not None and s != apply]
    assert overlapped, "some rounds must overlap"
    planned = _planned()
    for boundary, apply in overlapped:
        assert apply == boundary + tau and boundary in planned
        nxt = planned[planned.index(boundary) + 1]
        assert nxt - boundary > tau, "a round shorter than tau + 1 must block"
    for boundary, apply in overlapped:
        x_s = [r["steps"][boundary].double() for r in (a, b)]
        mean = (x_s[0] + x_s[1]) / 2
        for r, own in zip((a, b), x_s):
            local_steps = r["pre"][apply].double()  # after the apply step's optimizer step, before the correction
            want = mean + (local_steps - own)
            assert torch.allclose(r["steps"][apply].double(), want, rtol=0, atol=1e-6), (boundary, apply)
        assert not torch.equal(a["steps"][apply], b["steps"][apply]), "each replica keeps its own tau local steps"


def test_blocking_settings_are_todays_rounds_bit_for_bit(runs):
    for r_block, r_tau1 in zip(runs["blocking"], runs["tau1"]):
        first_overlap = next(s for s, kind, _ in r_tau1["log"] if kind == "OverlapStats")
        for s in range(1, first_overlap):  # the boundary itself differs: the overlapped round leaves x as it is
            assert torch.equal(r_block["steps"][s], r_tau1["steps"][s])


@pytest.mark.parametrize("case", ["bf16", "int8"])
def test_compressed_rounds_leave_replicas_identical_after_every_round(runs, case):
    a, b = runs[case]
    for step, _, _ in a["log"]:
        assert torch.equal(a["steps"][step], b["steps"][step]), f"replicas differ after the round at step {step}"
    exact = runs["blocking"][0]["final"]
    assert (a["final"] - exact).abs().max() < 0.05, "compressed training strays far from exact rounds"


def test_round_memory_is_the_scratch_the_snapshot_and_the_anchors(runs):
    numel = 5 * 7 + 7 + 7 * 1 + 1  # the model's fp32 elements, all averaged on this one-rank replica
    bucket = int(0.0001 * 2**20) // 4  # bucket_mb=0.0001 in elements
    memory = {case: runs[case][0]["memory"] for case in CASES}
    # LocalOptimizer's parameters are one flat fp32 buffer, all-reduced in place: no scratch at all
    assert memory["blocking"] == 0 and runs["blocking"][0]["rounds"] > 0
    for case in ("tau1", "tau2"):  # one fp32 snapshot of every averaged element, plus scratch
        assert 4 * numel < memory[case] <= 4 * numel + 2 * 4 * max(bucket, numel), case
    for case in ("bf16", "int8"):  # an fp32 anchor and an fp32 residual per element, plus wire buffers
        assert memory[case] > 8 * numel, case
    assert memory["tau1_int8"] > 12 * numel, "overlap and compression: snapshot + anchor + residual"
    assert all(runs[case][0]["memory"] == runs[case][1]["memory"] for case in CASES), "same shapes, same bytes"
