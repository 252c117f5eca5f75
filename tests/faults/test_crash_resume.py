"""Crash and resume the main job: kill -9 one worker, restart with --resume, end bitwise where
an uninterrupted run ends.

Each engine runs one chain of launches of examples/train_gpt.py (through fault_job.py) on
2 replicas x 2 ranks, 24 steps, a checkpoint every 4 steps, into one checkpoint directory:

  DeepSpeed (ZeRO-2)                                     FSDP2
  baseline  uninterrupted, same seed                     baseline
  A  SIGKILL after a mid-round step                      A  SIGKILL between writing checkpoint T's
  B  resume; SIGKILL mid all-reduce of a sync round         files and renaming 'latest'
  C  resume; SIGKILL half-way through writing a          B  resume; SIGKILL on entering a sync round
     checkpoint file                                     C  resume to the end
  D  resume; SIGKILL between the manifest and 'latest'
  E  resume to the end

Steps and ranks are drawn at random (QSR_FAULTS_SEED to replay; the seed is in every
failure message). After every crash the previous checkpoint must be the one 'latest'
names and the next launch must resume from it; the last launch must end with the
baseline's replica fingerprints (sha256 of every replica's fp32 parameters).
"""
from __future__ import annotations

import os
import random

import pytest

from jobs import BOUNDARIES, LAUNCH_TIMEOUT_S, SAVES, STEPS, last_save_before, latest, launch, write_config, fault_seed

pytestmark = pytest.mark.timeout(6 * LAUNCH_TIMEOUT_S)


def _run_chain(directory: str, engine: str, stages) -> dict:
    """stages: [(name, fault, rank, resume)]; every launch shares one checkpoint directory."""
    config = write_config(directory)
    out = {"baseline": launch(directory, "baseline", config, os.path.join(directory, "baseline_ckpt"), engine=engine)}
    save_dir = os.path.join(directory, "ckpt")
    for name, fault, rank, resume in stages:
        out[name] = launch(directory, name, config, save_dir, engine=engine, fault=fault, fault_rank=rank,
                           resume=resume)
        run = out[name]
        run.latest_after = latest(save_dir)  # what the directory looked like right after this launch
        run.entries_after = sorted(os.listdir(save_dir))
        if run.marker and "path" in run.marker:
            run.marker["size_after"] = os.path.getsize(run.marker["path"])
    out["save_dir"] = save_dir
    return out


@pytest.fixture(scope="module")
def ds_chain(tmp_path_factory):
    seed = fault_seed()
    rng = random.Random(seed)
    k_a = rng.choice([s for s in range(5, 11) if s not in BOUNDARIES])  # 5, 6, 8 or 10: mid-round
    r_a = last_save_before(k_a)
    k_b = rng.choice([b for b in BOUNDARIES if r_a < b <= 14])  # a round that closes after the resume point
    r_b = last_save_before(k_b)
    t_c = r_b + 4  # the next checkpoint the resumed run writes
    t_d = r_b + 8
    plan = {"seed": seed, "A": (k_a, rng.randrange(4), r_a), "B": (k_b, rng.randrange(4), r_b),
            "C": (t_c, rng.randrange(4), r_b), "D": (t_d, 0, t_d - 4)}
    stages = [
        ("A", f"kill_after_step:{k_a}", plan["A"][1], False),
        ("B", f"kill_mid_allreduce:{k_b}", plan["B"][1], True),
        ("C", f"kill_mid_write:step{t_c}", plan["C"][1], True),
        ("D", f"kill_before_commit:step{t_d}", 0, True),  # rank 0 renames 'latest'
        ("E", None, None, True),
    ]
    runs = _run_chain(str(tmp_path_factory.mktemp("ds_chain")), "deepspeed", stages)
    runs["plan"] = plan
    return runs


@pytest.fixture(scope="module")
def fsdp_chain(tmp_path_factory):
    seed = fault_seed()
    rng = random.Random(seed)
    t_a = rng.choice([8, 12, 16])
    k_b = rng.choice([b for b in BOUNDARIES if t_a - 4 < b <= 19])
    plan = {"seed": seed, "A": (t_a, 0, t_a - 4), "B": (k_b, rng.randrange(4), last_save_before(k_b))}
    stages = [
        ("A", f"kill_before_commit:step{t_a}", 0, False),
        ("B", f"kill_in_round:{k_b}", plan["B"][1], True),
        ("C", None, None, True),
    ]
    runs = _run_chain(str(tmp_path_factory.mktemp("fsdp_chain")), "fsdp", stages)
    runs["plan"] = plan
    return runs


def _why(runs, *names) -> str:
    return f"fault plan {runs['plan']} (replay with QSR_FAULTS_SEED={runs['plan']['seed']})\n" + "\n".join(
        runs[n].tail() for n in names)


def _check_killed(runs, name, fault, rank, resumed_from, latest_after):
    run = runs[name]
    why = _why(runs, name)
    assert run.returncode != 0, why
    assert run.marker is not None, "the fault never fired\n" + why
    assert run.marker["fault"] == fault and run.marker["rank"] == rank, why
    assert "SIGKILL" in run.output, why  # torchrun names the killed worker and tears the others down
    assert run.resumed_from == resumed_from, why
    assert run.latest_after == f"step{latest_after}", why


def _check_baseline(run):
    assert run.returncode == 0, run.tail()
    assert run.summary["steps"] == STEPS and run.summary["rounds"] == len(BOUNDARIES), run.tail()
    assert len(set(run.summary["replica_fingerprints"])) == 1, run.tail()


def test_deepspeed_kill_mid_round(ds_chain):
    _check_baseline(ds_chain["baseline"])
    k_a, rank, r_a = ds_chain["plan"]["A"]
    _check_killed(ds_chain, "A", "kill_after_step", rank, 0, r_a)
    assert ds_chain["A"].marker["step"] == k_a and not ds_chain["A"].marker["round_closed"]


def test_deepspeed_kill_mid_allreduce_at_a_boundary(ds_chain):
    _, _, r_a = ds_chain["plan"]["A"]
    k_b, rank, r_b = ds_chain["plan"]["B"]
    _check_killed(ds_chain, "B", "kill_mid_allreduce", rank, r_a, r_b)
    assert ds_chain["B"].marker["step"] == k_b and ds_chain["B"].marker["numel"] > 0


def test_deepspeed_kill_while_writing_a_checkpoint_file(ds_chain):
    t_c, rank, r_b = ds_chain["plan"]["C"]
    _check_killed(ds_chain, "C", "kill_mid_write", rank, r_b, r_b)
    marker = ds_chain["C"].marker
    assert marker["tag"] == f"step{t_c}" and marker["size_after"] == marker["wrote"] < marker["of"]
    # the torn file stays behind, but no manifest names it and 'latest' still names the previous tag
    assert f"step{t_c}.qsr.json" not in ds_chain["C"].entries_after, _why(ds_chain, "C")


def test_deepspeed_kill_between_manifest_and_latest(ds_chain):
    _, _, r_b = ds_chain["plan"]["C"]
    t_d, _, r_d = ds_chain["plan"]["D"]
    _check_killed(ds_chain, "D", "kill_before_commit", 0, r_b, r_d)
    assert f"step{t_d}.qsr.json" in ds_chain["D"].entries_after  # written, never committed


def test_deepspeed_resumed_run_ends_bitwise_like_the_uninterrupted_run(ds_chain):
    run, base = ds_chain["E"], ds_chain["baseline"]
    why = _why(ds_chain, "E")
    assert run.returncode == 0, why
    assert run.resumed_from == ds_chain["plan"]["D"][2], why
    assert run.summary["rounds"] == base.summary["rounds"] == len(BOUNDARIES), why
    assert run.summary["replica_fingerprints"] == base.summary["replica_fingerprints"], why
    assert run.summary["first_loss"] == base.summary["first_loss"]  # carried in the checkpoint
    manifests = sorted(n for n in os.listdir(ds_chain["save_dir"]) if n.endswith(".qsr.json"))
    assert manifests == sorted(f"step{s}.qsr.json" for s in SAVES), manifests


def test_fsdp_kill_between_checkpoint_files_and_latest(fsdp_chain):
    _check_baseline(fsdp_chain["baseline"])
    t_a, _, r_a = fsdp_chain["plan"]["A"]
    _check_killed(fsdp_chain, "A", "kill_before_commit", 0, 0, r_a)
    assert f"step{t_a}" in fsdp_chain["A"].entries_after  # written, never committed


def test_fsdp_kill_at_a_boundary(fsdp_chain):
    _, _, r_a = fsdp_chain["plan"]["A"]
    k_b, rank, r_b = fsdp_chain["plan"]["B"]
    _check_killed(fsdp_chain, "B", "kill_in_round", rank, r_a, r_b)
    assert fsdp_chain["B"].marker["step"] == k_b


def test_fsdp_resumed_run_ends_bitwise_like_the_uninterrupted_run(fsdp_chain):
    run, base = fsdp_chain["C"], fsdp_chain["baseline"]
    why = _why(fsdp_chain, "C")
    assert run.returncode == 0, why
    assert run.resumed_from == fsdp_chain["plan"]["B"][2], why
    assert run.summary["rounds"] == base.summary["rounds"] == len(BOUNDARIES), why
    assert run.summary["replica_fingerprints"] == base.summary["replica_fingerprints"], why
