"""The main job: a small byte-level GPT trained by R replicas x S ranks with QSR.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 4 examples/train_gpt.py --deepspeed_config configs/qsr.json
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 4 examples/train_gpt.py --deepspeed_config configs/qsr.json
    torchrun --nproc_per_node 4 examples/train_gpt.py --fsdp --ranks-per-replica 2   (FSDP2, examples/fsdp_engine.py)

Inside a replica DeepSpeed (ZeRO stage from the JSON) runs as usual over S ranks; across
replicas nothing is sent until a QSR boundary. Rank 0 shows a progress bar (loss, lr, H,
rounds) and prints a summary at the end; --summary-json writes it as JSON.

The engine-specific part sits behind the Trainer interface (DeepSpeedTrainer below): model,
data, progress bar, checkpoint cadence and summary are shared, so another engine (FSDP2 under
torchrun) only needs a Trainer of its own.

Optimizer: if the JSON has an "optimizer" section (AdamW / Adam), the example builds the
torch optimizer from its params and removes the section from the config handed to DeepSpeed
(DeepSpeed would otherwise build its fused / cpu_adam op, a slow compile on CPU). The
"scheduler" section stays with DeepSpeed (it sets the learning rate every step).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import GPT, ByteCorpus, GPTConfig, param_groups  # noqa: E402

import qsr_ds  # noqa: E402

from qsr_ds.sync.averager import ROUND_PARTS, round_split  # noqa: E402

EVAL_BATCHES = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default="configs/qsr.json",
                   help="DeepSpeed JSON with a \"qsr\" section (default: configs/qsr.json)")
    p.add_argument("--ranks-per-replica", type=int, help="S; overrides qsr.ranks_per_replica of the JSON")
    p.add_argument("--zero-init", action="store_true",
                   help="build the model under qsr_ds.zero_init (ZeRO-3: parameters partitioned as they are created)")
    p.add_argument("--fsdp", action="store_true",
                   help="FSDP2 inside each replica instead of DeepSpeed (same JSON, data and summary; needs torchrun)")
    p.add_argument("--hsdp", action="store_true",
                   help="with --fsdp: plain FSDP2 HSDP data parallel over the replicas, no QSR (a benchmark baseline)")
    p.add_argument("--steps", type=int, help="stop after this many optimizer steps (default: qsr.total_steps)")
    p.add_argument("--save-dir", help="checkpoint directory")
    p.add_argument("--save-every", type=int, default=0, help="save every N steps (and at the end) when > 0")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --save-dir")
    p.add_argument("--seed", type=int, default=0, help="model init and data order (data = f(seed, step, replica, rank))")
    p.add_argument("--summary-json", help="write the summary here (rank 0)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="keep DeepSpeed's own log lines")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    if args.resume and not args.save_dir:
        p.error("--resume needs --save-dir")
    if args.hsdp and (not args.fsdp or args.save_dir):
        p.error("--hsdp needs --fsdp and takes no --save-dir")
    if args.zero_init and args.fsdp:
        p.error("--zero-init is for DeepSpeed ZeRO-3, not --fsdp")
    return args


def load_json(path: str) -> dict:
    from qsr_ds.config import read_json

    return read_json(path)


class DeepSpeedTrainer:
    """The DeepSpeed side of the job. The interface every Trainer offers:

    replica, shard, num_replicas, ranks_per_replica, micro_batch, grad_accum, zero_stage, global_step;
    lr, h, rounds (properties); planned_boundaries(steps) -> list[int] | None;
    train_step(batches) -> loss of this rank; evaluate(batches) -> loss;
    save(dir, extra), load(dir) -> extra | None; report() -> per-rank dict (bytes, sync
    seconds, rounds); fingerprint() -> sha256 of this replica's fp32 params (collective).
    """

    engine_name = "deepspeed"

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module) -> None:
        import qsr_ds
        from qsr_ds.config import load as load_qsr

        self.source = args.deepspeed_config
        config = load_json(self.source)
        load_qsr(self.source, required=False)  # a bad "qsr" section fails here, naming the file
        if "qsr" not in config:
            raise SystemExit(f"{self.source}: no \"qsr\" section; this example trains replicas with QSR")
        config = copy.deepcopy(config)
        if args.ranks_per_replica is not None:
            config["qsr"]["ranks_per_replica"] = args.ranks_per_replica
        if not args.verbose:
            config.setdefault("steps_per_print", 10**9)
        self.config = config
        ds_config = dict(config)
        opt_section = ds_config.pop("optimizer", None) or {"type": "AdamW", "params": {}}
        if opt_section.get("type", "AdamW").lower() not in ("adamw", "adam"):
            raise SystemExit(f"{self.source}: optimizer.type {opt_section.get('type')!r}: this example builds AdamW/Adam")
        params = dict(opt_section.get("params", {}))
        self.base_lr = float(params.get("lr", 1e-3))
        weight_decay = float(params.pop("weight_decay", 0.01 if opt_section.get("type", "AdamW").lower() == "adamw" else 0.0))
        kwargs = {k: (tuple(v) if k == "betas" else v) for k, v in params.items() if k in ("lr", "betas", "eps")}
        optimizer = torch.optim.AdamW(param_groups(model, weight_decay), **kwargs)
        self.engine, _, _, _ = qsr_ds.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.qsr = self.engine.qsr
        topo = self.qsr.topology
        self.replica, self.shard = topo.replica_index, topo.shard_rank
        self.num_replicas, self.ranks_per_replica = topo.num_replicas, topo.ranks_per_replica
        self.micro_batch = self.engine.train_micro_batch_size_per_gpu()
        self.grad_accum = self.engine.gradient_accumulation_steps()
        self.zero_stage = self.engine.zero_optimization_stage()
        self.bf16 = self.engine.bfloat16_enabled()
        self.dtype = torch.bfloat16 if self.bf16 else (torch.float16 if self.engine.fp16_enabled() else torch.float32)

    @property
    def total_steps(self) -> int:
        return self.qsr.tracker.schedule.total_steps

    @property
    def global_step(self) -> int:
        return self.engine.global_steps

    @property
    def lr(self) -> float:
        return self.qsr.current_lr()

    @property
    def h(self) -> int:
        return self.qsr.tracker.current_h

    @property
    def rounds(self) -> int:
        return self.qsr.rounds

    def planned_boundaries(self) -> list[int] | None:
        """Boundaries of the whole run from the JSON's scheduler, computed without an engine."""
        from qsr_ds.config import QSRConfigError
        from qsr_ds.planning.lr import lr_fn_from_deepspeed

        try:
            lr_at = lr_fn_from_deepspeed(self.config, self.source, base_lr=self.base_lr)
        except QSRConfigError:
            return None
        return self.qsr.tracker.schedule.boundaries(lr_at)

    def train_step(self, batches) -> float:
        """One optimizer step over grad_accum micro-batches; averages at a boundary."""
        losses = []
        for x, y in batches:
            loss = self.engine(x.to(self.engine.device), y.to(self.engine.device))
            self.engine.backward(loss)
            self.engine.step()
            losses.append(float(loss.detach()))
        return sum(losses) / len(losses)

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        was_training = self.engine.module.training
        self.engine.eval()
        losses = [float(self.engine(x.to(self.engine.device), y.to(self.engine.device))) for x, y in batches]
        self.engine.train(was_training)
        return sum(losses) / len(losses)

    def save(self, directory: str, extra: dict) -> None:
        self.engine.save_checkpoint(directory, tag=f"step{self.global_step}", client_state={"train": extra})

    def load(self, directory: str) -> dict | None:
        path, client = self.engine.load_checkpoint(directory)
        return None if path is None else client.get("train", {})

    def report(self) -> dict:
        totals = self.qsr.totals
        bytes_per_round = self.qsr.averager.bytes_per_round if self.qsr.averager else 0
        return {"replica": self.replica, "shard": self.shard, "bytes": totals.bytes, "rounds": totals.rounds,
                "sync_s": totals.total_s, "bytes_per_round": bytes_per_round,
                "round_memory_bytes": self.qsr.round_memory_bytes, **round_split(totals)}

    def fingerprint(self) -> str:

        return qsr_ds.fingerprint(self.engine)

    def describe(self) -> str:
        return f"DeepSpeed ZeRO-{self.zero_stage}{' bf16' if self.bf16 else ''}"


class Progress:
    """tqdm on rank 0 (plain lines when tqdm is missing or disabled)."""

    def __init__(self, enabled: bool, start: int, total: int) -> None:
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=0.5)
            except ImportError:
                pass

    def update(self, step: int, loss: float, lr: float, h: int, rounds: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f} lr {lr:.2e} H {h} rounds {rounds}", refresh=False)
            self.bar.update(1)
        elif self.enabled and step % 20 == 0:
            print(f"step {step} loss {loss:.3f} lr {lr:.2e} H {h} rounds {rounds}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _set_threads() -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def _quiet(verbose: bool) -> None:
    if not verbose:
        import warnings

        from deepspeed.utils import logger

        logger.setLevel(logging.WARNING)
        # DeepSpeed 0.19 calls collectives torch 2.13 has renamed; one warning per call site and rank
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def run(args: argparse.Namespace, make_trainer=DeepSpeedTrainer) -> dict | None:
    _set_threads()
    if not getattr(args, "fsdp", False):  # --fsdp neither needs nor imports DeepSpeed
        _quiet(args.verbose)
    torch.manual_seed(args.seed)
    cfg = GPTConfig(seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model)
    if getattr(args, "zero_init", False):
        import qsr_ds

        config = load_json(args.deepspeed_config)
        if config.get("zero_optimization", {}).get("stage") != 3:
            raise SystemExit(f"--zero-init: {args.deepspeed_config} must set zero_optimization.stage 3")
        if args.ranks_per_replica is not None and "qsr" in config:  # the S DeepSpeedTrainer gives initialize
            config["qsr"]["ranks_per_replica"] = args.ranks_per_replica
        with qsr_ds.zero_init(config):
            model = GPT(cfg)
    else:
        model = GPT(cfg)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    trainer = make_trainer(args, model)
    rank = dist.get_rank()
    steps = args.steps if args.steps is not None else trainer.total_steps
    if not 0 < steps <= trainer.total_steps:
        raise SystemExit(f"--steps {steps}: must be in 1..qsr.total_steps={trainer.total_steps} of {args.deepspeed_config}")
    corpus = ByteCorpus()

    def batches(step: int, split: str = "train"):
        return [corpus.batch(seed=args.seed, step=step * trainer.grad_accum + m, replica=trainer.replica,
                             shard=trainer.shard, batch_size=trainer.micro_batch, seq_len=cfg.seq_len, split=split)
                for m in range(trainer.grad_accum)]

    # a fixed validation set, the same on every rank (no communication needed to evaluate)
    val = [corpus.batch(seed=args.seed, step=i, replica=0, shard=0, batch_size=trainer.micro_batch,
                        seq_len=cfg.seq_len, split="val") for i in range(EVAL_BATCHES)]
    state = None
    if args.resume:
        state = trainer.load(args.save_dir)
        if state is None and rank == 0:
            print(f"[train_gpt] no checkpoint in {args.save_dir}; starting from step 0", flush=True)
    state = state or {"first_loss": trainer.evaluate(val), "train_s": 0.0, "steps_timed": 0}
    start = trainer.global_step
    if rank == 0:
        print(f"[train_gpt] {trainer.describe()}, {trainer.num_replicas} replica(s) x {trainer.ranks_per_replica} "
              f"rank(s), GPT {n_params / 1e6:.2f}M params, seq {cfg.seq_len}, micro batch {trainer.micro_batch}, "
              f"steps {start}->{steps}, corpus pydoc_data.topics {len(corpus.train)} train bytes", flush=True)
    progress = Progress(rank == 0 and not args.no_progress, start, steps)
    loss = math.nan
    t0 = time.perf_counter()
    for step in range(start, steps):
        loss = trainer.train_step(batches(step))
        progress.update(step + 1, loss, trainer.lr, trainer.h, trainer.rounds)
        done = step + 1
        if args.save_dir and args.save_every > 0 and (done % args.save_every == 0 or done == steps):
            state["train_s"] += time.perf_counter() - t0
            state["steps_timed"] += done - start
            trainer.save(args.save_dir, state)
            t0, start = time.perf_counter(), done
    progress.close()
    state["train_s"] += time.perf_counter() - t0
    state["steps_timed"] += steps - start
    final_loss = trainer.evaluate(val)
    fingerprint = trainer.fingerprint()
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, dict(trainer.report(), fingerprint=fingerprint))
    if rank != 0:
        return None
    summary = _summary(args, trainer, reports, state, steps, final_loss, loss, n_params)
    _print_summary(summary)
    if args.summary_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.summary_json)), exist_ok=True)
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def _summary(args, trainer, reports, state, steps, final_loss, last_train_loss, n_params) -> dict:
    replica0 = [r for r in reports if r["replica"] == 0]
    bytes_per_round = sum(r["bytes_per_round"] for r in replica0)  # one replica's fp32 state
    rounds = trainer.rounds
    planned = trainer.planned_boundaries()
    rank0 = reports[0]
    return {
        "engine": trainer.engine_name,
        "zero_stage": trainer.zero_stage,
        "config": args.deepspeed_config,
        "num_replicas": trainer.num_replicas,
        "ranks_per_replica": trainer.ranks_per_replica,
        "world_size": len(reports),
        "params": n_params,
        "seed": args.seed,
        "steps": steps,
        "rounds": rounds,
        "planned_rounds": None if planned is None else sum(1 for b in planned if b <= steps),
        # fp32 bytes one replica puts into all-reduces across replicas (QSR), and what it would
        # all-reduce if the replicas were synchronized every step (data parallel across replicas)
        "bytes_across_replicas": sum(r["bytes"] for r in replica0),
        "bytes_data_parallel": steps * bytes_per_round,
        "sync_seconds": rank0["sync_s"],
        # where the rounds' time went on rank 0: waiting in the pre-check for the slowest replica,
        # all-reduce waits, packing / unpacking, refreshing the engine's copies inside the replica
        "sync_split_seconds": {k: rank0[k] for k in ROUND_PARTS},
        "seconds_per_round": rank0["sync_s"] / rank0["rounds"] if rank0["rounds"] else None,
        # what the rounds hold beyond the engine's state, on the rank holding most (scratch; an
        # overlapped round's snapshot; a compressed round's anchors and residuals)
        "round_memory_bytes_per_rank": max(r.get("round_memory_bytes", 0) for r in reports),
        "seconds_per_step": state["train_s"] / state["steps_timed"] if state["steps_timed"] else None,
        "train_seconds_this_run": state["train_s"],
        "first_loss": state["first_loss"],
        "final_loss": final_loss,
        "last_train_loss": last_train_loss,
        "replica_fingerprints": [next(r["fingerprint"] for r in reports if r["replica"] == i and r["shard"] == 0)
                                 for i in range(trainer.num_replicas)],
    }


def _print_summary(s: dict) -> None:
    same = len(set(s["replica_fingerprints"])) == 1
    saved = 1 - s["bytes_across_replicas"] / s["bytes_data_parallel"] if s["bytes_data_parallel"] else 0.0
    lines = [
        f"steps {s['steps']}  rounds {s['rounds']} (planned {s['planned_rounds']})  "
        f"{s['num_replicas']} replicas x {s['ranks_per_replica']} ranks, {s['engine']} ZeRO-{s['zero_stage']}",
        f"bytes across replicas {s['bytes_across_replicas'] / 1e6:.1f} MB vs data parallel "
        f"{s['bytes_data_parallel'] / 1e6:.1f} MB ({saved:.1%} less)",
        f"time in sync {s['sync_seconds']:.2f} s ({(s['seconds_per_round'] or 0) * 1e3:.1f} ms/round), "
        f"{(s['seconds_per_step'] or 0) * 1e3:.0f} ms/step",
        "  of which " + ", ".join(f"{label} {s['sync_split_seconds'][key]:.2f} s" for key, label in (
            ("check_s", "waiting for the slowest replica"), ("comm_s", "all-reduce"), ("pack_s", "pack"),
            ("unpack_s", "unpack"), ("refresh_s", "refresh inside the replica"))),
        f"validation loss {s['first_loss']:.4f} -> {s['final_loss']:.4f} (last train loss {s['last_train_loss']:.4f})",
        "replica fingerprints (sha256 of fp32 params): "
        + ", ".join(f[:16] for f in s["replica_fingerprints"]) + (" (identical)" if same else " (DIFFER)"),
    ]
    print("\n== summary ==\n" + "\n".join(lines), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    code = 0
    try:
        if args.fsdp:
            from fsdp_engine import FSDPTrainer

            run(args, FSDPTrainer)
        else:
            run(args)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
        if not isinstance(err.code, int) and err.code:
            print(err.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - print, then leave without gloo's exit-time abort
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0 and dist.is_initialized():
        dist.destroy_process_group()
    os._exit(code)


if __name__ == "__main__":
    main()
