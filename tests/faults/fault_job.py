"""The main job (examples/train_gpt.py) with one injected fault, for tests/faults/.

    QSR_FAULT=kill_after_step:10 QSR_FAULT_RANK=3 QSR_FAULT_MARKER=/tmp/m.json \\
        torchrun --nproc_per_node 4 tests/faults/fault_job.py <train_gpt.py arguments>

Nothing is changed in the job itself: this script patches a few functions of the running
process (on the rank QSR_FAULT_RANK only), then calls train_gpt.main(). Faults (QSR_FAULT):

  kill_after_step:K       SIGKILL right after optimizer step K completes (before a save at K)
  kill_in_round:K         SIGKILL on entering the sync round that closes at step K, before its
                          first collective (the other ranks are waiting in its pre-check)
  kill_mid_allreduce:K    in the round closing at step K, after the pre-check, post the first
                          all-reduce of data, then SIGKILL (the other ranks of the replica group
                          are inside that all-reduce)
  kill_mid_write:TAG      while saving checkpoint TAG: write half of this rank's first file, SIGKILL
  kill_before_commit:TAG  after every file and the manifest of TAG are written, just before
                          save_dir/latest is renamed into place (rank 0 writes it)

Before dying, the rank writes what it did to QSR_FAULT_MARKER (JSON), so a test can tell a
fault that fired from one that never did.
"""
from __future__ import annotations

import io
import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)


def _die(what: dict) -> None:
    what = dict(what, rank=int(os.environ["RANK"]), pid=os.getpid())
    marker = os.environ.get("QSR_FAULT_MARKER")
    if marker:
        with open(marker, "w") as f:
            json.dump(what, f)
            f.flush()
            os.fsync(f.fileno())
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    kind, _, arg = spec.partition(":")
    if kind == "kill_after_step":
        import fsdp_engine
        import train_gpt

        step = int(arg)
        for cls in (train_gpt.DeepSpeedTrainer, fsdp_engine.FSDPTrainer):
            def train_step(self, batches, _orig=cls.train_step):
                loss = _orig(self, batches)
                if self.global_step == step:
                    _die({"fault": kind, "step": step, "round_closed": self.qsr.last_round is not None})
                return loss

            cls.train_step = train_step
    elif kind in ("kill_in_round", "kill_mid_allreduce"):
        import torch.distributed as dist

        from qsr_ds.sync import averager

        target = int(arg)
        orig_check, orig_average = averager.ReplicaAverager.check, averager.ReplicaAverager.average
        orig_all_reduce = dist.all_reduce

        def all_reduce(tensor, *args, **kwargs):
            kwargs["async_op"] = True
            work = orig_all_reduce(tensor, *args, **kwargs)
            _die({"fault": kind, "step": target, "numel": tensor.numel()})
            return work

        # a round is check() (the pre-check, its first collectives) and then average(step=..., verdict=...)
        def check(self, step=None, *args, **kwargs):
            if step == target and kind == "kill_in_round":
                _die({"fault": kind, "step": step})
            return orig_check(self, step, *args, **kwargs)

        def average(self, step=None, *args, **kwargs):
            if step == target and kind == "kill_mid_allreduce":
                averager.dist.all_reduce = all_reduce  # the pre-check has passed: the next all-reduce moves data
            return orig_average(self, step, *args, **kwargs)

        averager.ReplicaAverager.check = check
        averager.ReplicaAverager.average = average
    elif kind == "kill_mid_write":
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        import torch

        tag, orig_save = arg, TorchCheckpointEngine.save

        def save(self, state_dict, path):
            if f"{os.sep}{tag}{os.sep}" in path:
                buf = io.BytesIO()
                torch.save(state_dict, buf)
                data = buf.getvalue()
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                _die({"fault": kind, "tag": tag, "path": path, "wrote": len(data) // 2, "of": len(data)})
            return orig_save(self, state_dict, path)

        TorchCheckpointEngine.save = save
    elif kind == "kill_before_commit":
        from qsr_ds.sync import checkpoint

        tag, orig_write_latest = arg, checkpoint.write_latest

        def write_latest(directory, tag_now):
            top_level = not os.path.basename(os.path.normpath(directory)).startswith("replica")
            if top_level and tag_now == tag:
                _die({"fault": kind, "tag": tag, "directory": directory})
            return orig_write_latest(directory, tag_now)

        checkpoint.write_latest = write_latest
    else:
        raise SystemExit(f"QSR_FAULT={spec!r}: unknown fault {kind!r}")


def main() -> None:
    spec = os.environ.get("QSR_FAULT")
    if spec and os.environ.get("RANK") == os.environ.get("QSR_FAULT_RANK"):
        install(spec)
    import train_gpt

    train_gpt.main(sys.argv[1:])


if __name__ == "__main__":
    main()
