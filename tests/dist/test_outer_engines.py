"""The outer optimizer through the DeepSpeed engine (ZeRO 1-3, fp32 / bf16, 2 replicas x 2 ranks) and FSDP2.

The arithmetic is checked against a float64 reference in test_outer.py (LocalOptimizer, the same
core); here: each engine's rounds take the outer step (the weights after a round differ from plain
averaging's, sgd lr 1 momentum 0 is plain averaging to the bit), replicas are identical after every
round, and a DeepSpeed checkpoint written mid-round resumes to the uninterrupted fingerprint.
"""
import pytest
import torch
import torch.nn.functional as F

from test_deepspeed import ENV, STEPS, batch, build, ds_config
from tests.ranks import run_ranks

pytestmark = pytest.mark.timeout(300)

NESTEROV = {"optimizer": "nesterov", "lr": 0.7, "momentum": 0.9}
AVERAGING = {"optimizer": "sgd", "lr": 1.0, "momentum": 0.0}


def config(stage, bf16, outer):
    cfg = ds_config(stage, bf16, ranks_per_replica=2)
    if outer is not None:
        cfg["qsr"]["outer"] = outer
    return cfg


def run(engine, replica, shard, start, stop):
    """The replica's fingerprint after every round in start..stop-1."""
    import qsr_ds

    dtype = next(engine.module.parameters()).dtype
    rounds = []
    for step in range(start, stop):
        x, y = batch(step, replica, shard)
        engine.backward(F.mse_loss(engine(x.to(dtype)).float(), y))
        engine.step()
        if engine.qsr.last_round is not None:
            rounds.append((step + 1, qsr_ds.fingerprint(engine)))
    return rounds


def _deepspeed_worker(rank, world, ckpt):
    import torch.distributed as dist

    replica, shard = rank // 2, rank % 2
    out = {}
    for stage, bf16 in ((1, True), (2, False), (3, True)):
        for name, outer in (("nesterov", NESTEROV), ("averaging", AVERAGING), ("plain", None)):
            engine = build(config(stage, bf16, outer), qsr=True, seed=1 + replica)  # replicas start apart
            out[(stage, bf16, name)] = run(engine, replica, shard, 0, STEPS)
            out[(stage, bf16, name, "bytes")] = engine.qsr.outer.bytes if engine.qsr.outer is not None else 0
    # a checkpoint in the middle of a round holds theta and the momentum buffer: resume continues exactly
    engine = build(config(2, False, NESTEROV), qsr=True, seed=1 + replica)
    run(engine, replica, shard, 0, 5)
    engine.save_checkpoint(ckpt)
    engine = build(config(2, False, NESTEROV), qsr=True, seed=7)
    engine.load_checkpoint(ckpt)
    out["resumed"] = run(engine, replica, shard, 5, STEPS)
    dist.barrier()
    return out


def test_deepspeed_rounds_take_the_outer_step_on_every_zero_stage(tmp_path):
    results = run_ranks(_deepspeed_worker, 4, str(tmp_path / "ckpt"), env=ENV, timeout_s=280)
    for stage, bf16 in ((1, True), (2, False), (3, True)):
        nesterov, averaging, plain = (results[0][(stage, bf16, n)] for n in ("nesterov", "averaging", "plain"))
        assert len(nesterov) >= 3 and [s for s, _ in nesterov] == [s for s, _ in plain]
        for r in results:  # identical replicas after every round
            assert r[(stage, bf16, "nesterov")] == nesterov and r[(stage, bf16, "plain")] == plain
            assert r[(stage, bf16, "nesterov", "bytes")] > 0
        assert averaging == plain, f"ZeRO {stage} bf16={bf16}: sgd lr 1 momentum 0 is not plain averaging"
        assert all(a != b for (_, a), (_, b) in zip(nesterov, plain)), f"ZeRO {stage}: no outer step taken"
    uninterrupted = results[0][(2, False, "nesterov")]
    for r in results:
        assert r["resumed"] == [(s, f) for s, f in uninterrupted if s > 5]


def _fsdp_worker(rank, world, outer):
    from test_fsdp import PEAK, SCHEDULE, build as build_fsdp, shape

    import qsr_ds
    from qsr_ds.fsdp import FSDPQSR, init_mesh

    mesh = init_mesh(2)
    model = build_fsdp(mesh, seed=rank // 2, mp=False)
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, shape)
    rounds = []
    with FSDPQSR(model, opt, mesh=mesh, qsr=SCHEDULE, lr_scheduler=sched, outer=outer) as qsr:
        for step in range(12):
            gen = torch.Generator().manual_seed(100 * step + rank)
            x = torch.randn(8, 6, generator=gen)
            ((model(x) - x.sum(1, keepdim=True).sin()) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
            if qsr.last_round is not None:
                rounds.append(qsr_ds.fingerprint(model))
    return rounds


def test_fsdp2_rounds_take_the_outer_step():
    nesterov = run_ranks(_fsdp_worker, 4, NESTEROV, timeout_s=200)
    plain = run_ranks(_fsdp_worker, 4, None, timeout_s=200)
    assert len(nesterov[0]) >= 3
    assert all(r == nesterov[0] for r in nesterov) and all(r == plain[0] for r in plain)
    assert all(a != b for a, b in zip(nesterov[0], plain[0]))
