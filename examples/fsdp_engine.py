"""The FSDP2 side of the main job: ``train_gpt.py --fsdp`` runs the same GPT, data, progress
bar and summary as the DeepSpeed job, with FSDP2 inside each replica.

    torchrun --nproc_per_node 4 examples/train_gpt.py --fsdp --ranks-per-replica 2

The DeepSpeed JSON is read for the same settings the DeepSpeed job takes from it, so the two
runs compare like for like: the "qsr" section, train_micro_batch_size_per_gpu,
gradient_accumulation_steps, the AdamW "optimizer" params, the "scheduler" (reproduced
exactly by qsr_ds.planning.lr), gradient_clipping and bf16 (a MixedPrecisionPolicy with bf16
compute and fp32 gradient reduction; the sharded fp32 parameters are what QSR averages).
"zero_optimization" does not apply: fully_shard shards parameters, gradients and
optimizer state over the S ranks of a replica, as ZeRO-3 does.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types

import torch
import torch.distributed as dist
from gpt import param_groups

import qsr_ds

from qsr_ds.sync import checkpoint
from qsr_ds.fsdp import checkpoint as fsdp_checkpoint
from qsr_ds.sync.averager import round_split
from qsr_ds.config import QSRConfigError, read_json
from qsr_ds.config import load as load_qsr
from qsr_ds.fsdp import FSDPQSR, default_blocks, init_mesh, shard_model, topology_of
from qsr_ds.planning.lr import lr_fn_from_deepspeed
from qsr_ds.topology import TopologyError


class FunctionLR(torch.optim.lr_scheduler.LRScheduler):
    """lr = lr_at(step) exactly (no base_lr * ratio rounding): the floats DeepSpeed's scheduler sets."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_at) -> None:
        self.lr_at = lr_at
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch) for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k != "lr_at"}


class HSDPSteps:
    """--hsdp: plain FSDP2 HSDP data parallel, no QSR rounds (a baseline for benchmarks).

    fully_shard over the whole (replicate, shard) mesh reduce-scatters gradients inside a
    replica and all-reduces them across replicas in every backward. This stands in for
    FSDPQSR where FSDPTrainer reads it: it counts steps and steps the scheduler after each one.
    """

    averager = None
    rounds = 0
    round_memory_bytes = 0

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler, mesh, total_steps: int) -> None:
        self.optimizer, self.scheduler = optimizer, scheduler
        self.topology = topology_of(mesh)
        schedule = types.SimpleNamespace(total_steps=total_steps, boundaries=lambda lr_at: [])
        self.tracker = types.SimpleNamespace(schedule=schedule, completed_steps=0, current_h=1)
        self.totals = types.SimpleNamespace(bytes=0, rounds=0, total_s=0.0, comm_s=0.0)
        optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.scheduler.step()
        self.tracker.completed_steps += 1

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


class FSDPTrainer:
    """The Trainer interface of train_gpt.py (see DeepSpeedTrainer there) on FSDP2 + FSDPQSR."""

    engine_name = "fsdp"
    zero_stage = 3  # fully_shard shards params, gradients and optimizer state, like ZeRO-3

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.source = args.deepspeed_config
        config = read_json(self.source)
        qsr_config = load_qsr(self.source)
        if args.ranks_per_replica is not None:
            qsr_config = dataclasses.replace(qsr_config, ranks_per_replica=args.ranks_per_replica)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        try:
            self.mesh = init_mesh(qsr_config.ranks_per_replica, device_type=self.device.type)
        except TopologyError as err:
            raise SystemExit(f"{self.source}: {err}") from None
        self.micro_batch = int(config.get("train_micro_batch_size_per_gpu", 8))
        self.grad_accum = int(config.get("gradient_accumulation_steps", 1))
        self.clip = float(config.get("gradient_clipping", 0.0) or 0.0)
        self.bf16 = bool((config.get("bf16") or {}).get("enabled", False))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 else MixedPrecisionPolicy()
        self.hsdp = bool(getattr(args, "hsdp", False))
        if self.hsdp:  # every block, then the root, over the 2-D mesh: HSDP
            model = model.to(self.device)
            for block in default_blocks(model):
                fully_shard(block, mesh=self.mesh, mp_policy=mp)
            self.model = fully_shard(model, mesh=self.mesh, mp_policy=mp)
        else:
            self.model = shard_model(model.to(self.device), self.mesh, mp_policy=mp)

        opt_section = config.get("optimizer") or {"type": "AdamW", "params": {}}
        if opt_section.get("type", "AdamW").lower() not in ("adamw", "adam"):
            raise SystemExit(f"{self.source}: optimizer.type {opt_section.get('type')!r}: this example builds AdamW/Adam")
        params = dict(opt_section.get("params", {}))
        self.base_lr = float(params.get("lr", 1e-3))
        weight_decay = float(params.pop("weight_decay", 0.01 if opt_section.get("type", "AdamW").lower() == "adamw" else 0.0))
        kwargs = {k: (tuple(v) if k == "betas" else v) for k, v in params.items() if k in ("betas", "eps")}
        try:
            self.lr_at = lr_fn_from_deepspeed(config, self.source, base_lr=self.base_lr)
        except QSRConfigError as err:
            raise SystemExit(str(err)) from None
        # built after fully_shard: the optimizer must hold the sharded (DTensor) parameters
        self.optimizer = torch.optim.AdamW(param_groups(self.model, weight_decay), lr=self.lr_at(0), **kwargs)
        self.scheduler = FunctionLR(self.optimizer, self.lr_at)
        if self.hsdp:
            self.qsr = HSDPSteps(self.optimizer, self.scheduler, self.mesh, qsr_config.total_steps)
        else:
            self.qsr = FSDPQSR(self.model, self.optimizer, mesh=self.mesh, qsr=qsr_config, lr_scheduler=self.scheduler)
        topo = self.qsr.topology
        self.replica, self.shard = topo.replica_index, topo.shard_rank
        self.num_replicas, self.ranks_per_replica = topo.num_replicas, topo.ranks_per_replica

    @property
    def total_steps(self) -> int:
        return self.qsr.tracker.schedule.total_steps

    @property
    def global_step(self) -> int:
        return self.qsr.tracker.completed_steps

    @property
    def lr(self) -> float:
        return self.qsr.current_lr()

    @property
    def h(self) -> int:
        return self.qsr.tracker.current_h

    @property
    def rounds(self) -> int:
        return self.qsr.rounds

    def planned_boundaries(self) -> list[int]:
        return self.qsr.tracker.schedule.boundaries(self.lr_at)

    def train_step(self, batches) -> float:
        """One optimizer step over grad_accum micro-batches (gradients reduced on the last only)."""
        losses = []
        for i, (x, y) in enumerate(batches):
            self.model.set_requires_gradient_sync(i == len(batches) - 1)
            loss = self.model(x.to(self.device), y.to(self.device))
            (loss / len(batches)).backward()
            losses.append(float(loss.detach()))
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()  # FSDPQSR's hook steps the scheduler and averages at a boundary
        self.optimizer.zero_grad(set_to_none=True)
        return sum(losses) / len(losses)

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        was_training = self.model.training
        self.model.eval()
        losses = [float(self.model(x.to(self.device), y.to(self.device))) for x, y in batches]
        self.model.train(was_training)
        return sum(losses) / len(losses)

    def save(self, directory: str, extra: dict) -> None:
        tag = f"step{self.global_step}"
        fsdp_checkpoint.save(os.path.join(directory, tag), self.qsr, extra={"train": json.dumps(extra)})
        if dist.get_rank() == 0:  # dcp.save returns on rank 0 once every rank's files are written
            checkpoint.write_latest(directory, tag)
        dist.barrier()

    def load(self, directory: str) -> dict | None:
        tag = checkpoint.read_latest(directory)
        if tag is None:
            return None
        extra = fsdp_checkpoint.load(os.path.join(directory, tag), self.qsr, extra={"train": ""})
        return json.loads(extra["train"])

    def report(self) -> dict:
        totals, averager = self.qsr.totals, self.qsr.averager
        return {"replica": self.replica, "shard": self.shard, "bytes": totals.bytes, "rounds": totals.rounds,
                "sync_s": totals.total_s, "bytes_per_round": averager.bytes_per_round if averager else 0,
                "round_memory_bytes": self.qsr.round_memory_bytes, **round_split(totals)}

    def fingerprint(self) -> str:
        """sha256 of this replica's full fp32 params (gathered over the shard group; summary only)."""
        return qsr_ds.fingerprint(self.model)

    def describe(self) -> str:
        return f"FSDP2 {'HSDP (no QSR)' if self.hsdp else 'fully_shard'}{' bf16' if self.bf16 else ''}"
