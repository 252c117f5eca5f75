"""qsr_ds.initialize on real DeepSpeed engines (CPU, gloo, spawned processes).

Each spawned world runs many engines one after the other, so the whole file stays within a
few minutes on two cores. Schedule of every run below: 8 steps, WarmupDecayLR (lr > 0 from the
first step on), QSR with
h_base 2 and alpha 0.03 -> rounds (0, 2), (2, 4), (6, 2): boundaries after steps 2, 6, 8,
the middle H grown by the rule.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import qsr_ds
from qsr_ds.sync.layout import params_digest

from tests.ranks import deepspeed_fp16_missing, run_ranks

STEPS = 8
BOUNDARIES = [2, 6, 8]
BASE_LR = 0.02
SCHEDULER = {"type": "WarmupDecayLR", "params": {"total_num_steps": STEPS + 1, "warmup_num_steps": 2,
                                                 "warmup_type": "linear", "warmup_min_lr": 0.01, "warmup_max_lr": 0.02}}
QSR = {"rule": "qsr", "h_base": 2, "alpha": 0.03, "warmup_steps": 2, "total_steps": STEPS}
ENV = {"DS_ACCELERATOR": "cpu"}
CONFIGS = [(stage, bf16) for stage in (0, 1, 2, 3) for bf16 in (False, True)]


def ds_config(stage, bf16=False, *, ranks_per_replica=None, average=("params",), gas=1, fp16=False):
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas, "steps_per_print": 10**9,
           "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16},
           "scheduler": SCHEDULER}
    if fp16:
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    if stage == 3 and bf16:  # every parameter partitioned, several sub-groups
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=0, sub_group_size=1000)
    if stage == 3 and not bf16:  # default: small parameters persist (gathered) between steps
        cfg["zero_optimization"].update(sub_group_size=3000)
    if ranks_per_replica is not None:
        cfg["qsr"] = dict(QSR, ranks_per_replica=ranks_per_replica, average=list(average))
    return cfg


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 4))


N_PARAMS = 8 * 64 + 64 + 64 * 64 + 64 + 64 * 4 + 4


def batch(step, replica, shard):
    gen = torch.Generator().manual_seed(10_000 * step + 100 * replica + shard)
    return torch.randn(2, 8, generator=gen), torch.randn(2, 4, generator=gen)


def build(cfg, *, qsr, seed=0):
    import deepspeed
    import deepspeed.utils.groups as groups

    import qsr_ds

    groups.mpu = None  # DeepSpeed keeps the last engine's mpu in a module global
    model = make_model()
    if seed:  # another initialization (replicas built without a common seed)
        torch.manual_seed(seed)
        for p in model.parameters():
            torch.nn.init.normal_(p.data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=BASE_LR, weight_decay=0.1)
    init = qsr_ds.initialize if qsr else deepspeed.initialize
    engine, *_ = init(model=model, optimizer=optimizer, config=cfg)
    return engine


def bytes_hash(tensors):
    """The fp32 bytes only (ZeRO 0 fp32 averages one flat buffer where plain DeepSpeed has tensors)."""
    return params_digest([("", torch.cat([t.detach().float().flatten() for t in tensors]))])


def train(engine, start, stop, *, replica, shard, overflow_at=None):
    """Steps start..stop-1; per step: replica state, shard, probe output and optimizer state hashes."""
    from qsr_ds.deepspeed import state as ds_state

    dtype = next(engine.module.parameters()).dtype
    probe = torch.linspace(-1, 1, 16).view(2, 8).to(dtype)
    log = []
    for step in range(start, stop):
        for micro in range(engine.gradient_accumulation_steps()):
            x, y = batch(step * engine.gradient_accumulation_steps() + micro, replica, shard)
            loss = F.mse_loss(engine(x.to(dtype)).float(), y)
            if overflow_at == step:
                loss = loss * float("inf")
            engine.backward(loss)
            engine.step()
        engine.eval()
        with torch.no_grad():
            out = engine(probe).float()
        engine.train()
        plan = ds_state.plan(engine, ("params", "exp_avg", "exp_avg_sq"))
        hook = getattr(engine, "qsr", None)
        log.append({
            "step": step + 1,
            "boundary": hook is not None and hook.last_round is not None,
            "replica_fp32": qsr_ds.fingerprint(engine),
            "shards": bytes_hash([t for n, t in plan.tensors if not n.endswith((":exp_avg", ":exp_avg_sq"))]),
            "exp_avg": params_digest([(n, t) for n, t in plan.tensors if n.endswith(":exp_avg")]),
            "exp_avg_sq": params_digest([(n, t) for n, t in plan.tensors if n.endswith(":exp_avg_sq")]),
            "probe": params_digest([("out", out)]),
        })
    return log


def planned_rounds(steps=STEPS):
    from qsr_ds.planning.lr import lr_fn_from_deepspeed
    from qsr_ds.schedule import SyncSchedule

    schedule = SyncSchedule(**{k: v for k, v in QSR.items()})
    return [b for b in schedule.boundaries(lr_fn_from_deepspeed({"scheduler": SCHEDULER}, "test", base_lr=BASE_LR))
            if b <= steps]


# ---------------------------------------------------------------- before any traffic


def test_bad_qsr_section_fails_before_any_process_group_traffic(tmp_path, monkeypatch):
    import torch.distributed as dist

    import qsr_ds
    from qsr_ds.config import QSRConfigError

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(dict(ds_config(2), qsr={"h_bse": 2, "total_steps": 8})))
    with pytest.raises(QSRConfigError, match=r"ds\.json: qsr\.h_bse: unknown key; did you mean 'h_base'"):
        qsr_ds.initialize(model=make_model(), config=str(path))
    with pytest.raises(QSRConfigError, match=r"qsr\.h_base: must be >= 1"):
        qsr_ds.initialize(model=make_model(), config=dict(ds_config(2), qsr={"h_base": 0}))
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(QSRConfigError, match=r"ranks_per_replica.*world size 6 is not a multiple of ranks_per_replica=4"):
        qsr_ds.initialize(model=make_model(), config=ds_config(2, ranks_per_replica=4))
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = dict(ds_config(2, ranks_per_replica=2), train_batch_size=8)  # 2 x 1 x 4 ranks: the global batch
    with pytest.raises(QSRConfigError, match=r"train_batch_size is per replica .* = 4, not 8"):
        qsr_ds.initialize(model=make_model(), config=cfg)
    assert not dist.is_initialized()


# ---------------------------------------------------------------- R = 1 against plain DeepSpeed


def _plain_and_r1_worker(rank, world):
    import torch.distributed as dist

    from qsr_ds.config import QSRConfigError

    out = {}
    for stage, bf16 in CONFIGS:
        plain = train(build(ds_config(stage, bf16), qsr=False), 0, STEPS, replica=0, shard=rank)
        engine = build(ds_config(stage, bf16, ranks_per_replica=world), qsr=True)
        log = train(engine, 0, STEPS, replica=0, shard=rank)
        out[(stage, bf16)] = {"plain": plain, "qsr": log, "rounds": engine.qsr.rounds,
                              "bytes": engine.qsr.totals.bytes, "dp": engine.dp_world_size}

    class TensorParallelMPU:  # a user mpu with model parallelism is refused, not ignored
        def get_model_parallel_world_size(self):
            return 2

        def get_data_parallel_world_size(self):
            return 1

    import qsr_ds

    try:
        qsr_ds.initialize(model=make_model(), config=ds_config(2, ranks_per_replica=1), mpu=TensorParallelMPU())
        out["mpu"] = "accepted"
    except QSRConfigError as err:
        out["mpu"] = str(err)
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def r1_results():
    return run_ranks(_plain_and_r1_worker, 2, timeout_s=240, env=ENV)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage, bf16", CONFIGS)
def test_r1_matches_plain_deepspeed_bit_for_bit(r1_results, stage, bf16):
    for res in r1_results:
        run = res[(stage, bf16)]
        assert run["dp"] == 2
        assert [e["step"] for e in run["qsr"] if e["boundary"]] == BOUNDARIES == planned_rounds()
        assert run["rounds"] == len(BOUNDARIES) and run["bytes"] == 0  # nothing sent with one replica
        for a, b in zip(run["plain"], run["qsr"]):
            for key in ("replica_fp32", "shards", "probe", "exp_avg", "exp_avg_sq"):
                assert a[key] == b[key], (stage, bf16, a["step"], key)


@pytest.mark.timeout(300)
def test_user_mpu_with_model_parallelism_is_refused(r1_results):
    assert "tensor/pipeline/sequence parallel sizes 2/1/1" in r1_results[0]["mpu"]


# ---------------------------------------------------------------- 2 replicas x 2 ranks


def _replicas_worker(rank, world):
    from qsr_ds.topology import Topology

    out = {}
    for stage, bf16 in CONFIGS:
        average = ("params", "exp_avg") if bf16 else ("params",)
        # replica 1 builds its model with another seed: qsr_ds.initialize starts it from replica 0's
        engine = build(ds_config(stage, bf16, ranks_per_replica=2, average=average), qsr=True, seed=rank // 2)
        topo: Topology = engine.qsr.topology
        start = qsr_ds.fingerprint(engine)
        log = train(engine, 0, STEPS, replica=topo.replica_index, shard=topo.shard_rank)
        opt = engine.optimizer
        out[(stage, bf16)] = {"log": log, "rounds": engine.qsr.rounds, "dp": engine.dp_world_size,
                              "partitions": getattr(opt, "partition_count", None), "bytes": engine.qsr.totals.bytes,
                              "average": average, "start": start}
    return out


@pytest.fixture(scope="module")
def replica_results():
    return run_ranks(_replicas_worker, 4, timeout_s=300, env=ENV)


@pytest.mark.timeout(360)
@pytest.mark.parametrize("stage, bf16", CONFIGS)
def test_replicas_identical_after_each_boundary_and_zero_inside(replica_results, r1_results, stage, bf16):
    runs = [res[(stage, bf16)] for res in replica_results]  # ranks 0,1 = replica 0; 2,3 = replica 1
    assert len({run["start"] for run in runs}) == 1, "replicas must start from replica 0's weights"
    for run in runs:
        assert run["dp"] == 2 and run["rounds"] == len(BOUNDARIES) == len(planned_rounds())
        assert [e["step"] for e in run["log"] if e["boundary"]] == BOUNDARIES
        if stage in (1, 2):  # ZeRO partitions over the 2 ranks of the replica, not the 4 of the world
            assert run["partitions"] == [2] * len(run["partitions"])
        if stage == 3:
            assert run["partitions"] == 2
    # one replica sends its fp32 state once per round (ZeRO 0: each rank a 1/S share of the full copy)
    per_replica = [runs[0]["bytes"] + runs[1]["bytes"], runs[2]["bytes"] + runs[3]["bytes"]]
    assert per_replica[0] == per_replica[1] > 0
    if stage == 0:
        assert runs[0]["bytes"] > 0 and runs[1]["bytes"] > 0
        assert per_replica[0] == len(BOUNDARIES) * 4 * N_PARAMS * len(runs[0]["average"])
    averaged_exp_avg = "exp_avg" in runs[0]["average"]
    for i in range(STEPS):
        e = [run["log"][i] for run in runs]
        # inside a replica: ZeRO keeps the ranks' models identical at every step
        for a, b in ((0, 1), (2, 3)):
            assert e[a]["replica_fp32"] == e[b]["replica_fp32"] and e[a]["probe"] == e[b]["probe"], e[a]["step"]
        if e[0]["boundary"]:
            # every replica holds the same fp32 shards, full fp32 params and low-precision model
            assert e[0]["shards"] == e[2]["shards"] and e[1]["shards"] == e[3]["shards"]
            assert e[0]["replica_fp32"] == e[2]["replica_fp32"] and e[0]["probe"] == e[2]["probe"]
            assert (e[0]["exp_avg"] == e[2]["exp_avg"]) == averaged_exp_avg
            assert e[0]["exp_avg_sq"] != e[2]["exp_avg_sq"]  # optimizer state not asked for stays local
        else:  # between boundaries nothing is sent: different data, different models
            assert e[0]["replica_fp32"] != e[2]["replica_fp32"]
    # before the first boundary replica 0 is exactly plain DeepSpeed on its 2 ranks with its data
    plain = [res[(stage, bf16)]["plain"] for res in r1_results]
    for step in range(BOUNDARIES[0] - 1):
        for shard in (0, 1):
            assert runs[shard]["log"][step]["replica_fp32"] == plain[shard][step]["replica_fp32"]
            assert runs[shard]["log"][step]["shards"] == plain[shard][step]["shards"]


# ---------------------------------------------------------------- checkpoints


def _resume_worker(rank, world, root):
    import shutil

    import torch.distributed as dist

    from qsr_ds.sync.checkpoint import QSRCheckpointError

    out = {}
    for stage, bf16, gas in ((2, False, 1), (3, True, 2)):
        save = os.path.join(root, f"zero{stage}")
        cfg = ds_config(stage, bf16, ranks_per_replica=2, gas=gas)
        engine = build(cfg, qsr=True)
        topo = engine.qsr.topology
        where = dict(replica=topo.replica_index, shard=topo.shard_rank)
        first = train(engine, 0, 4, **where)
        engine.save_checkpoint(save, tag="mid")  # mid-round: the round 2..6 has H = 4
        full = first + train(engine, 4, STEPS, **where)
        resumed = build(cfg, qsr=True)
        path, client = resumed.load_checkpoint(save)
        tracker = resumed.qsr.tracker
        at_load = (resumed.global_steps, tracker.current_h, tracker.next_boundary, tracker.rounds_done,
                   resumed.qsr.totals.rounds)
        rest = train(resumed, 4, STEPS, **where)
        out[stage] = {"full": full[-1], "resumed": rest[-1], "at_load": at_load, "rounds": resumed.qsr.rounds,
                      "client": client, "boundaries": [e["step"] for e in first + rest if e["boundary"]]}
    errors = {}
    save = os.path.join(root, "zero2")
    if rank == 0:
        for bad in ("truncated", "manifest", "plain"):
            shutil.copytree(save, os.path.join(root, bad))
        victim = os.path.join(root, "truncated", "replica1", "mid", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
        with open(os.path.join(root, "manifest", "mid.qsr.json"), "w") as f:
            f.write('{"format": 1, "tag": "mid", "num_rep')
        os.remove(os.path.join(root, "plain", "mid.qsr.json"))
    dist.barrier()
    engine = build(ds_config(2, ranks_per_replica=2), qsr=True)
    for bad in ("truncated", "manifest", "plain"):
        try:
            engine.load_checkpoint(os.path.join(root, bad))
            errors[bad] = "loaded"
        except QSRCheckpointError as err:
            errors[bad] = str(err)
    other = build(ds_config(2, ranks_per_replica=4), qsr=True)  # R = 1 x S = 4
    try:
        other.load_checkpoint(save)
        errors["layout"] = "loaded"
    except QSRCheckpointError as err:
        errors["layout"] = str(err)
    out["errors"] = errors
    # fp16: a step skipped for overflow on one replica still counts; replicas agree on boundaries
    # (only where the accelerator has fp16; tests/dist/test_skipped_steps.py covers every dtype)
    if deepspeed_fp16_missing() is None:
        fp16 = build(ds_config(2, ranks_per_replica=2, fp16=True), qsr=True)
        topo = fp16.qsr.topology
        log = train(fp16, 0, STEPS, replica=topo.replica_index, shard=topo.shard_rank,
                    overflow_at=1 if topo.replica_index == 1 else None)
        out["fp16"] = {"boundaries": [e["step"] for e in log if e["boundary"]], "skipped": fp16.skipped_steps,
                       "last": log[-1]}
    return out


@pytest.fixture(scope="module")
def resume_results(tmp_path_factory):
    return run_ranks(_resume_worker, 4, str(tmp_path_factory.mktemp("ckpt")), timeout_s=300, env=ENV)


@pytest.mark.timeout(360)
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_mid_round_gives_the_same_final_fingerprint(resume_results, stage):
    for res in resume_results:
        run = res[stage]
        assert run["at_load"] == (4, 4, 6, 1, 1)  # same H and next boundary as the uninterrupted run
        assert run["boundaries"] == BOUNDARIES and run["rounds"] == len(BOUNDARIES)
        assert run["resumed"]["replica_fp32"] == run["full"]["replica_fp32"]
        assert run["resumed"]["shards"] == run["full"]["shards"]
        assert run["resumed"]["probe"] == run["full"]["probe"]
        assert "qsr" not in run["client"]
    assert len({res[stage]["resumed"]["replica_fp32"] for res in resume_results}) == 1


@pytest.mark.timeout(360)
def test_bad_checkpoints_fail_on_every_rank_with_a_clear_message(resume_results):
    for res in resume_results:
        errors = res["errors"]
        assert "truncated or overwritten" in errors["truncated"]
        assert "corrupt or truncated QSR manifest" in errors["manifest"]
        assert "no QSR checkpoint 'mid'" in errors["plain"]
        assert "written by 2 replica(s) x 2 rank(s) (R=2, S=2)" in errors["layout"]
        assert "this run has 1 replica(s) x 4 rank(s) (R=1, S=4)" in errors["layout"]


@pytest.mark.timeout(360)
def test_fp16_overflow_skip_still_counts_as_a_step(needs_deepspeed_fp16, resume_results):
    skipped = [res["fp16"]["skipped"] for res in resume_results]
    assert skipped == [0, 0, 1, 1]
    for res in resume_results:
        assert res["fp16"]["boundaries"] == BOUNDARIES
    assert len({res["fp16"]["last"]["replica_fp32"] for res in resume_results}) == 1
