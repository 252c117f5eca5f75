"""kill -9 with an overlapped, compressed round in flight, then resume: the run ends bitwise where
an uninterrupted run ends (DeepSpeed ZeRO-2, 2 replicas x 2 ranks, the main job through
fault_job.py, qsr.overlap_steps = 2 and qsr.compress = "int8").

With the 24-step schedule of jobs.py (boundaries 2 4 7 9 11 14 19 24) the round closing at 4
(next H = 3 > tau) runs behind steps 5 and 6 and is applied after step 6, so the checkpoint
taken after step 4 holds a round in flight (its correction, per rank) and the compression
anchors and residuals. A worker is SIGKILLed after step 6 (the round just applied, rank drawn
at random); the next launch resumes from step 4, re-applies the saved correction after step 6,
and must end with the baseline's replica fingerprints.
"""
from __future__ import annotations

import os
import random

import pytest

from jobs import BOUNDARIES, LAUNCH_TIMEOUT_S, STEPS, fault_seed, launch, write_config

pytestmark = pytest.mark.timeout(4 * LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    seed = fault_seed()
    rank = random.Random(seed).randrange(4)
    directory = str(tmp_path_factory.mktemp("overlap_chain"))
    config = write_config(directory, overlap_steps=2, compress="int8")
    save_dir = os.path.join(directory, "ckpt")
    runs = {"seed": seed, "rank": rank,
            "baseline": launch(directory, "baseline", config, os.path.join(directory, "baseline_ckpt")),
            "A": launch(directory, "A", config, save_dir, fault="kill_after_step:6", fault_rank=rank)}
    runs["B"] = launch(directory, "B", config, save_dir, resume=True)
    runs["saved_in_flight"] = sorted(f for f in os.listdir(os.path.join(save_dir, "replica1", "step4"))
                                     if f.startswith("qsr_tensors"))
    return runs


def test_resume_with_a_round_in_flight_ends_like_the_uninterrupted_run(chain):
    base, killed, resumed = chain["baseline"], chain["A"], chain["B"]
    why = f"QSR_FAULTS_SEED={chain['seed']}\n{killed.tail()}\n{resumed.tail()}"
    assert base.returncode == 0, base.tail()
    assert base.summary["rounds"] == len(BOUNDARIES) and len(set(base.summary["replica_fingerprints"])) == 1
    assert killed.returncode != 0 and killed.marker is not None and "SIGKILL" in killed.output, why
    assert chain["saved_in_flight"] == ["qsr_tensors.shard0.pt", "qsr_tensors.shard1.pt"], chain["saved_in_flight"]
    assert resumed.returncode == 0 and resumed.resumed_from == 4, why
    assert resumed.summary["steps"] == STEPS and resumed.summary["rounds"] == len(BOUNDARIES), why
    assert resumed.summary["replica_fingerprints"] == base.summary["replica_fingerprints"], why
