"""Local AdamW with QSR in plain PyTorch (no DeepSpeed, no FSDP).

    torchrun --nproc_per_node 4 examples/local_sgd.py --ranks-per-replica 1

Each replica fits the same teacher network on its own stream of generated data; with
S > 1 a replica is a DDP model over its shard group. Prints a summary on rank 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from qsr_ds import LocalOptimizer, SyncSchedule, Topology


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks-per-replica", type=int, default=1, help="S; R = world size / S")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--hidden", type=int, default=256, help="width of the MLP (2048 with 7 layers: ~25M params)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--rule", default="qsr")
    p.add_argument("--h-base", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.02)
    p.add_argument("--kernel", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summary-json", default=None)
    return p.parse_args(argv)


def cosine_lr(args):
    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))

    return lr_at


def mlp(width: int, layers: int) -> nn.Module:
    blocks = [nn.Linear(32, width), nn.GELU()]
    for _ in range(layers - 2):
        blocks += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*blocks, nn.Linear(width, 1))


def batch(seed: int, step: int, replica: int, shard: int, teacher: nn.Module):
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + replica) * 131 + shard)
    x = torch.randn(64, 32, generator=gen)
    with torch.no_grad():
        return x, teacher(x)


def main(argv=None) -> dict:
    args = parse_args(argv)
    dist.init_process_group("gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    topo = Topology.create(args.ranks_per_replica)
    torch.manual_seed(1234)
    teacher = mlp(64, 3)
    torch.manual_seed(args.seed)
    model = mlp(args.hidden, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    lr_at = cosine_lr(args)
    opt = torch.optim.AdamW(model.parameters(), lr=lr_at(0), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s) / lr_at(0))
    if topo.ranks_per_replica > 1:
        model = nn.parallel.DistributedDataParallel(model, process_group=topo.shard_group)
    schedule = SyncSchedule(rule=args.rule, h_base=args.h_base, alpha=args.alpha, warmup_steps=args.warmup,
                            total_steps=args.steps, switch_step=args.warmup if args.rule == "post_local" else None)
    local = LocalOptimizer(opt, model, schedule=schedule, topology=topo, lr_scheduler=sched, kernel=args.kernel)
    bar = tqdm(range(args.steps), disable=topo.rank != 0, desc=f"R={topo.num_replicas} S={topo.ranks_per_replica}")
    start, first_loss = time.perf_counter(), None
    for step in bar:
        x, y = batch(args.seed, step, topo.replica_index, topo.shard_rank, teacher)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        local.step()
        local.zero_grad()
        first_loss = loss.item() if first_loss is None else first_loss
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{local.current_lr():.2e}", H=local.tracker.current_h,
                        rounds=local.rounds)
    wall = time.perf_counter() - start
    totals = local.averager.totals
    summary = {
        "world_size": topo.world_size, "replicas": topo.num_replicas, "ranks_per_replica": topo.ranks_per_replica,
        "params": n_params, "steps": args.steps, "rounds": local.rounds,
        "planned_rounds": len(schedule.boundaries(lr_at)),
        "bytes_across_replicas": totals.bytes, "bytes_data_parallel": 4 * n_params * args.steps,
        "sync_seconds": totals.total_s, "pack_seconds": totals.pack_s, "comm_seconds": totals.comm_s,
        "unpack_seconds": totals.unpack_s, "wall_seconds": wall, "first_loss": first_loss, "final_loss": loss.item(),
        "kernel": local.averager.kernel_names,
    }
    if topo.rank == 0:
        print("\nqsr-ds local SGD summary")
        for key, value in summary.items():
            print(f"  {key:22s} {value:.4g}" if isinstance(value, float) else f"  {key:22s} {value}")
        if topo.num_replicas > 1:
            print(f"  bytes vs data parallel {summary['bytes_across_replicas'] / summary['bytes_data_parallel']:.3f}")
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
    dist.destroy_process_group()
    os._exit(0)  # gloo can abort at interpreter exit
