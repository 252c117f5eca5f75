"""What both sync-round benchmarks build on: the parameter sets they average and the machine they ran on.

benchmarks/sync_round.py (loopback, per kernel back-end) and benchmarks/sync_round_link.py
(two namespaces over a shaped link) import this module; neither imports the other's helpers.
"""
from __future__ import annotations

import os
import platform

import torch


def gpt_shapes(d: int, layers: int, vocab: int, context: int = 1024) -> list[tuple[str, tuple]]:
    """The parameter shapes of a GPT-2-style model: embeddings, ``layers`` blocks, final norm."""
    shapes = [("wte", (vocab, d)), ("wpe", (context, d))]
    for i in range(layers):
        p = f"h{i}."
        shapes += [(p + "ln1.w", (d,)), (p + "ln1.b", (d,)), (p + "qkv.w", (3 * d, d)), (p + "qkv.b", (3 * d,)),
                   (p + "proj.w", (d, d)), (p + "proj.b", (d,)), (p + "ln2.w", (d,)), (p + "ln2.b", (d,)),
                   (p + "fc.w", (4 * d, d)), (p + "fc.b", (4 * d,)), (p + "fc2.w", (d, 4 * d)), (p + "fc2.b", (d,))]
    return shapes + [("ln_f.w", (d,)), ("ln_f.b", (d,))]


def fresh(shapes, seed: int) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of these shapes, small random values from ``seed`` (one rank's replica)."""
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.randn(s, generator=gen) * 0.02) for n, s in shapes]


def machine() -> dict:
    """CPU model, core count, torch and Python versions, load average now: a run's ``meta``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_after_run": load}
