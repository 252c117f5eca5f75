"""torchft's LocalSGD on the main job: the peer row of benchmarks/throughput.py.

What a user who picks torchft instead of qsr-ds runs: each host is one torchft replica group
(its own torchrun, FSDP2 over its ranks), torchft's Manager joins the replica groups through a
lighthouse, and ``torchft.local_sgd.LocalSGD`` averages every rank's parameter shard with the
same shard of the other replica groups every ``--sync-every`` steps (a fixed H: torchft has no
QSR). Same GPT, data, AdamW, learning-rate schedule, gradient clipping, progress bar and
summary as ``examples/train_gpt.py --fsdp``.

    torchft_lighthouse --min_replicas 2 --bind 0.0.0.0:29510 &
    # on each host h (0, 1), MASTER_ADDR an address the other host reaches:
    TORCHFT_LIGHTHOUSE=http://HOST0:29510 torchrun --nnodes 1 --nproc_per_node 2 --master_addr HOSTh \\
        benchmarks/torchft_peer.py --replica-id h --num-replicas 2 --sync-every 2 --deepspeed_config configs/qsr.json

Needs ``pip install torchft==0.2.0`` (the "bench" extra); benchmark-only, not a dependency of qsr_ds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import train_gpt  # noqa: E402
from fsdp_engine import FunctionLR  # noqa: E402
from gpt import param_groups  # noqa: E402

import qsr_ds  # noqa: E402

from qsr_ds.sync.averager import ROUND_PARTS  # noqa: E402
from qsr_ds.config import read_json  # noqa: E402
from qsr_ds.config import load as load_qsr  # noqa: E402
from qsr_ds.fsdp import default_blocks  # noqa: E402
from qsr_ds.planning.lr import lr_fn_from_deepspeed  # noqa: E402


class TorchFTTrainer:
    """The Trainer interface of train_gpt.py on FSDP2 + torchft LocalSGD.

    Seen from train_gpt.run this replica group is the whole world (torchrun starts one per
    host), so the summary describes one replica; the benchmark compares the hosts' summaries.
    """

    engine_name = "torchft-localsgd"
    zero_stage = 3  # fully_shard, as train_gpt.py --fsdp

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torchft import Manager, ProcessGroupGloo
        from torchft.local_sgd import LocalSGD

        source = args.deepspeed_config
        config = read_json(source)
        self.total_steps = load_qsr(source).total_steps
        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in default_blocks(model):  # the blocks, then the root: as train_gpt.py --fsdp wraps
            fully_shard(block, mesh=mesh)
        self.model = fully_shard(model, mesh=mesh)
        self.micro_batch = int(config.get("train_micro_batch_size_per_gpu", 8))
        self.grad_accum = int(config.get("gradient_accumulation_steps", 1))
        self.clip = float(config.get("gradient_clipping", 0.0) or 0.0)
        params = dict((config.get("optimizer") or {}).get("params", {}))
        weight_decay = float(params.pop("weight_decay", 0.01))
        kwargs = {k: (tuple(v) if k == "betas" else v) for k, v in params.items() if k in ("betas", "eps")}
        self.lr_at = lr_fn_from_deepspeed(config, source, base_lr=float(params.get("lr", 1e-3)))
        self.optimizer = torch.optim.AdamW(param_groups(self.model, weight_decay), lr=self.lr_at(0), **kwargs)
        self.scheduler = FunctionLR(self.optimizer, self.lr_at)

        # every replica group starts from the same seeded weights, so no step-0 weight transfer
        # (init_sync=False, as torchft's docs advise for identically seeded replicas)
        self.manager = Manager(
            pg=ProcessGroupGloo(timeout=timedelta(seconds=args.timeout_s)),
            min_replica_size=args.num_replicas,
            load_state_dict=self._load_state, state_dict=self._state,
            replica_id=f"host{args.replica_id}", hostname=os.environ["MASTER_ADDR"],
            use_async_quorum=False, init_sync=False, timeout=timedelta(seconds=args.timeout_s),
        )
        self.sync_every = args.sync_every
        self.local_sgd = LocalSGD(self.manager, self.model, self.optimizer, sync_every=args.sync_every)
        self.local_sgd.__enter__()
        self._sync = self.local_sgd.sync
        self.local_sgd.sync = self._timed_sync  # its step hook calls self.sync()
        self.rounds, self.sync_s, self.global_step = 0, 0.0, 0
        self.bytes_per_round = sum(p.to_local().numel() * p.to_local().element_size() for p in self.model.parameters())
        self.shard = dist.get_rank()
        self.replica, self.num_replicas, self.ranks_per_replica = 0, 1, dist.get_world_size()
        self.torchft_replica = args.replica_id

    def _timed_sync(self) -> None:
        start = time.perf_counter()
        self._sync()
        self.sync_s += time.perf_counter() - start
        self.rounds += 1

    def _state(self) -> dict:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}

    def _load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def h(self) -> int:
        return self.sync_every

    def planned_boundaries(self) -> list[int]:
        return list(range(self.sync_every, self.total_steps + 1, self.sync_every))

    def train_step(self, batches) -> float:
        losses = []
        for i, (x, y) in enumerate(batches):
            self.model.set_requires_gradient_sync(i == len(batches) - 1)
            loss = self.model(x, y)
            (loss / len(batches)).backward()
            losses.append(float(loss.detach()))
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()  # LocalSGD's post-step hook averages every sync_every steps
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return sum(losses) / len(losses)

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        self.model.eval()
        losses = [float(self.model(x, y)) for x, y in batches]
        self.model.train()
        return sum(losses) / len(losses)

    def save(self, directory: str, extra: dict) -> None:
        raise SystemExit("torchft_peer.py: checkpoints are not part of the peer benchmark")

    load = save

    def report(self) -> dict:
        return {"replica": self.replica, "shard": self.shard, "bytes": self.rounds * self.bytes_per_round,
                "rounds": self.rounds, "sync_s": self.sync_s, "bytes_per_round": self.bytes_per_round,
                "torchft_replica": self.torchft_replica,
                # LocalSGD._average clones every local shard for the all-reduce: one copy during a round
                "round_memory_bytes": self.bytes_per_round,
                **{k: (self.sync_s if k == "comm_s" else 0.0) for k in ROUND_PARTS}}

    def fingerprint(self) -> str:
        return qsr_ds.fingerprint(self.model)

    def describe(self) -> str:
        return f"FSDP2 + torchft LocalSGD (sync_every {self.sync_every}), torchft replica group {self.torchft_replica}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replica-id", type=int, required=True, help="this host's replica group (0, 1, ...)")
    p.add_argument("--num-replicas", type=int, default=2, help="replica groups the quorum waits for")
    p.add_argument("--sync-every", type=int, required=True, help="LocalSGD's H (fixed)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="torchft's collective and quorum timeout")
    own, rest = p.parse_known_args(argv)
    args = train_gpt.parse_args(rest)
    vars(args).update(vars(own), fsdp=True)  # fsdp: train_gpt.run neither needs nor imports DeepSpeed
    code = 0
    try:
        train_gpt.run(args, TorchFTTrainer)
    except BaseException:  # noqa: BLE001 - print, then leave without gloo's exit-time abort
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
