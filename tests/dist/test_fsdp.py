"""QSR on FSDP2 (fully_shard over a (replicate, shard) mesh) with 4 spawned gloo ranks.

Each test starts one 4-rank world and runs several checks in it: starting a world costs
more than the tiny trainings inside it.
"""
import hashlib
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from qsr_ds.schedule import SyncSchedule
from tests.ranks import run_ranks

pytestmark = pytest.mark.timeout(240)

STEPS, WARMUP, PEAK = 24, 4, 0.05
SCHEDULE = SyncSchedule(rule="qsr", h_base=2, alpha=0.02, warmup_steps=WARMUP, total_steps=STEPS)


def shape(step):
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.02 + 0.49 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def lr_at(step):
    return PEAK * shape(step)  # the same float LambdaLR computes: base_lr * lambda(step)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.register_buffer("ema", torch.zeros(d))  # a float buffer that differs between replicas

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.ema.mul_(0.9).add_(x.detach().float().mean(0), alpha=0.1)
        return x + torch.tanh(self.lin(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 10)
        self.blocks = nn.ModuleList([Block(10), Block(10)])
        self.head = nn.Linear(10, 1)  # 1 row over 2 shards: one rank holds an empty shard

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def batch(step, micro, rank):
    gen = torch.Generator().manual_seed(hash((step, micro, rank)) % 2**31)
    x = torch.randn(8, 6, generator=gen)
    return x, x.sum(1, keepdim=True).sin()


def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def full_params(model):
    return digest([p.full_tensor() for p in model.parameters()])


def build(mesh, seed, *, mp=True, plain_mesh=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from qsr_ds.fsdp import default_blocks, shard_model

    torch.manual_seed(seed)
    model = Net()
    kwargs = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if mp else {}
    if plain_mesh is not None:  # plain FSDP2 over a 1-D mesh, the same blocks
        for block in default_blocks(model):
            fully_shard(block, mesh=plain_mesh, **kwargs)
        return fully_shard(model, mesh=plain_mesh, **kwargs)
    return shard_model(model, mesh, **kwargs)


def train(mesh, *, seed=0, stop=STEPS, average=("params",), mp=True, accum=2, plain_mesh=None,
          save_to=None, resume_from=None):
    """Train until ``stop`` completed steps; returns (model, qsr, record)."""
    from qsr_ds.fsdp import checkpoint as fsdp_checkpoint
    from qsr_ds.fsdp import FSDPQSR

    model = build(mesh, seed, mp=mp, plain_mesh=plain_mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, shape)
    qsr = None
    if plain_mesh is None:
        qsr = FSDPQSR(model, opt, mesh=mesh, qsr=SCHEDULE, lr_scheduler=sched, average=average, bucket_mb=0.0001)
    start = 0
    if resume_from is not None:
        extra = fsdp_checkpoint.load(resume_from, qsr, extra={"step": torch.tensor(0)})
        start = int(extra["step"])
    record = {"boundaries": [], "at_boundary": [], "mid_round": []}
    rank = dist.get_rank()
    for step in range(start, stop):
        for micro in range(accum):
            model.set_requires_gradient_sync(micro == accum - 1)
            x, y = batch(step, micro, rank)
            ((model(x).float() - y) ** 2).mean().div(accum).backward()
        opt.step()
        if qsr is None:
            sched.step()
        opt.zero_grad()
        if qsr is not None and qsr.last_round is not None:
            record["boundaries"].append(step + 1)
            record["at_boundary"].append(full_params(model))
        else:
            record["mid_round"].append(full_params(model))
    if save_to is not None:
        fsdp_checkpoint.save(save_to, qsr, extra={"step": torch.tensor(stop)})
    return model, qsr, record


def _mesh_2x2_worker(rank, world, ckpt):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from qsr_ds.fsdp import checkpoint as fsdp_checkpoint
    from qsr_ds.sync.checkpoint import QSRCheckpointError
    from qsr_ds.fsdp import FSDPQSR, FSDPSetupError, init_mesh
    from qsr_ds.topology import TopologyError

    out = {"errors": {}}
    mesh = init_mesh(2)
    # wrong sizes and unwrapped models: clear errors, before any training
    for name, make in {
        "S=3": lambda: init_mesh(3),
        "1-D mesh": lambda: FSDPQSR(build(mesh, 0), None, mesh=init_device_mesh("cpu", (4,), mesh_dim_names=("shard",)), qsr=SCHEDULE),
        "not FSDP": lambda: FSDPQSR(Net(), torch.optim.SGD(Net().parameters(), lr=0.1), mesh=mesh, qsr=SCHEDULE),
        "HSDP": lambda: FSDPQSR(fully_shard(Net(), mesh=mesh), None, mesh=mesh, qsr=SCHEDULE),
    }.items():
        try:
            make()
            out["errors"][name] = None
        except (FSDPSetupError, TopologyError) as err:
            out["errors"][name] = str(err)

    average = ("params", "buffers", "exp_avg")
    model, qsr, record = train(mesh, average=average)
    out["record"], out["rounds"], out["final"] = record, qsr.rounds, full_params(model)
    first = model.parameters().__next__()
    out["exp_avg"] = digest([qsr.optimizer.state[first]["exp_avg"].full_tensor()])
    out["exp_avg_sq"] = digest([qsr.optimizer.state[first]["exp_avg_sq"].full_tensor()])
    out["buffers"] = digest([b for b in model.buffers()])
    out["bytes"] = qsr.totals.bytes
    with torch.no_grad():  # the bf16 compute copy FSDP gathers next comes from the averaged fp32 shards
        out["forward"] = digest([model.eval()(batch(0, 0, 0)[0])])
    qsr.close()

    # resume mid-round: stop inside the first round of H >= 3, save, resume in a fresh model
    resume_at = next(s + 1 for s, h in SCHEDULE.rounds(lr_at) if h >= 3)
    _, first_half, _ = train(mesh, stop=resume_at, average=average, save_to=ckpt)
    first_half.close()
    model, resumed, _ = train(mesh, seed=1, average=average, resume_from=ckpt)
    out["resume_at"], out["resumed_final"], out["resumed_rounds"] = resume_at, full_params(model), resumed.rounds
    resumed.close()

    # the checkpoint on a 4 x 1 mesh: refused, saying why
    other = init_mesh(1)
    model = build(other, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK)
    try:
        fsdp_checkpoint.load(ckpt, FSDPQSR(model, opt, mesh=other, qsr=SCHEDULE, average=average))
        out["errors"]["resume 4x1"] = None
    except QSRCheckpointError as err:
        out["errors"]["resume 4x1"] = str(err)
    return out


def test_2x2_mesh_averages_shards_resumes_and_refuses_bad_setups(tmp_path):
    results = run_ranks(_mesh_2x2_worker, 4, str(tmp_path / "ckpt"), timeout_s=200)
    errors = results[0]["errors"]
    assert "not a multiple of ranks_per_replica=3" in errors["S=3"]
    assert "2-D mesh" in errors["1-D mesh"]
    assert "not wrapped by FSDP2" in errors["not FSDP"] and "shard_model" in errors["not FSDP"]
    assert "HSDP" in errors["HSDP"]
    assert "R=2, S=2" in errors["resume 4x1"] and "R=4, S=1" in errors["resume 4x1"]

    planned = SCHEDULE.boundaries(lr_at)
    assert max(h for _, h in SCHEDULE.rounds(lr_at)) >= 3  # H grows as the LR decays
    for res in results:
        assert res["record"]["boundaries"] == planned
        assert res["rounds"] == len(planned)
        assert res["bytes"] > 0
    # after every boundary the four ranks (two replicas) hold the same full parameters
    for i in range(len(planned)):
        assert len({res["record"]["at_boundary"][i] for res in results}) == 1
    # between boundaries the replicas train on their own (same within a replica, different across)
    mid = [res["record"]["mid_round"] for res in results]
    assert mid[0] == mid[1] and mid[2] == mid[3] and mid[0] != mid[2]
    # exp_avg was averaged; exp_avg_sq stays local (differs across replicas)
    assert len({res["exp_avg"] for res in results}) == 1
    assert len({res["forward"] for res in results}) == 1
    assert results[0]["exp_avg_sq"] != results[2]["exp_avg_sq"]
    # buffers are per rank (not sharded): rank k of each replica holds the same average
    assert results[0]["buffers"] == results[2]["buffers"] and results[1]["buffers"] == results[3]["buffers"]
    # resume mid-round is exact
    assert results[0]["resume_at"] not in planned
    for res in results:
        assert res["resumed_final"] == res["final"]
        assert res["resumed_rounds"] == len(planned)


def _degenerate_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    from qsr_ds.fsdp import FSDPQSR, init_mesh

    out = {}
    # R = 1: QSR adds nothing to plain FSDP2 (bit for bit)
    model, qsr, record = train(init_mesh(4))
    out["r1"], out["r1_rounds"], out["r1_bytes"] = full_params(model), qsr.rounds, qsr.totals.bytes
    qsr.close()
    model, _, _ = train(None, plain_mesh=init_device_mesh("cpu", (4,)))
    out["plain"] = full_params(model)
    # S = 1: pure Local SGD, one replica per rank, fp32 params
    model, qsr, record = train(init_mesh(1), mp=False, accum=1)
    out["s1"], out["s1_rounds"], out["s1_record"] = full_params(model), qsr.rounds, record
    qsr.close()
    # QSR steps the scheduler it was given; a loop that steps it too is stopped at once
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, shape)
    qsr = FSDPQSR(model, opt, mesh=qsr.mesh, qsr=SCHEDULE, lr_scheduler=sched)
    opt.step()
    sched.step()
    try:
        opt.step()
        out["double_sched"] = None
    except RuntimeError as err:
        out["double_sched"] = str(err)
    return out


def test_r1_is_plain_fsdp2_and_s1_is_local_sgd():
    results = run_ranks(_degenerate_worker, 4, timeout_s=200)
    planned = SCHEDULE.boundaries(lr_at)
    for res in results:
        assert res["r1"] == res["plain"], "R = 1 must equal plain FSDP2 bit for bit"
        assert res["r1_rounds"] == len(planned) and res["r1_bytes"] == 0
        assert res["s1_rounds"] == len(planned)
        assert res["s1_record"]["boundaries"] == planned
    for i in range(len(planned)):
        assert len({res["s1_record"]["at_boundary"][i] for res in results}) == 1
    assert len({res["s1_record"]["mid_round"][0] for res in results}) == 4  # every rank trains alone
    assert "remove sched.step()" in results[0]["double_sched"]
