"""FSDPQSR takes the round keywords LocalOptimizer takes, and qsr_ds.fingerprint reads FSDP2 replicas.

2 gloo ranks = 2 replicas x 1 shard, so FSDP2 holds whole tensors as DTensors.
"""
import pytest
import torch
import torch.distributed as dist

from test_fsdp import PEAK, SCHEDULE, STEPS, batch, build, shape
from tests.ranks import run_ranks

pytestmark = pytest.mark.timeout(240)


def _worker(rank, world):
    import qsr_ds
    from qsr_ds.config import QSRConfig, QSRConfigError
    from qsr_ds.fsdp import FSDPQSR, init_mesh
    from qsr_ds.sync.layout import params_digest

    mesh = init_mesh(1)
    out = {}
    model = build(mesh, seed=rank, mp=False)  # replicas seeded apart: the start-up broadcast evens them
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK)
    before = [p.full_tensor().clone() for p in model.parameters()]
    try:
        FSDPQSR(model, opt, mesh=mesh, qsr=SCHEDULE, compress="int4")
    except QSRConfigError as err:
        out["bad_keyword"] = str(err)
    out["untouched_by_refusal"] = all(torch.equal(a, p.full_tensor()) for a, p in zip(before, model.parameters()))
    config = QSRConfig(h_base=2, alpha=0.02, warmup_steps=4, total_steps=STEPS, overlap_steps=1, compress="bf16")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, shape)
    with FSDPQSR(model, opt, mesh=mesh, qsr=config, lr_scheduler=sched, compress="int8", bucket_mb=0.0001) as qsr:
        out["settings"] = (qsr.settings.overlap_steps, qsr.settings.compress, qsr.settings.bucket_mb)
        overlapped = 0
        for step in range(STEPS):
            x, y = batch(step, 0, rank)
            ((model(x).float() - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
            overlapped += qsr.round_in_flight
        out["rounds"], out["overlapped_steps"] = qsr.rounds, overlapped
        out["fingerprint"] = qsr_ds.fingerprint(model)
        out["same_as_hook"] = qsr_ds.fingerprint(qsr) == out["fingerprint"]
        out["same_as_digest"] = params_digest((n, p.full_tensor()) for n, p in model.named_parameters()) == out["fingerprint"]
    try:
        qsr_ds.fingerprint(object())
    except TypeError as err:
        out["not_a_model"] = str(err)
    dist.barrier()
    return out


def test_round_keywords_replace_the_config_and_replicas_end_with_one_fingerprint():
    results = run_ranks(_worker, 2, timeout_s=200)
    for r in results:
        assert "qsr.compress" in r["bad_keyword"] and "int4" in r["bad_keyword"], r["bad_keyword"]
        assert r["untouched_by_refusal"]
        assert r["settings"] == (1, "int8", 0.0001)  # the config's overlap_steps, the keywords' compress
        assert r["rounds"] == results[0]["rounds"] > 2
        assert r["overlapped_steps"] > 0  # some rounds really ran behind training
        assert r["same_as_hook"] and r["same_as_digest"]
        assert "got object" in r["not_a_model"]
    assert results[0]["fingerprint"] == results[1]["fingerprint"]  # training ends on an average
