"""Overlapped and compressed rounds on the real engines: DeepSpeed ZeRO 1-3 and FSDP2,
4 ranks = 2 replicas x 2 (one spawned world each).

The schedule of tests/dist/test_deepspeed.py: 8 steps, boundaries after 2, 6, 8 (H = 2, 4, 2).
With overlap_steps = 1 the rounds closing at 2 and 6 run behind the next step and are applied
after steps 3 and 7; with tau = 2 only the round at 2 overlaps (the next H of the one at 6 is 2,
not more than tau) and the last round always blocks. In every case: the planned boundaries,
replicas bitwise identical at the end, and a checkpoint taken with a round in flight (or with
compression anchors and residuals) resumes to the same final fingerprint.
"""
import os

import pytest

from tests.ranks import run_ranks
from test_deepspeed import BOUNDARIES, ENV, STEPS, build, ds_config, train

pytestmark = pytest.mark.timeout(420)

DS_CASES = {  # name: (stage, bf16, overlap_steps, compress, save after this many steps)
    "zero2_fp32_tau1_int8": (2, False, 1, "int8", 2),
    "zero3_bf16_tau2": (3, True, 2, None, 3),
    "zero1_bf16_bf16": (1, True, 0, "bf16", 4),
}


def _ds_worker(rank, world, root):
    out = {}
    for name, (stage, bf16, tau, compress, cut) in DS_CASES.items():
        cfg = ds_config(stage, bf16, ranks_per_replica=2)
        cfg["qsr"].update(overlap_steps=tau, compress=compress)
        engine = build(cfg, qsr=True)
        topo = engine.qsr.topology
        where = dict(replica=topo.replica_index, shard=topo.shard_rank)
        first = train(engine, 0, cut, **where)
        in_flight = engine.qsr.round_in_flight
        engine.save_checkpoint(os.path.join(root, name), tag="cut")
        full = first + train(engine, cut, STEPS, **where)
        resumed = build(cfg, qsr=True)
        resumed.load_checkpoint(os.path.join(root, name))
        rest = train(resumed, cut, STEPS, **where)
        out[name] = {"rounds": engine.qsr.rounds, "final": full[-1]["replica_fp32"], "resumed": rest[-1]["replica_fp32"],
                     "in_flight_at_save": in_flight, "boundaries": [e["step"] for e in full if e["boundary"]]}
    return out


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory):
    return run_ranks(_ds_worker, 4, str(tmp_path_factory.mktemp("modes")), env=ENV, timeout_s=400)


@pytest.mark.parametrize("case", list(DS_CASES))
def test_deepspeed_rounds_modes(ds_runs, case):
    stage, bf16, tau, compress, cut = DS_CASES[case]
    runs = [r[case] for r in ds_runs]
    assert {r["rounds"] for r in runs} == {len(BOUNDARIES)}
    assert len({r["final"] for r in runs}) == 1, "replicas must end identical"
    assert all(r["resumed"] == r["final"] for r in runs), "resume is not exact"
    if tau:
        applied = {1: [3, 7], 2: [3 + 1]}[tau]  # the steps whose last_round is an overlapped round's finish
        starts = {1: [2, 6], 2: [2]}[tau]
        assert runs[0]["boundaries"] == sorted(set(BOUNDARIES + applied) | set(starts))
        assert all(r["in_flight_at_save"] == (cut in range(starts[0], starts[0] + tau)) for r in runs)
    else:
        assert runs[0]["boundaries"] == BOUNDARIES


def _fsdp_worker(rank, world):
    import torch

    from qsr_ds.config import QSRConfig
    from qsr_ds.fsdp import FSDPQSR, init_mesh
    from test_fsdp import SCHEDULE, batch, build, full_params, shape

    out = {}
    for tau, compress in ((1, "bf16"), (2, "int8")):
        config = QSRConfig(**{k: getattr(SCHEDULE, k) for k in ("rule", "h_base", "alpha", "warmup_steps",
                                                                  "total_steps")},
                           ranks_per_replica=2, overlap_steps=tau, compress=compress, bucket_mb=0.001)
        mesh = init_mesh(2)
        model = build(mesh, 0, mp=True)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, shape)
        qsr = FSDPQSR(model, opt, mesh=mesh, qsr=config, lr_scheduler=sched)
        kinds = []
        for step in range(SCHEDULE.total_steps):
            x, y = batch(step, 0, rank)
            ((model(x).float() - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
            if qsr.last_round is not None:
                kinds.append(type(qsr.last_round).__name__)
        qsr.close()
        out[(tau, compress)] = {"final": full_params(model), "rounds": qsr.rounds, "kinds": kinds}
    return out


def test_fsdp_overlapped_and_compressed_rounds_end_on_identical_replicas():
    from test_fsdp import SCHEDULE, lr_at

    results = run_ranks(_fsdp_worker, 4, timeout_s=400)
    planned = len(SCHEDULE.boundaries(lr_at))
    for key in results[0]:
        assert {r[key]["rounds"] for r in results} == {planned}
        assert len({r[key]["final"] for r in results}) == 1, f"{key}: replicas must end identical"
        assert "OverlapStats" in results[0][key]["kinds"], f"{key}: no round overlapped"
