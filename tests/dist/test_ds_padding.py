"""ZeRO-3 pads the last partition of a parameter whose size S does not divide; that padding is
uninitialised memory. A NaN bit pattern there must never refuse a round, while a NaN in a
real element still refuses it on every rank with nothing written (4 ranks = 2 replicas x 2).
"""
import pytest
import torch
import torch.nn.functional as F

from tests.ranks import run_ranks

pytestmark = pytest.mark.timeout(300)

ENV = {"DS_ACCELERATOR": "cpu"}


def _odd_model():
    torch.manual_seed(0)  # 7x5 + 5 + 5x3 + 3 elements: none divides by S = 2
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _padding_ranges(opt, shard_rank):
    """(sub-group, start, stop) of every padded range of this rank's flat fp32 shards."""
    out = []
    for i, params in enumerate(opt.fp16_groups):
        offset = 0
        for p in params:
            part = p.ds_tensor.ds_numel
            real = max(0, min(p.ds_numel - shard_rank * part, part))
            if real < part:
                out.append((i, offset + real, offset + part))
            offset += part
    return out


def _worker(rank, world):
    import deepspeed.utils.groups as groups

    import qsr_ds
    from qsr_ds.sync.averager import ReplicaMismatchError

    groups.mpu = None
    cfg = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9, "zero_optimization": {"stage": 3},
           "qsr": {"rule": "constant", "h_base": 2, "total_steps": 4, "ranks_per_replica": 2,
                   "average": ["params", "exp_avg", "exp_avg_sq"]}}
    model = _odd_model()
    engine, *_ = qsr_ds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01), config=cfg)
    opt, topo = engine.optimizer, engine.qsr.topology
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(2, 7, generator=gen), torch.randn(2, 3, generator=gen)
    engine.backward(F.mse_loss(engine(x), y))
    engine.step()
    padded = _padding_ranges(opt, topo.shard_rank)
    # poison the padding of the fp32 shards and of the Adam moments partitioned like them
    for i, start, stop in padded:
        shard = opt.fp32_partitioned_groups_flat[i]
        for t in [shard] + [v for v in engine.basic_optimizer.state[shard].values() if torch.is_tensor(v) and v.dim()]:
            t.data[start:stop] = float("nan")
    engine.qsr.sync(step=1)  # must not refuse: padding is not model state
    real = qsr_ds.fingerprint(engine)
    # a NaN in a real element on replica 1 still refuses, on every rank, nothing written
    if topo.replica_index == 1 and topo.shard_rank == 0:
        opt.fp32_partitioned_groups_flat[0].data[0] = float("nan")
    before = [t.clone() for t in opt.fp32_partitioned_groups_flat]
    try:
        engine.qsr.sync(step=1)
        refused = None
    except ReplicaMismatchError as err:
        refused = str(err)
    unchanged = all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())
                    for a, b in zip(before, opt.fp32_partitioned_groups_flat))
    return {"padded": len(padded), "real": real, "refused": refused, "unchanged": unchanged}


def test_padding_never_refuses_a_round_but_a_real_nan_does():
    results = run_ranks(_worker, 4, env=ENV, timeout_s=240)
    assert sum(r["padded"] for r in results) > 0, "the model must have padded partitions"
    assert len({r["real"] for r in results}) == 1, "replicas must hold the same real parameters after the round"
    for r in results:
        assert r["refused"] is not None and "replica 1 (rank 2) holds NaN or Inf" in r["refused"], r["refused"]
        assert r["unchanged"]
