"""DeepSpeed paths of a real large-model run, on 2 replicas x 2 ranks (CPU, gloo, one spawned world).

- training_data=: the loader shards over all 4 ranks, exactly as plain DeepSpeed over 4 ranks;
- ZeRO-3 built under qsr_ds.zero_init trains like the same model built normally; a model built
  under plain deepspeed.zero.Init is refused on every rank;
- one-replica checkpoints right after a boundary, with all optimizer state averaged, resume
  every replica exactly; otherwise (or mid-round) every replica writes its own files.

Schedule and helpers as in tests/dist/test_deepspeed.py: boundaries after steps 2, 6, 8.
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import qsr_ds

from tests.ranks import run_ranks

from test_deepspeed import ENV, STEPS, build, ds_config, make_model, train

DATASET = 256
ADAM_STATE = ("params", "exp_avg", "exp_avg_sq")


def collate(samples):
    """A collate_fn the loader must use: a dict instead of DeepSpeed's default list of tensors."""
    return {"ids": torch.stack([s[0] for s in samples])}


def _loader_ids(loader, epoch):
    loader.num_local_io_workers = 0  # no worker processes inside the (daemonic) test ranks
    loader.data_sampler.set_epoch(epoch)
    return [batch["ids"].tolist() for batch in loader]


def _data_part(rank):
    import deepspeed
    import deepspeed.utils.groups as groups

    import qsr_ds

    dataset = torch.utils.data.TensorDataset(torch.arange(DATASET))
    out = {}
    for name, init, cfg in (("qsr", qsr_ds.initialize, ds_config(2, ranks_per_replica=2)),
                            ("plain", deepspeed.initialize, ds_config(2))):  # plain DeepSpeed over all 4 ranks
        groups.mpu = None
        model = make_model()
        _, _, loader, _ = init(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
                               training_data=dataset, collate_fn=collate, config=cfg)
        out[name] = {"len": len(loader), "epochs": [_loader_ids(loader, e) for e in (0, 1)]}
    return out


class TwoLayer(torch.nn.Module):
    """Odd sizes: no parameter divides by S = 2, so ZeRO-3 pads every partition.

    The initial values are exact in bf16 and drawn without the RNG: zero.Init creates the
    parameters in the engine's dtype, where torch's RNG gives other numbers than in fp32 (so
    with plain DeepSpeed too a bf16 model built under zero.Init starts elsewhere).
    """

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(7, 13)
        self.b = torch.nn.Linear(13, 5)
        self.apply(self._init)  # a parent's init over children: zero.Init gathers for it

    @staticmethod
    @torch.no_grad()
    def _init(module):
        if isinstance(module, torch.nn.Linear):
            for t in (module.weight, module.bias):  # python floats: zero.Init makes new tensors in its dtype
                n = t.numel()
                t.copy_(torch.tensor([round(20 * math.sin(0.7 * k + n)) / 64 for k in range(n)]).view(t.shape))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _zero3_run(cfg, how, replica, shard):
    import deepspeed
    import deepspeed.utils.groups as groups
    import torch.distributed as dist

    import qsr_ds

    groups.mpu = None
    torch.manual_seed(0)
    if how == "qsr_ds.zero_init":
        with qsr_ds.zero_init(cfg):
            model = TwoLayer()
    elif how == "deepspeed.zero.Init":
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = TwoLayer()
    else:
        model = TwoLayer()
    try:
        engine, *_ = qsr_ds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.02),
                                       config=cfg)
    except qsr_ds.QSRConfigError as err:
        return {"error": f"{type(err).__name__}: {err}"}
    losses = []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(1000 * step + 10 * replica + shard)
        x, y = torch.randn(2, 7, generator=gen), torch.randn(2, 5, generator=gen)
        loss = F.mse_loss(engine(x.to(next(engine.module.parameters()).dtype)).float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    groups_ok = [p.ds_process_group is engine.qsr.topology.shard_group for p in model.parameters()]
    return {"losses": losses, "rounds": engine.qsr.rounds, "same_group": groups_ok,
            "partition_ranks": [dist.get_process_group_ranks(p.ds_process_group) for p in model.parameters()],
            "fp": qsr_ds.fingerprint(engine)}


def _zero3_part(rank):
    out = {}
    for bf16 in (False, True):  # fp32: small parameters persist between steps; bf16: all partitioned
        cfg = ds_config(3, bf16, ranks_per_replica=2, average=ADAM_STATE)
        for how in ("normal", "qsr_ds.zero_init", "deepspeed.zero.Init"):
            out[(bf16, how)] = _zero3_run(cfg, how, replica=rank // 2, shard=rank % 2)
    return out


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _checkpoint_part(rank, root):
    import torch.distributed as dist

    from qsr_ds.sync.checkpoint import QSRCheckpointError

    out = {}
    for stage, bf16 in ((2, False), (3, True)):
        save = os.path.join(root, f"zero{stage}")
        cfg = ds_config(stage, bf16, ranks_per_replica=2, average=ADAM_STATE)
        engine = build(cfg, qsr=True)
        where = dict(replica=engine.qsr.topology.replica_index, shard=engine.qsr.topology.shard_rank)
        full = train(engine, 0, 2, **where)
        engine.save_checkpoint(save, tag="boundary")  # step 2 closed a round, Adam's moments averaged
        full += train(engine, 2, 4, **where)
        engine.save_checkpoint(save, tag="mid")  # inside the round 2..6
        full += train(engine, 4, STEPS, **where)
        resumed = build(cfg, qsr=True, seed=1 + rank)  # other weights everywhere: the load must replace them all
        resumed.load_checkpoint(save, tag="boundary")
        at_load = (resumed.global_steps, resumed.qsr.tracker.next_boundary, resumed.qsr.rounds)
        rest = train(resumed, 2, STEPS, **where)
        manifests = {tag: json.load(open(os.path.join(save, f"{tag}.qsr.json"))) for tag in ("boundary", "mid")}
        out[stage] = {"full": full[-1]["replica_fp32"], "resumed": rest[-1]["replica_fp32"], "at_load": at_load,
                      "boundaries": [e["step"] for e in rest if e["boundary"]],
                      "layouts": {t: m["layout"] for t, m in manifests.items()},
                      "files": {t: sorted({p.split(os.sep)[0] for p in m["files"]}) for t, m in manifests.items()}}
    # the paper's default keeps Adam's moments local: even at a boundary every replica writes its own
    local = build(ds_config(2, ranks_per_replica=2), qsr=True)
    where = dict(replica=local.qsr.topology.replica_index, shard=local.qsr.topology.shard_rank)
    train(local, 0, 2, **where)
    save = os.path.join(root, "local")
    local.save_checkpoint(save, tag="boundary")
    try:
        local.save_checkpoint(save, tag="forced", one_replica=True)
        out["forced"] = "saved"
    except QSRCheckpointError as err:
        out["forced"] = str(err)
    dist.barrier()
    out["local"] = {"layout": json.load(open(os.path.join(save, "boundary.qsr.json")))["layout"], "files": _files(save)}
    # a one-replica checkpoint into another layout (R = 1 x S = 4): refused on every rank, nothing loaded
    other = build(ds_config(2, ranks_per_replica=4, average=ADAM_STATE), qsr=True)
    before = qsr_ds.fingerprint(other)
    try:
        other.load_checkpoint(os.path.join(root, "zero2"), tag="boundary")
        out["other_r"] = "loaded"
    except QSRCheckpointError as err:
        out["other_r"] = str(err)
    out["other_r_untouched"] = (other.global_steps, qsr_ds.fingerprint(other)) == (0, before)
    return out


def _guarded(fn, *args):
    """One part's results, or its error: the parts fail (or pass) one by one."""
    import traceback

    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - reported by the test of that part
        return {"part_error": f"{type(err).__name__}: {err}\n{traceback.format_exc()}"}


def _worker(rank, world, root):
    return {"data": _guarded(_data_part, rank), "zero3": _guarded(_zero3_part, rank),
            "ckpt": _guarded(_checkpoint_part, rank, root)}


def part(res, name):
    assert "part_error" not in res[name], res[name].get("part_error")
    return res[name]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, 4, str(tmp_path_factory.mktemp("ds_paths")), timeout_s=420, env=ENV)


# ---------------------------------------------------------------- part 2: training_data=


@pytest.mark.timeout(480)
def test_training_loader_shards_over_every_rank_of_every_replica(results):
    data = [part(res, "data") for res in results]
    for rank, d in enumerate(data):
        # what plain DeepSpeed over the 4 ranks gives this rank, batch for batch, in both epochs
        assert d["qsr"] == d["plain"], rank
        assert d["qsr"]["len"] == DATASET // 4 // 2
        assert all(len(batch) == 2 for epoch in d["qsr"]["epochs"] for batch in epoch)  # the JSON's micro batch
        assert d["qsr"]["epochs"][0] != d["qsr"]["epochs"][1]  # set_epoch reshuffles
    for epoch in (0, 1):
        seen = [sorted(i for batch in d["qsr"]["epochs"][epoch] for i in batch) for d in data]
        assert sorted(sum(seen, [])) == list(range(DATASET))  # disjoint across all ranks, nothing left out
        assert not set(seen[0]) & set(seen[2]) and not set(seen[1]) & set(seen[3])  # replicas differ


# ---------------------------------------------------------------- part 3: zero.Init


@pytest.mark.timeout(480)
@pytest.mark.parametrize("bf16", [False, True])
def test_zero3_built_under_qsr_zero_init_trains_like_the_normal_build(results, bf16):
    for rank, res in enumerate(results):
        normal, under = part(res, "zero3")[(bf16, "normal")], part(res, "zero3")[(bf16, "qsr_ds.zero_init")]
        assert under["losses"] == normal["losses"], rank
        assert under["fp"] == normal["fp"] and under["rounds"] == normal["rounds"] == 3
        assert all(under["same_group"])  # initialize reused zero_init's shard group, not a new one
        assert under["partition_ranks"] == [[0, 1] if rank < 2 else [2, 3]] * 4
    assert len({res["zero3"][(bf16, "qsr_ds.zero_init")]["fp"] for res in results}) == 1  # ends on an average


@pytest.mark.timeout(480)
@pytest.mark.parametrize("bf16", [False, True])
def test_model_built_under_plain_zero_init_is_refused_on_every_rank(results, bf16):
    for res in results:
        error = part(res, "zero3")[(bf16, "deepspeed.zero.Init")].get("error", "")
        assert error.startswith("ZeroInitGroupError"), error
        assert "partitioned by deepspeed.zero.Init over 4 ranks [0, 1, 2, 3]" in error
        assert "with qsr_ds.zero_init(config):" in error


# ---------------------------------------------------------------- part 6: checkpoints at scale


@pytest.mark.timeout(480)
@pytest.mark.parametrize("stage", [2, 3])
def test_one_replica_checkpoint_at_a_boundary_resumes_every_replica_exactly(results, stage):
    for res in results:
        run = part(res, "ckpt")[stage]
        assert run["layouts"] == {"boundary": "one_replica", "mid": "per_replica"}
        assert run["files"] == {"boundary": ["replica0"], "mid": ["replica0", "replica1"]}
        assert run["at_load"] == (2, 6, 1)
        assert run["boundaries"] == [6, 8]
        assert run["resumed"] == run["full"]  # the same final fp32 params as the uninterrupted run
    assert len({res["ckpt"][stage]["resumed"] for res in results}) == 1


@pytest.mark.timeout(480)
def test_local_optimizer_state_keeps_every_replica_checkpoint(results):
    for res in results:
        ckpt = part(res, "ckpt")
        assert ckpt["local"]["layout"] == "per_replica"
        assert "replica1/boundary/zero_pp_rank_1_mp_rank_00_optim_states.pt" in ckpt["local"]["files"]
        assert not any("forced" in f for f in ckpt["local"]["files"])  # the refused save wrote nothing
        assert "one_replica=True" in ckpt["forced"] and "not averaged here: exp_avg, exp_avg_sq" in ckpt["forced"]


@pytest.mark.timeout(480)
def test_one_replica_checkpoint_of_another_layout_is_refused_before_any_state_changes(results):
    for res in results:
        part(res, "ckpt")
        assert "written by 2 replica(s) x 2 rank(s) (R=2, S=2)" in res["ckpt"]["other_r"]
        assert "this run has 1 replica(s) x 4 rank(s) (R=1, S=4)" in res["ckpt"]["other_r"]
        assert res["ckpt"]["other_r_untouched"]
