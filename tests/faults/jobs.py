"""Launch the main job under torchrun, with or without an injected fault (tests/faults/fault_job.py)."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAULT_JOB = os.path.join(ROOT, "tests", "faults", "fault_job.py")
BASE_CONFIG = os.path.join(ROOT, "configs", "qsr.json")

STEPS = 24
SAVE_EVERY = 4
# configs/qsr.json shrunk to 24 steps (qsr-ds plan): rounds (0,2) (2,2) (4,3) (7,2) (9,2) (11,3) (14,5) (19,5)
BOUNDARIES = [2, 4, 7, 9, 11, 14, 19, 24]
SAVES = list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
SMALL_MODEL = ["--d-model", "64", "--n-layer", "2", "--seq-len", "32"]
LAUNCH_TIMEOUT_S = 240


def fault_seed() -> int:
    """QSR_FAULTS_SEED picks the fault steps and ranks; a fresh one each run otherwise (printed on failure)."""
    value = os.environ.get("QSR_FAULTS_SEED")
    return int(value) if value else random.SystemRandom().randrange(2**31)


def write_config(directory: str, **qsr) -> str:
    with open(BASE_CONFIG) as f:
        config = json.load(f)
    config["scheduler"]["params"].update(total_num_steps=STEPS, warmup_num_steps=4)
    config["qsr"].update(total_steps=STEPS, warmup_steps=4, alpha=0.004, timeout_s=60)
    config["qsr"].update(qsr)
    path = os.path.join(directory, "qsr_small.json")
    with open(path, "w") as f:
        json.dump(config, f, indent=1)
    return path


@dataclass
class Launch:
    name: str
    returncode: int
    output: str
    seconds: float
    summary: dict | None
    marker: dict | None

    @property
    def resumed_from(self) -> int | None:
        match = re.search(r"steps (\d+)->\d+", self.output)
        return int(match.group(1)) if match else None

    def tail(self, n: int = 4000) -> str:
        return f"--- {self.name} (rc {self.returncode}, {self.seconds:.0f} s) ---\n{self.output[-n:]}"


def launch(directory: str, name: str, config: str, save_dir: str, *extra: str, engine: str = "deepspeed",
           fault: str | None = None, fault_rank: int | None = None, resume: bool = False, nproc: int = 4) -> Launch:
    """torchrun --nproc_per_node 4 tests/faults/fault_job.py (= examples/train_gpt.py) ...; returns what happened."""
    summary_path = os.path.join(directory, f"{name}.summary.json")
    marker_path = os.path.join(directory, f"{name}.fault.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           FAULT_JOB, "--deepspeed_config", config, *SMALL_MODEL,
           "--steps", str(STEPS), "--no-progress", "--save-dir", save_dir, "--save-every", str(SAVE_EVERY),
           "--summary-json", summary_path, *extra]
    if engine == "fsdp":
        cmd.append("--fsdp")
    if resume:
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for key in ("QSR_FAULT", "QSR_FAULT_RANK", "QSR_FAULT_MARKER"):
        env.pop(key, None)
    if fault is not None:
        env.update(QSR_FAULT=fault, QSR_FAULT_RANK=str(fault_rank), QSR_FAULT_MARKER=marker_path)
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=directory,
                          env=env, timeout=LAUNCH_TIMEOUT_S)
    seconds = time.perf_counter() - start
    with open(os.path.join(directory, f"{name}.log"), "w") as f:  # every rank's output, for a post-mortem
        f.write(proc.stdout)
    summary = marker = None
    if proc.returncode == 0 and os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    if os.path.exists(marker_path):
        with open(marker_path) as f:
            marker = json.load(f)
    return Launch(name, proc.returncode, proc.stdout, seconds, summary, marker)


def latest(save_dir: str) -> str | None:
    path = os.path.join(save_dir, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def last_save_before(step: int) -> int:
    """The checkpoint a run killed after (or during) step ``step`` resumes from: saves happen after a step."""
    return max([s for s in SAVES if s < step], default=0)
