"""A step skipped on some replicas (NaN/Inf gradients) after warm-up, in every engine and dtype.

DeepSpeed skips an optimizer step, and its LR scheduler step, whenever the gradients hold
NaN/Inf: under ZeRO 1-3 and the bf16 optimizers in every dtype, not only on fp16 overflow.
A torch.amp.GradScaler skips optimizer.step() the same way. A skipped step still counts as
a step, so every replica agrees on when to average; and since a skipped step leaves that
replica's scheduler one step behind, H is decided from replica 0's LR at every round. The
skipped replica averages with the others at the next boundary and training goes on.

The schedule (16 steps, 3 warm-up steps, LR decaying linearly to 0 after the warm-up, QSR
h_base 2, alpha 0.028) has rounds (0,2) (2,2) (4,2) (6,2) (8,3) (11,5): after the warm-up H
depends on the LR, so a replica that took H from its own, lagging, LR would average at
other steps (checked below from the logged LRs, so the tests cannot pass by accident).

Spawned 4-rank worlds (2 replicas x 2 ranks): one builds the DeepSpeed engines one after
another; LocalOptimizer and FSDP2 under a GradScaler get a world each (a case whose replicas
disagree leaves ranks waiting in other collectives).
"""
from __future__ import annotations

import functools
import hashlib

import pytest
import torch
import torch.nn.functional as F

from qsr_ds.planning.lr import WarmupDecayLR
from qsr_ds.schedule import SyncSchedule
from tests.ranks import run_ranks

STEPS, WARMUP = 16, 3
QSR = {"rule": "qsr", "h_base": 2, "alpha": 0.028, "warmup_steps": WARMUP, "total_steps": STEPS}
SCHEDULE = SyncSchedule(**QSR)
LR_PARAMS = {"total_num_steps": STEPS + 1, "warmup_num_steps": WARMUP, "warmup_type": "linear",
             "warmup_min_lr": 0.005, "warmup_max_lr": 0.02}
SCHEDULER = {"type": "WarmupDecayLR", "params": LR_PARAMS}
LR_AT = WarmupDecayLR(**LR_PARAMS)  # the LR 0-based step s uses when no step is skipped
NOMINAL = [2, 4, 6, 8, 11, 16]
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}

# name: (ZeRO stage, bf16, gradient accumulation, extra DeepSpeed config, {replica: 0-based step it skips})
DS_CASES = {
    "zero2_fp32": (2, False, 1, {}, {1: 9}),  # mid-round
    # ZeRO 1 + bf16 with fp32 gradient accumulation is DeepSpeed's BF16_Optimizer
    "zero1_bf16_optimizer": (1, True, 1, {"data_types": {"grad_accum_dtype": "fp32"}}, {1: 7}),  # closes a round
    "zero3_bf16_gas2": (3, True, 2, {}, {1: 9}),
    "zero3_fp32": (3, False, 1, {}, {1: 5}),
    # both replicas skip, at different steps: H follows replica 0's (lagging) LR
    "zero0_bf16_both_skip": (0, True, 1, {}, {0: 4, 1: 9}),
}


def planned_from(lrs: list[float]) -> list[int]:
    """Boundaries QSR plans when step s runs with lrs[s] (computed without any engine)."""
    return SCHEDULE.boundaries(lambda s: lrs[s])


def test_the_schedule_makes_h_depend_on_the_lr_after_warm_up():
    assert planned_from([LR_AT(s) for s in range(STEPS)]) == NOMINAL
    rounds = SCHEDULE.rounds(LR_AT)
    assert any(start >= WARMUP and h > QSR["h_base"] for start, h in rounds)
    # a replica one scheduler step behind from step 9 on would plan other rounds
    lagging = [LR_AT(s) if s <= 9 else LR_AT(s - 1) for s in range(STEPS)]
    assert planned_from(lagging) != NOMINAL


# ---------------------------------------------------------------- DeepSpeed ZeRO 0-3


def _ds_case(stage, bf16, gas, extra, skips):
    from test_deepspeed import build, ds_config, train

    cfg = ds_config(stage, bf16, ranks_per_replica=2, gas=gas)
    cfg.update(extra, scheduler=SCHEDULER, qsr=dict(QSR, ranks_per_replica=2, average=["params"], timeout_s=60))
    engine = build(cfg, qsr=True)  # resets deepspeed.utils.groups.mpu first
    topo = engine.qsr.topology
    skip_at = skips.get(topo.replica_index)
    lrs, log = [], []
    for step in range(STEPS):
        lrs.append(float(engine.get_lr()[0]))
        log += train(engine, step, step + 1, replica=topo.replica_index, shard=topo.shard_rank,
                     overflow_at=skip_at)
    return {"lrs": lrs, "boundaries": [e["step"] for e in log if e["boundary"]],
            "fp32": [e["replica_fp32"] for e in log], "skipped": engine.skipped_steps,
            "global_steps": engine.global_steps, "completed": engine.qsr.tracker.completed_steps,
            "rounds": engine.qsr.rounds, "optimizer": type(engine.optimizer).__name__}


def _ds_worker(rank, world):
    out = {}
    for name, (stage, bf16, gas, extra, skips) in DS_CASES.items():
        try:
            out[name] = _ds_case(stage, bf16, gas, extra, skips)
        except Exception as err:  # noqa: BLE001 - each case reports its own failure; the world goes on
            out[name] = {"error": f"{type(err).__name__}: {err}"}
    return out


@pytest.fixture(scope="module")
def ds_results():
    return run_ranks(_ds_worker, 4, timeout_s=420, env=ENV)


@pytest.mark.timeout(480)
@pytest.mark.parametrize("case", list(DS_CASES))
def test_deepspeed_step_skipped_on_one_replica_keeps_replicas_agreeing(ds_results, case):
    *_, skips = DS_CASES[case]
    runs = [res[case] for res in ds_results]  # ranks 0, 1 = replica 0; 2, 3 = replica 1
    lr0 = runs[0].get("lrs")
    planned = planned_from(lr0) if lr0 else None  # from replica 0's LRs, as logged before each step
    assert [run.get("error", run.get("boundaries")) for run in runs] == [planned] * 4
    if 0 not in skips:
        assert planned == NOMINAL and lr0 == [LR_AT(s) for s in range(STEPS)]
    # the premise: the skipped step held replica 1's scheduler back (DeepSpeed does not step it on a
    # skip), and replica 1's own LR would have planned other rounds
    lr1, skip1 = runs[2]["lrs"], skips[1]
    assert lr1[skip1 + 1] == lr1[skip1] and lr1 != lr0, (lr0, lr1)
    assert planned_from(lr1) != planned, "the skip must matter for H"
    if case == "zero1_bf16_optimizer":
        assert runs[0]["optimizer"] == "BF16_Optimizer"
    for rank, run in enumerate(runs):
        assert run["skipped"] == int(rank // 2 in skips), (rank, run["skipped"])  # DeepSpeed skipped them
        # a skipped step still counts as a step: training goes on to total_steps
        assert run["global_steps"] == run["completed"] == STEPS and run["rounds"] == len(planned)
    for i, step in enumerate(range(1, STEPS + 1)):
        held = {run["fp32"][i] for run in runs}
        if step in planned:  # every replica, the skipped one too, holds the same averaged fp32 weights
            assert len(held) == 1, f"replicas differ after the boundary at step {step}"
        else:  # between boundaries: one model per replica, trained on its own data
            assert len(held) == 2, f"step {step}: {len(held)} different models"
    assert len({run["fp32"][-1] for run in runs}) == 1  # the run ends on bitwise identical replicas


# ---------------------------------------------------------------- LocalOptimizer and FSDP2 with a GradScaler


LOCAL_SKIP, FSDP_SKIP = 9, 7  # 0-based steps replica 1 skips (7 closes the round (6, 2))


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _batch(step, replica, shard):
    gen = torch.Generator().manual_seed(1000 * step + 10 * replica + shard)
    x = torch.randn(8, 6, generator=gen)
    return x, x.sum(1, keepdim=True).sin()


def _amp_loop(model, optimizer, scaler, optimizer_step, topo, skip_at, qsr, full_params):
    """A user's GradScaler loop; ``optimizer_step()`` is what the loop calls between backward and update."""
    inner_steps = []
    optimizer.register_step_post_hook(lambda *_: inner_steps.append(1))
    lrs, boundaries, fps = [], [], []
    for step in range(STEPS):
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        x, y = _batch(step, topo.replica_index, topo.shard_rank)
        loss = F.mse_loss(model(x).float(), y)
        if step == skip_at:
            loss = loss * float("inf")  # non-finite gradients on this replica only
        scaler.scale(loss).backward()
        optimizer_step()
        scaler.update()
        optimizer.zero_grad()
        if qsr.last_round is not None:
            boundaries.append(step + 1)
        fps.append(full_params())
    return {"lrs": lrs, "boundaries": boundaries, "fp32": fps, "skipped": STEPS - len(inner_steps),
            "completed": qsr.tracker.completed_steps, "rounds": qsr.rounds, "scale": float(scaler.get_scale())}


def _local_case(topo):
    """LocalOptimizer under a GradScaler, written as an AMP user writes the loop with the wrapper:

        local = LocalOptimizer(optimizer, model, ..., lr_scheduler=sched)
        scaler.scale(loss).backward()
        scaler.step(local)   # LocalOptimizer takes part in the scaler's optimizer contract (torch's
        scaler.update()      # _step_supports_amp_scaling): local.step() runs on every iteration and
        local.zero_grad()    # counts a step the scaler skips for Inf/NaN; optimizer and scheduler skip it

    Without that contract the scaler never calls local.step() on a skip and the replica silently
    counts one step less: it averages one step late and ends a round short.
    """
    from torch import nn

    from qsr_ds.local import LocalOptimizer
    from test_fsdp import Net

    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1.0, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LR_AT)  # lr = 1.0 * LR_AT(step): DeepSpeed's floats
    model = nn.parallel.DistributedDataParallel(net, process_group=topo.shard_group)
    local = LocalOptimizer(opt, model, schedule=SCHEDULE, topology=topo, lr_scheduler=sched)
    scaler = torch.amp.GradScaler("cpu")
    skip_at = LOCAL_SKIP if topo.replica_index == 1 else None
    return _amp_loop(model, opt, scaler, functools.partial(scaler.step, local), topo, skip_at, local,
                     lambda: _digest(net.parameters()))


def _fsdp_case(mesh):
    """FSDP2 (bf16 compute, fp32 masters) under a GradScaler:

        qsr = FSDPQSR(model, optimizer, mesh=mesh, qsr=schedule, lr_scheduler=sched, grad_scaler=scaler)
        scaler.scale(loss).backward()
        scaler.step(optimizer)   # skipped on Inf/NaN: optimizer.step() and so QSR's post-step hook never run
        scaler.update()

    Expected API: FSDPQSR is told the scaler (``grad_scaler=``, as LocalOptimizer is) and counts
    an iteration whose optimizer step the scaler skipped as a step, so the loop stays the plain
    AMP loop. A hook on the optimizer alone cannot see a step that never ran, and a loop cannot
    easily tell that scaler.step() skipped (it returns None either way) to call count_step().
    (FSDP2's DTensor gradients make the scaler's found_inf agree over the replica's shards.)
    """
    from qsr_ds.fsdp import FSDPQSR, topology_of
    from test_fsdp import build

    topo = topology_of(mesh)
    model = build(mesh, 0, mp=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LR_AT)
    scaler = torch.amp.GradScaler("cpu")
    qsr = FSDPQSR(model, opt, mesh=mesh, qsr=SCHEDULE, lr_scheduler=sched, grad_scaler=scaler)
    skip_at = FSDP_SKIP if topo.replica_index == 1 else None
    return _amp_loop(model, opt, scaler, lambda: scaler.step(opt), topo, skip_at, qsr,
                     lambda: _digest([p.full_tensor() for p in model.parameters()]))


def _torch_worker(rank, world, case):
    from qsr_ds.fsdp import init_mesh
    from qsr_ds.topology import Topology

    try:  # a bounded wait if replicas disagree on when to average (then ranks end up in other collectives)
        if case == "local":
            return _local_case(Topology.create(2, timeout_s=60))
        return _fsdp_case(init_mesh(2, device_type="cpu"))
    except Exception as err:  # noqa: BLE001 - reported to the test with the other ranks' outcomes
        return {"error": f"{type(err).__name__}: {err}"}


@pytest.mark.timeout(200)
@pytest.mark.parametrize("case, skip_at", [("local", LOCAL_SKIP), ("fsdp", FSDP_SKIP)])
def test_grad_scaler_step_skipped_on_one_replica_keeps_replicas_agreeing(case, skip_at):
    # one world per case: a case whose replicas disagree leaves ranks waiting in other collectives
    runs = run_ranks(_torch_worker, 4, case, timeout_s=150, env=ENV)
    planned = NOMINAL  # replica 0 never skips: its LRs follow the nominal schedule (checked below)
    assert [run.get("error", run.get("boundaries")) for run in runs] == [planned] * 4
    assert runs[0]["lrs"] == [LR_AT(s) for s in range(STEPS)] and planned_from(runs[0]["lrs"]) == planned
    # as DeepSpeed, the scheduler does not step on a skipped step: replica 1's own LR would plan other rounds
    lr1 = runs[2]["lrs"]
    assert lr1[skip_at + 1] == lr1[skip_at] and planned_from(lr1) != planned, lr1
    # the scaler skipped replica 1's step (its scale halved), replica 0 stepped every time
    assert [run["skipped"] for run in runs] == [0, 0, 1, 1]
    assert runs[2]["scale"] == runs[0]["scale"] / 2
    for run in runs:  # a skipped step still counts as a step: training reaches total_steps
        assert run["completed"] == STEPS and run["rounds"] == len(planned)
    for i, step in enumerate(range(1, STEPS + 1)):
        held = {run["fp32"][i] for run in runs}
        if step in planned:  # the skipped replica averages with the others at the next boundary too
            assert len(held) == 1, f"replicas differ after the boundary at step {step}"
        else:
            assert len(held) == 2, f"step {step}: {len(held)} different models"
    assert len({run["fp32"][-1] for run in runs}) == 1
