"""The simulation behind benchmarks/accuracy.py (whose docstring describes the data, the model and the methods).

Here: the methods and their labels, Config and the two REGIMES, the data (corpus, split, one
replica's Stream), the byte MLP, the LR and each method's sync schedule, and ``run``: one
method with one seed, its R replicas in this process, rounds applied by
benchmarks/accuracy_rounds.py. benchmarks/accuracy.py runs the study over regimes, methods
and seeds; benchmarks/accuracy_report.py summarizes and reports it;
tests/dist/test_accuracy_sim.py checks ``run`` against ``qsr_ds.LocalOptimizer`` on gloo ranks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.accuracy_rounds import ReplicaRounds, RoundVariant
from qsr_ds.sync.layout import flatten_into_buffer
from qsr_ds.schedule import SyncSchedule, SyncTracker

# QSR (gamma 2) with overlapped or compressed rounds: the same schedule, other round arithmetic
VARIANTS = {
    "qsr_overlap1": RoundVariant(overlap_steps=1),
    "qsr_overlap4": RoundVariant(overlap_steps=4),
    "qsr_bf16": RoundVariant(compress="bf16"),
    "qsr_int8": RoundVariant(compress="int8"),
    "qsr_overlap1_int8": RoundVariant(overlap_steps=1, compress="int8"),
}
METHODS = ("dp", "const_base", "const_large", "post_local", "qsr", "qsr_g1", "qsr_g3", *VARIANTS)
LABELS = {
    "dp": "data parallel",
    "const_base": "constant H = H_base",
    "const_large": "constant H = H_large",
    "post_local": "post-local SGD",
    "qsr": "QSR (gamma 2)",
    "qsr_g1": "QSR gamma 1 (linear)",
    "qsr_g3": "QSR gamma 3 (cubic)",
    "qsr_overlap1": "QSR, overlapped tau = 1",
    "qsr_overlap4": "QSR, overlapped tau = 4",
    "qsr_bf16": "QSR, bf16 rounds",
    "qsr_int8": "QSR, int8 rounds",
    "qsr_overlap1_int8": "QSR, tau = 1 and int8",
}


@dataclass
class Config:
    replicas: int = 4
    context: int = 24
    embed: int = 24
    hidden: int = 128
    batch: int = 32
    """Per replica; data parallel's global batch is replicas x batch."""
    steps: int = 2000
    warmup: int = 100
    lr: float = 1e-2
    """Peak LR; linear warm-up from lr / warmup, then cosine to min_lr."""
    min_lr: float = 1e-5
    optimizer: str = "adamw"
    """adamw (Local AdamW) or sgd (Local SGD with heavy-ball momentum)."""
    momentum: float = 0.9
    weight_decay: float = 0.1
    h_base: int = 4
    alpha: float = 2e-2
    """QSR gamma 2: H = max(h_base, (alpha / lr) ** 2)."""
    h_large: int = 0
    """Constant large H; 0: steps / (QSR's rounds), i.e. QSR's communication volume."""
    post_local_switch: float = 0.5
    """post-local: H = 1 for this fraction of the steps, then H_large."""
    eval_every: int = 250
    eval_positions: int = 4096
    """Validation positions (evenly spaced) for the curves."""
    final_positions: int = 0
    """Validation positions for the final numbers; 0: all of them."""
    train_bytes: int = 0
    """Train on only the first this many training bytes (0: all of them): a data-limited regime."""
    seeds: tuple = (0, 1, 2)
    methods: tuple = METHODS


SMOKE = dict(context=8, embed=8, hidden=32, batch=8, steps=40, warmup=4, eval_every=20, eval_positions=256,
             final_positions=2048,
             lr=1e-2, alpha=2e-2, min_lr=1e-4, seeds=(0, 1))

# The peak LR of each regime is the best of {3e-3, 1e-2, 2e-2, 4e-2} for data parallel (seed 0,
# see accuracy.md); every method shares it, and alpha = 2 x peak LR (the paper's ViT-B run has
# 0.0175 / 0.008 = 2.2), so QSR's H starts to grow as soon as the LR decays.
REGIMES = {
    "one_pass": {"about": "the whole training text, under one pass (compute-limited)",
                 "overrides": {"lr": 1e-2, "alpha": 2e-2}},
    "multi_epoch": {"about": "the first 50 KB of the training text, several epochs (data-limited)",
                    "overrides": {"train_bytes": 50_000, "lr": 2e-2, "alpha": 4e-2}},
}


def config_args(d: dict) -> dict:
    """Config keyword arguments from a config as the JSON holds it (its lists back to tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


# ---------------------------------------------------------------------------- data


def corpus() -> bytes:
    """The main job's corpus (examples/gpt.py): CPython's pydoc help texts, sorted by topic,
    joined by blank lines, as UTF-8 bytes."""
    from examples.gpt import corpus_bytes

    return corpus_bytes()


def split(data: bytes, train_fraction: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """Train / validation bytes by position, the main job's split (examples/gpt.py ByteCorpus)."""
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    cut = int(len(t) * train_fraction)
    return t[:cut].clone(), t[cut:].clone()


def windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = data[starts[:, None] + torch.arange(context + 1)].long()
    return w[:, :context], w[:, context]


class Stream:
    """One replica's training batches: uniform random windows from its own generator."""

    def __init__(self, train: torch.Tensor, cfg: Config, seed: int, replica: int) -> None:
        self.train, self.cfg = train, cfg
        self.gen = torch.Generator().manual_seed(1_000_003 * (seed + 1) + replica)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.train) - self.cfg.context, (self.cfg.batch,), generator=self.gen)
        return windows(self.train, starts, self.cfg.context)


# ---------------------------------------------------------------------------- model, lr


class ByteMLP(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, cfg.embed)
        self.body = nn.Sequential(
            nn.Linear(cfg.context * cfg.embed, cfg.hidden), nn.GELU(),
            nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(),
            nn.Linear(cfg.hidden, 256),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.embed(x).flatten(1))


def build(cfg: Config, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = ByteMLP(cfg)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr_fn(cfg)(0), momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr_fn(cfg)(0), weight_decay=cfg.weight_decay)
    return model, opt


def lr_fn(cfg: Config):
    """The LR 0-based step ``s`` uses: linear warm-up to cfg.lr, cosine to cfg.min_lr."""

    def lr_at(s: int) -> float:
        if s < cfg.warmup:
            return cfg.lr * (s + 1) / cfg.warmup
        progress = min(1.0, (s - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))

    return lr_at


class SetLR:
    """An lr scheduler that writes lr_at(step) into the optimizer (same floats in every path)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_at) -> None:
        self.optimizer, self.lr_at, self.steps = optimizer, lr_at, 0
        self._write()

    def _write(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.steps)

    def step(self) -> None:
        self.steps += 1
        self._write()


# ---------------------------------------------------------------------------- schedules


def schedule_for(method: str, cfg: Config) -> SyncSchedule | None:
    """The sync schedule of a method; None for data parallel (gradients averaged every step)."""
    common = dict(warmup_steps=cfg.warmup, total_steps=cfg.steps)
    if method == "dp":
        return None
    if method == "const_base":
        return SyncSchedule(rule="constant", h_base=cfg.h_base, **common)
    if method == "const_large":
        return SyncSchedule(rule="constant", h_base=h_large(cfg), **common)
    if method == "post_local":
        return SyncSchedule(rule="post_local", h_base=h_large(cfg),
                            switch_step=int(cfg.steps * cfg.post_local_switch), **common)
    gamma = {"qsr_g1": 1.0, "qsr_g3": 3.0}.get(method, 2.0)  # "qsr" and its VARIANTS: gamma 2
    return SyncSchedule(rule="qsr", gamma=gamma, h_base=cfg.h_base, alpha=alpha_for(gamma, cfg), **common)


def alpha_for(gamma: float, cfg: Config) -> float:
    """Alpha for exponent gamma such that H leaves H_base at the same LR as gamma 2 does."""
    onset_lr = cfg.alpha / math.sqrt(cfg.h_base)
    return onset_lr * cfg.h_base ** (1.0 / gamma)


def h_large(cfg: Config) -> int:
    if cfg.h_large:
        return cfg.h_large
    qsr = SyncSchedule(rule="qsr", h_base=cfg.h_base, alpha=cfg.alpha, warmup_steps=cfg.warmup, total_steps=cfg.steps)
    return max(cfg.h_base, round(cfg.steps / len(qsr.rounds(lr_fn(cfg)))))


# ---------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, cfg: Config, count: int | None = None) -> tuple[float, float]:
    """(mean cross-entropy in nats, next-byte accuracy) over ``count`` evenly spaced windows."""
    n = len(data) - cfg.context
    starts = torch.arange(n) if count is None or count >= n else torch.linspace(0, n - 1, count).long()
    loss = correct = 0.0
    for chunk in starts.split(8192):
        x, y = windows(data, chunk, cfg.context)
        logits = model(x)
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return loss / len(starts), correct / len(starts)


def run(method: str, seed: int, cfg: Config, train: torch.Tensor, val: torch.Tensor, *, curves: bool = True) -> dict:
    """Train one method with one seed; returns final metrics, rounds and curves."""
    lr_at = lr_fn(cfg)
    schedule = schedule_for(method, cfg)
    n_models = 1 if schedule is None else cfg.replicas
    models, opts = zip(*(build(cfg, seed) for _ in range(n_models)))
    flats = [flatten_into_buffer(list(m.parameters())) for m in models]
    lrs = [SetLR(o, lr_at) for o in opts]
    streams = [Stream(train, cfg, seed, r) for r in range(cfg.replicas)]
    tracker = SyncTracker(schedule, lr_at(0)) if schedule is not None else None
    replica_rounds = ReplicaRounds(flats, VARIANTS.get(method, RoundVariant())) if n_models > 1 else None
    probe = ByteMLP(cfg) if n_models > 1 else models[0]
    probe_flat = flatten_into_buffer(list(probe.parameters())) if n_models > 1 else flats[0]
    curve, boundaries, train_loss, seen = [], [], 0.0, 0
    start = time.perf_counter()

    def record(step: int) -> None:
        nonlocal train_loss, seen
        if n_models > 1:  # the replicas' mean (what an average now would give); training is untouched
            with torch.no_grad():
                probe_flat.copy_(torch.stack(flats).mean(0))
        loss, acc = evaluate(probe, val, cfg, cfg.eval_positions)
        rounds = step if tracker is None else tracker.rounds_done
        curve.append({"step": step, "rounds": rounds, "val_loss": loss, "val_acc": acc,
                      "train_loss": train_loss / max(1, seen), "lr": lr_at(min(step, cfg.steps - 1))})
        train_loss, seen = 0.0, 0

    for step in range(cfg.steps):
        if curves and step % cfg.eval_every == 0:
            record(step)
        batches = [s.next() for s in streams]
        if schedule is None:
            x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            batches = [(x, y)]
        for model, opt, sched, (x, y) in zip(models, opts, lrs, batches):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            train_loss += loss.item() / n_models
        seen += 1
        if tracker is not None and tracker.on_step(lr_at(step + 1)):
            replica_rounds.boundary(tracker.current_h, tracker.finished)
            boundaries.append(tracker.completed_steps)
        elif replica_rounds is not None:
            replica_rounds.after_step(step + 1)
    if curves:
        record(cfg.steps)
    train_s = time.perf_counter() - start
    assert all(torch.equal(f, flats[0]) for f in flats) or not flats[0].isfinite().all(), "must end on an average"
    val_loss, val_acc = evaluate(models[0], val, cfg, cfg.final_positions or None)
    fit_loss, fit_acc = evaluate(models[0], train, cfg, 2 * cfg.eval_positions)
    return {
        "method": method, "seed": seed, "rounds": cfg.steps if tracker is None else tracker.rounds_done,
        "val_loss": val_loss, "val_acc": val_acc, "train_loss": fit_loss, "train_acc": fit_acc,
        "train_seconds": train_s, "boundaries": boundaries, "curve": curve, "params": flats[0].clone(),
        "overlapped_rounds": replica_rounds.overlapped if replica_rounds else 0,
        "applied_at": replica_rounds.applied_at if replica_rounds else [],
    }
