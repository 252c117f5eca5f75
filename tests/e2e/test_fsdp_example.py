"""torchrun --nproc_per_node 4 examples/train_gpt.py --fsdp --ranks-per-replica 2, a few steps.

Checks the summary JSON (the same keys as the DeepSpeed job), equal replica fingerprints
at a boundary, and that a resume from the example's own mid-round checkpoint ends on the
same parameters.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "train_gpt.py")
CONFIG = os.path.join(ROOT, "configs", "qsr.json")

pytestmark = pytest.mark.timeout(300)

SUMMARY_KEYS = {
    "engine", "zero_stage", "config", "num_replicas", "ranks_per_replica", "world_size", "params", "seed", "steps",
    "rounds", "planned_rounds", "bytes_across_replicas", "bytes_data_parallel", "sync_seconds", "sync_split_seconds",
    "seconds_per_round", "round_memory_bytes_per_rank",
    "seconds_per_step", "train_seconds_this_run", "first_loss", "final_loss", "last_train_loss", "replica_fingerprints",
}


def torchrun(tmp_path, name, *extra):
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", SCRIPT, "--fsdp",
           "--deepspeed_config", CONFIG, "--ranks-per-replica", "2", "--d-model", "64", "--n-layer", "2",
           "--no-progress", "--summary-json", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== summary ==" in proc.stdout and "(identical)" in proc.stdout, proc.stdout[-3000:]
    return json.loads(out.read_text())


def test_fsdp_example_summary_and_resume(tmp_path):
    # 12 steps: H = 2 during warm-up, so step 12 closes a round; a checkpoint at step 7 is mid-round
    ckpt = tmp_path / "ckpt"
    full = torchrun(tmp_path, "full", "--steps", "12", "--save-dir", str(ckpt), "--save-every", "7")
    assert set(full) == SUMMARY_KEYS
    assert full["engine"] == "fsdp" and full["num_replicas"] == 2 and full["ranks_per_replica"] == 2
    assert full["world_size"] == 4 and full["steps"] == 12
    assert full["rounds"] == full["planned_rounds"] == 6
    assert full["bytes_across_replicas"] == 6 * full["bytes_data_parallel"] // 12 > 0
    assert full["seconds_per_round"] > 0 and full["seconds_per_step"] > 0
    assert full["final_loss"] < full["first_loss"]
    assert len(full["replica_fingerprints"]) == 2 and len(set(full["replica_fingerprints"])) == 1
    assert sorted(os.listdir(ckpt)) == ["latest", "step12", "step7"]

    (ckpt / "latest").write_text("step7")
    resumed = torchrun(tmp_path, "resumed", "--steps", "12", "--save-dir", str(ckpt), "--resume")
    assert resumed["rounds"] == 6
    assert resumed["replica_fingerprints"] == full["replica_fingerprints"]
    assert resumed["first_loss"] == full["first_loss"]  # carried in the checkpoint
