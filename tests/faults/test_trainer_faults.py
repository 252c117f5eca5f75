"""Bad checkpoints, replica disagreements and fp16 overflow, on the main job's own DeepSpeedTrainer.

One world of 4 spawned gloo ranks (2 replicas x 2, ZeRO-2, the small GPT of
examples/train_gpt.py) goes through every case in turn. Every failure here is raised on
all ranks from an agreed check, so the world stays usable for the next case.

Bad checkpoints (a checkpoint the main job wrote at step 3): a truncated file, another
model (narrower, deeper), another S (and so R), another "qsr" rule. Each must fail at load
with a clear QSRCheckpointError on every rank, leave the checkpoint's bytes untouched and
leave the live model as it was.

fp16 with a dynamic loss scale (only where DeepSpeed's accelerator has fp16; skipped with
the reason elsewhere): replica 1 overflows and skips steps, one of them the step that closes
a round; all replicas must still average at the same steps and finish.

Replica disagreements: replica 1 runs other model code (a different parameter count, and
the same count in another order), caught at start-up before replica 0's weights are
broadcast; replica 1 resumed from another checkpoint than replica 0
(they reach a round at different step counts); replica 1 produced a NaN. Each must raise a
ReplicaMismatchError naming replica 1 on every rank (at start-up, or at the next round,
quickly), with no rank's tensors changed by a refused round.
"""
from __future__ import annotations

import hashlib
import os
import time

import pytest

from jobs import ROOT, write_config
from tests.ranks import deepspeed_fp16_missing, run_ranks

pytestmark = pytest.mark.timeout(300)

SMALL = dict(d_model=64, n_layer=2, seq_len=32)
FP16_STEPS = 11  # rounds of the small config: (0,2) (2,2) (4,3) (7,2) (9,2): 11 ends on a boundary
FP16_OVERFLOW_STEPS = (2, 4, 5)  # 1-based steps replica 1 skips for overflow


def _tree_digest(directory: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


class _Probe:
    """Wraps ReplicaAverager.check and .average: did a refused check or round change any tensor (bitwise)?

    A round is check() (the pre-check, which refuses) and then average(); the start-up
    broadcast from replica 0 runs check() first too.
    """

    def __init__(self):
        from qsr_ds.sync import averager

        self.unchanged: list[bool] = []
        probe = self

        def wrap(orig):
            def call(self, *args, **kwargs):
                before = [t.detach().clone() for _, t in self.named]
                try:
                    return orig(self, *args, **kwargs)
                except Exception:
                    probe.unchanged.append(all(_bits(a) == _bits(t) for a, (_, t) in zip(before, self.named)))
                    raise

            return call

        averager.ReplicaAverager.check = wrap(averager.ReplicaAverager.check)
        averager.ReplicaAverager.average = wrap(averager.ReplicaAverager.average)


def _bits(t) -> bytes:
    return t.detach().contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()


def _make_trainer(config: str, *, ranks_per_replica=None, variant=None, **model):
    import sys

    import deepspeed.utils.groups as groups
    import torch

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import train_gpt
    from gpt import GPT, GPTConfig

    groups.mpu = None  # DeepSpeed keeps the last engine's mpu in a module global
    dims = dict(SMALL, **model)
    argv = ["--deepspeed_config", config, "--d-model", str(dims["d_model"]), "--n-layer", str(dims["n_layer"]),
            "--seq-len", str(dims["seq_len"]), "--no-progress"]
    if ranks_per_replica is not None:
        argv += ["--ranks-per-replica", str(ranks_per_replica)]
    args = train_gpt.parse_args(argv)
    torch.manual_seed(args.seed)
    net = GPT(GPTConfig(seq_len=dims["seq_len"], n_layer=dims["n_layer"], n_head=4, d_model=dims["d_model"]))
    if variant == "reordered":
        # the same parameters, registered in another order: fc before qkv in every block
        for block in net.blocks:
            modules = dict(block._modules)
            block._modules.clear()
            for name in ("ln1", "fc", "qkv", "proj", "ln2", "out"):
                block._modules[name] = modules[name]
    return train_gpt.DeepSpeedTrainer(args, net)


def _train(trainer, start, stop, *, nan_at=None, nan_in="master"):
    """Steps start..stop-1 of the main job's data; returns the error of the first failing step, if any."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from gpt import ByteCorpus

    corpus = ByteCorpus()
    for step in range(start, stop):
        batches = [corpus.batch(seed=0, step=step, replica=trainer.replica, shard=trainer.shard,
                                batch_size=trainer.micro_batch, seq_len=SMALL["seq_len"])]
        if nan_at == step and nan_in == "data":
            x, y = batches[0]
            trainer.engine.module.tok.weight.data[x[0, 0]] = float("nan")  # the forward pass turns NaN
        if nan_at == step and nan_in == "master":
            from qsr_ds.deepspeed import state as ds_state

            _, shard = ds_state.plan(trainer.engine, ("params",)).tensors[0]
            shard.data[shard.numel() // 2] = float("nan")  # a NaN reached this replica's fp32 master weights
        t0 = time.perf_counter()
        try:
            trainer.train_step(batches)
        except Exception as err:  # noqa: BLE001 - reported to the test
            return {"type": type(err).__name__, "message": str(err), "seconds": time.perf_counter() - t0,
                    "step": step + 1}
    return None


def _start_and_train(config, **model):
    """Build a trainer and train to step 4; the error of start-up (step 0) or of the failing step."""
    t0 = time.perf_counter()
    try:
        trainer = _make_trainer(config, **model)
    except Exception as err:  # noqa: BLE001 - reported to the test
        return {"type": type(err).__name__, "message": str(err), "seconds": time.perf_counter() - t0, "step": 0}
    return _train(trainer, 0, 4)


def _load(trainer, directory, tag=None):
    from qsr_ds.sync.checkpoint import QSRCheckpointError

    before = trainer.fingerprint(), _module_bits(trainer)
    try:
        if tag is None:
            trainer.load(directory)
        else:
            trainer.engine.load_checkpoint(directory, tag=tag)
        outcome = {"type": "loaded", "message": ""}
    except QSRCheckpointError as err:
        outcome = {"type": type(err).__name__, "message": str(err)}
    except Exception as err:  # noqa: BLE001
        outcome = {"type": type(err).__name__, "message": str(err)}
    outcome["model_unchanged"] = (trainer.fingerprint(), _module_bits(trainer)) == before
    return outcome


def _module_bits(trainer) -> str:
    """sha256 of the module's own parameters (under ZeRO-2 a copy of the fp32 masters)."""
    digest = hashlib.sha256()
    for p in trainer.engine.module.parameters():
        digest.update(_bits(p))
    return digest.hexdigest()


def _worker(rank, world, root):
    import shutil

    import torch.distributed as dist

    probe = _Probe()
    config = write_config(root) if rank == 0 else os.path.join(root, "qsr_small.json")
    dist.barrier()
    other_rule = os.path.join(root, "constant.json")
    if rank == 0:
        import json

        with open(config) as f:
            data = json.load(f)
        data["qsr"].update(rule="constant", alpha=0.0)
        with open(other_rule, "w") as f:
            json.dump(data, f)
    save = os.path.join(root, "ckpt")
    out = {"ckpt": {}, "replicas": {}}

    trainer = _make_trainer(config)
    assert _train(trainer, 0, 3) is None
    trainer.save(save, {"note": "step 3"})
    assert _train(trainer, 3, 4) is None
    trainer.save(save, {"note": "step 4"})  # step 4 closes a round
    dist.barrier()
    if rank == 0:
        shutil.copytree(save, os.path.join(root, "truncated"))
        victim = os.path.join(root, "truncated", "replica1", "step4", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    dist.barrier()
    digest = _tree_digest(save)

    fresh = _make_trainer(config)
    out["ckpt"]["truncated"] = _load(fresh, os.path.join(root, "truncated"))
    out["ckpt"]["rule"] = _load(_make_trainer(other_rule), save)
    out["ckpt"]["S=1"] = _load(_make_trainer(config, ranks_per_replica=1), save)
    out["ckpt"]["S=4"] = _load(_make_trainer(config, ranks_per_replica=4), save)
    out["ckpt"]["narrower"] = _load(_make_trainer(config, d_model=32), save)
    out["ckpt"]["deeper"] = _load(_make_trainer(config, n_layer=3), save)
    out["ckpt"]["good"] = _load(fresh, save)  # and the real thing still loads afterwards
    out["ckpt_bytes_unchanged"] = _tree_digest(save) == digest

    replica = rank // 2
    out["replicas"]["deeper"] = _start_and_train(config, n_layer=3 if replica else 2)
    out["replicas"]["reordered"] = _start_and_train(config, variant="reordered" if replica else None)
    behind = _make_trainer(config)
    behind.engine.load_checkpoint(save, tag="step3" if replica else "step4")
    out["replicas"]["steps"] = _train(behind, behind.global_step, 12)
    out["replicas"]["nan"] = _train(_make_trainer(config), 0, 4, nan_at=1 if replica else None)
    in_data = _make_trainer(config)
    out["replicas"]["nan_in_data"] = _train(in_data, 0, 4, nan_at=0 if replica else None, nan_in="data")
    out["nan_in_data_skipped"] = in_data.engine.skipped_steps
    out["nan_in_data_fingerprint"] = in_data.fingerprint()
    out["unchanged"] = probe.unchanged

    if deepspeed_fp16_missing() is not None:  # the accelerator has no fp16: the fp16 test skips
        return out
    # fp16, dynamic loss scale: replica 1 overflows at steps 2, 4 and 5 (step 4 closes a round there)
    fp16 = os.path.join(root, "fp16.json")
    if rank == 0:
        import json

        with open(config) as f:
            data = json.load(f)
        data["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000, "hysteresis": 1}
        with open(fp16, "w") as f:
            json.dump(data, f)
    dist.barrier()
    half = _make_trainer(fp16)
    engine = half.engine
    backward, boundaries = engine.backward, []
    for step in range(FP16_STEPS):
        overflow = replica == 1 and step + 1 in FP16_OVERFLOW_STEPS
        engine.backward = (lambda loss, **kw: backward(loss * float("inf"), **kw)) if overflow else backward
        assert _train(half, step, step + 1) is None
        if half.qsr.last_round is not None:
            boundaries.append(step + 1)
    out["fp16"] = {"boundaries": boundaries, "skipped": engine.skipped_steps, "global_steps": engine.global_steps,
                   "loss_scale": float(engine.optimizer.loss_scale), "fingerprint": half.fingerprint(),
                   "lr": half.lr}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, 4, str(tmp_path_factory.mktemp("bad_input")), timeout_s=280,
                     env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})


def _all(results, *path):
    out = []
    for res in results:
        for key in path:
            res = res[key]
        out.append(res)
    return out


@pytest.mark.parametrize("case, expected", [
    ("truncated", ["zero_pp_rank_1_mp_rank_00_optim_states.pt: ", "truncated or overwritten checkpoint"]),
    ("rule", ["step4.qsr.json: checkpoint was written with another qsr schedule (differs in alpha, gamma, rule)"]),
    ("S=1", ["written by 2 replica(s) x 2 rank(s) (R=2, S=2), but this run has 4 replica(s) x 1 rank(s) (R=4, S=1)"]),
    ("S=4", ["written by 2 replica(s) x 2 rank(s) (R=2, S=2), but this run has 1 replica(s) x 4 rank(s) (R=1, S=4)"]),
    ("narrower", ["checkpoint holds a different model than this run", "tok.weight (256, 64) there, (256, 32) here",
                  "nothing was loaded"]),
    ("deeper", ["checkpoint holds a different model than this run (29 parameters there, 41 here; "
                "not in the checkpoint: blocks.2.ln1.weight", "nothing was loaded"]),
])
def test_bad_checkpoint_fails_at_load_on_every_rank_and_changes_nothing(results, case, expected):
    for rank, outcome in enumerate(_all(results, "ckpt", case)):
        assert outcome["type"] == "QSRCheckpointError", (rank, outcome)
        for text in expected:
            assert text in outcome["message"], (rank, outcome["message"])
        assert outcome["model_unchanged"], f"rank {rank}: a refused load changed the live model"
    if case == "truncated":  # the ranks of replica 0 learn which rank could not load
        assert all(m.startswith("rank 2 cannot load the checkpoint") for m in
                   [o["message"] for o in _all(results, "ckpt", case)[:2]])


def test_refused_loads_leave_the_checkpoint_bytes_as_they_were_and_it_still_loads(results):
    assert all(_all(results, "ckpt_bytes_unchanged"))
    assert all(o["type"] == "loaded" for o in _all(results, "ckpt", "good"))


@pytest.mark.parametrize("case, expected", [
    ("deeper", "replica 1 (rank {rank}) has a different model (other model code?) than replica 0: model parameter #26 is "
               "('module:blocks.2.ln1.weight', (64,), 'float32') there but ('module:ln_f.weight', (64,), 'float32')"),
    ("reordered", "replica 1 (rank {rank}) has a different model (other model code?) than replica 0: model parameter "
                  "#4 is ('module:blocks.0.fc.weight', (256, 64), 'float32') there but "
                  "('module:blocks.0.qkv.weight', (192, 64), 'float32') on replica 0"),
    ("steps", "replica 1 (rank {rank}) is at step 4 but replica 0 is at step 7: replicas disagree on when to average"),
    ("nan", "replica 1 (rank {rank}) holds NaN or Inf in "),
])
def test_replica_disagreement_raises_on_every_rank_naming_the_replica(results, case, expected):
    for rank, outcome in enumerate(_all(results, "replicas", case)):
        assert outcome is not None and outcome["type"] == "ReplicaMismatchError", (rank, outcome)
        # the first differing rank of replica 1 is named: rank 2 (shard 0) for every rank
        assert expected.format(rank=2) in outcome["message"], (rank, outcome["message"])
        if case not in ("deeper", "reordered"):
            assert outcome["seconds"] < 30, "not within a bounded time"
    # other model code is caught at start-up (step 0), before replicas 1.. take replica 0's weights
    expected_steps = {"deeper": [0] * 4, "reordered": [0] * 4, "steps": [7, 7, 4, 4], "nan": [2] * 4}[case]
    assert [o["step"] for o in _all(results, "replicas", case)] == expected_steps


def test_no_rank_is_half_averaged_by_a_refused_round(results):
    # one refusal per rank for each of deeper and reordered (at start-up), steps and nan (at a round):
    # every tensor bitwise unchanged
    assert _all(results, "unchanged") == [[True] * 4] * 4


def test_nan_in_the_forward_pass_is_skipped_by_deepspeed_and_replicas_still_agree(results):
    # ZeRO 1/2 skip a step whose gradients hold NaN/Inf (also in fp32): replica 1 skips steps 1 and 2
    # (its bf16/fp32 module copy keeps the NaN row until the boundary refreshes it from the average)
    assert _all(results, "replicas", "nan_in_data") == [None] * 4
    assert _all(results, "nan_in_data_skipped") == [0, 0, 2, 2]
    assert len(set(_all(results, "nan_in_data_fingerprint"))) == 1


def test_fp16_overflow_on_one_replica_keeps_boundaries_and_finishes(needs_deepspeed_fp16, results):
    runs = _all(results, "fp16")
    for rank, run in enumerate(runs):
        assert run["boundaries"] == [2, 4, 7, 9, 11], (rank, run)  # every replica, despite skipped steps
        assert run["global_steps"] == FP16_STEPS  # a skipped step still counts as a step
    assert [r["skipped"] for r in runs] == [0, 0, len(FP16_OVERFLOW_STEPS), len(FP16_OVERFLOW_STEPS)]
    # the run ends on a boundary: every replica holds the same fp32 weights
    assert len({r["fingerprint"] for r in runs}) == 1
    # what stays per replica: the loss scale (halved on each overflow) and DeepSpeed's lr schedule,
    # which does not advance on a skipped step
    assert runs[2]["loss_scale"] < runs[0]["loss_scale"] and runs[2]["lr"] != runs[0]["lr"]
