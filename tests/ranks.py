"""Run a function on N local gloo ranks in spawned processes (tests, examples, benchmarks).

Each rank's return value (or exception text) comes back to the caller; a rank that dies
or hangs past ``timeout_s`` fails the whole run instead of hanging it.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str, env: dict) -> None:
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    result: Any
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = ("ok", fn(rank, world_size, *args))
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the parent
        result = ("error", f"rank {rank}: {type(err).__name__}: {err}\n{traceback.format_exc()}")
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        os._exit(0)  # gloo can abort at interpreter exit


class RankFailure(RuntimeError):
    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        super().__init__("\n".join(f"{text}" for _, text in sorted(errors.items())))


def run_ranks(
    fn: Callable, world_size: int, *args, timeout_s: float = 120.0, env: dict | None = None, missing_ok: bool = False
) -> list:
    """``fn(rank, world_size, *args)`` on every rank; returns the results ordered by rank.

    Raises RankFailure with each failing rank's traceback. With ``missing_ok`` a rank that
    exits without a result (a fault-injection test killing it on purpose) gives None.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, fn, args, out_dir, dict(env or {})), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        results, errors = [], {}
        for r in range(world_size):
            path = os.path.join(out_dir, f"{r}.pkl")
            if r in hung:
                errors[r] = f"rank {r}: still running after {timeout_s} s (killed)"
            elif not os.path.exists(path):
                if not missing_ok:
                    errors[r] = f"rank {r}: died without a result (exit code {procs[r].exitcode})"
                results.append(None)
            else:
                with open(path, "rb") as f:
                    status, value = pickle.load(f)
                if status == "error":
                    errors[r] = value
                results.append(value)
        if errors:
            raise RankFailure(errors)
        return results


def deepspeed_fp16_missing() -> str | None:
    """Why DeepSpeed cannot build an fp16 engine on this host, or None where it can.

    DeepSpeed's CPU accelerator offers fp16 only where oneDNN has fp16 kernels (x86 CPUs
    with AVX512-FP16 or AMX-FP16, e.g. Intel Sapphire Rapids); elsewhere (AMD EPYC, older
    Intel) an fp16 engine fails with "Type fp16 is not supported on your device". Tests
    whose subject is fp16 skip with this reason; everything else runs in fp32 or bf16.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.is_fp16_supported():
        return None
    name = accelerator.device_name()
    if name == "cpu":
        return ("DeepSpeed's CPU accelerator has no fp16 on this host: oneDNN needs AVX512-FP16 or AMX-FP16 "
                "for fp16 kernels (get_accelerator().is_fp16_supported() is falsy)")
    return f"DeepSpeed's {name} accelerator reports no fp16 support (get_accelerator().is_fp16_supported() is falsy)"
