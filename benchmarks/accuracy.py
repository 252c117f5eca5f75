#!/usr/bin/env python
"""Accuracy of Local AdamW under QSR and its baselines on a small byte-level language model.

    python benchmarks/accuracy.py                 # every method: 2 regimes x 12 methods x 3 seeds
    python benchmarks/accuracy.py --methods qsr qsr_int8   # these rows again, merged into the committed JSON
    python benchmarks/accuracy.py --smoke --out-dir /tmp/acc    # tiny sizes, < 30 s
    python benchmarks/accuracy.py --report-only   # plots and .md again from the JSON

Data: the English help texts that ship with CPython (``pydoc_data.topics``), sorted by key,
joined, byte level (vocabulary 256); the first 90 % by position is training data, the
last 10 % validation. Model: a byte MLP that predicts the next byte from the previous
``context`` bytes. R replicas are simulated in one process: R model copies, each with its
own AdamW and its own data stream, all from the same initialization. Data parallel is one
model on the R streams' batches together (gradient averaging over R x batch); the local
methods take their steps independently and average parameters when the
``qsr_ds.SyncTracker`` of their ``qsr_ds.SyncSchedule`` closes a round, with the library's
arithmetic (benchmarks/accuracy_rounds.py): exact rounds as ``qsr_ds.ReplicaAverager``,
and for the VARIANTS of QSR overlapped rounds (qsr_ds/overlap.py) and compressed ones
(qsr_ds/compress.py, the torch reference quantize / dequantize kernels).
tests/dist/test_accuracy_sim.py checks this simulation against ``qsr_ds.LocalOptimizer``
on R real gloo ranks. A run merges into the JSON already in --out-dir: its runs replace
those of the same regime, method and seed, the others are kept. Two regimes (REGIMES): the whole training text in under one pass,
and its first 50 KB for several epochs, where the model over-fits.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.accuracy_rounds import ReplicaRounds, RoundVariant, average_replicas_  # noqa: E402,F401
from qsr_ds.layout import flatten_into_buffer  # noqa: E402
from qsr_ds.schedule import SyncSchedule, SyncTracker  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
REPORT = os.path.join(ROOT, "benchmarks", "accuracy.md")
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


# ---------------------------------------------------------------------------- summary, report


def summarize(runs: list[dict], cfg: Config) -> dict:
    out = {}
    for method in cfg.methods:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        mine.sort(key=lambda r: r["seed"])
        row = {"label": LABELS[method], "seeds": [r["seed"] for r in mine], "rounds": mine[0]["rounds"],
               "overlapped_rounds": mine[0].get("overlapped_rounds", 0)}
        for key in ("val_acc", "val_loss", "train_acc", "train_loss"):
            vals = [r[key] for r in mine]
            row[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                        "median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}
        sched = schedule_for(method, cfg)
        if sched is not None:
            hs = [h for _, h in sched.rounds(lr_fn(cfg))]
            row.update(rule=sched.rule, gamma=sched.effective_gamma, alpha=sched.alpha, h_base=sched.h_base,
                       h_first=hs[0], h_max=max(hs), h_last=hs[-1])
        out[method] = row
    return out


def compare(summary: dict, a: str, b: str) -> dict | None:
    """a minus b in validation accuracy, per seed (same seed: same init and data streams)."""
    if a not in summary or b not in summary:
        return None
    va, vb = (dict(zip(summary[m]["seeds"], summary[m]["val_acc"]["values"])) for m in (a, b))
    per_seed = [va[seed] - vb[seed] for seed in sorted(set(va) & set(vb))]
    mean = statistics.fmean(per_seed)
    if mean >= 0:
        state = "holds" if min(per_seed) > 0 else "holds on the mean, not for every seed"
    else:
        state = "does NOT hold" if max(per_seed) < 0 else "does not hold on the mean, not for every seed"
    return {"a": a, "b": b, "mean": mean, "per_seed": per_seed, "state": state}


CLAIMS = (("qsr", "const_base", "QSR >= constant H = H_base"),
          ("qsr", "const_large", "QSR >= constant H = H_large (about QSR's communication)"),
          ("qsr", "dp", "QSR >= data parallel"),
          ("qsr", "post_local", "QSR >= post-local SGD"),
          ("qsr", "qsr_g1", "gamma 2 >= gamma 1"),
          ("qsr", "qsr_g3", "gamma 2 >= gamma 3"))
# the claims that must survive overlapped and compressed rounds
VARIANT_BASELINES = ("const_base", "const_large", "dp")


def variant_claims(summary: dict) -> list[str]:
    """Each variant of QSR against exact QSR and against the baselines QSR is compared with."""
    lines = []
    for v in (m for m in VARIANTS if m in summary):
        c = compare(summary, v, "qsr")
        if c is not None:
            seeds = ", ".join(f"{100 * d:+.2f}" for d in c["per_seed"])
            shown = summary[v]["overlapped_rounds"]
            shown = f" ({shown} of {summary[v]['rounds']} rounds overlapped)" if shown else ""
            lines.append(f"- {LABELS[v]}{shown}: {100 * summary[v]['val_acc']['mean']:.2f} %, exact QSR "
                         f"{100 * summary['qsr']['val_acc']['mean']:.2f} %: {100 * c['mean']:+.2f} points (per seed "
                         f"{seeds}).")
        same, differ = [], []
        for b in VARIANT_BASELINES:
            mine, exact = compare(summary, v, b), compare(summary, "qsr", b)
            if mine is None:
                continue
            text = f"vs {LABELS[b]} {100 * mine['mean']:+.2f} points, {mine['state']}"
            if exact is None or exact["state"] == mine["state"]:
                same.append(text)
            else:
                differ.append(f"{text} (exact QSR: {exact['state']})")
        if same or differ:
            head = "the ordering is the same as exact QSR's" if not differ else "the ordering differs from exact QSR's"
            lines.append(f"  - {head}: " + "; ".join(differ + same) + ".")
    return lines


def verdict(summary: dict) -> list[str]:
    lines = []
    for a, b, what in CLAIMS:
        c = compare(summary, a, b)
        if c is None:
            continue
        seeds = ", ".join(f"{100 * d:+.2f}" for d in c["per_seed"])
        lines.append(f"- {what}: **{c['state']}**: {LABELS[a]} {100 * summary[a]['val_acc']['mean']:.2f} % vs "
                     f"{LABELS[b]} {100 * summary[b]['val_acc']['mean']:.2f} %, difference "
                     f"{100 * c['mean']:+.2f} points (per seed {seeds}).")
    return lines


def plot(runs: list[dict], cfg: Config, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for row, (metric, name) in enumerate((("val_acc", "val next-byte accuracy"), ("val_loss", "val loss (nats)"))):
        late = [p[metric] for r in runs for p in r["curve"][len(r["curve"]) // 3:]]
        for method in cfg.methods:
            mine = [r["curve"] for r in runs if r["method"] == method and r["curve"]]
            if not mine:
                continue
            steps = [p["step"] for p in mine[0]]
            rounds = [max(1, p["rounds"]) for p in mine[0]]
            mean = [statistics.fmean(c[i][metric] for c in mine) for i in range(len(steps))]
            style = "--" if method in ("qsr_g1", "qsr_g3") else ":" if method in VARIANTS else "-"
            axes[row, 0].plot(steps, mean, style, label=LABELS[method])
            axes[row, 1].plot(rounds, mean, style, marker=".", label=LABELS[method])
        axes[row, 0].set_xlabel("optimizer steps")
        axes[row, 1].set_xlabel("communication rounds (log scale)")
        axes[row, 1].set_xscale("log")
        for ax in axes[row]:
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            if late and metric == "val_acc":
                ax.set_ylim(min(late) - 0.01, max(late) + 0.005)
            elif late:
                ax.set_ylim(min(late) - 0.02, max(late) + 0.05)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{title}: mean over {len(cfg.seeds)} seeds, curves on {cfg.eval_positions} validation positions "
                 "(the replicas' mean between boundaries)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(summary: dict) -> str:
    lines = ["| method | rounds | H (first / max / last) | val acc % (mean ± std) | val acc % median [min, max] "
             "| val loss | train loss |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for row in summary.values():
        hs = f"{row['h_first']} / {row['h_max']} / {row['h_last']}" if "h_first" in row else "1 (gradients)"
        va, vl, tl = row["val_acc"], row["val_loss"], row["train_loss"]
        median = statistics.median(va["values"])
        lines.append(f"| {row['label']} | {row['rounds']} | {hs} | {100 * va['mean']:.2f} ± {100 * va['std']:.2f} "
                     f"| {100 * median:.2f} [{100 * va['min']:.2f}, {100 * va['max']:.2f}] "
                     f"| {vl['mean']:.4f} ± {vl['std']:.4f} | {tl['mean']:.4f} ± {tl['std']:.4f} |")
    return "\n".join(lines)


BEGIN, END = "<!-- BEGIN GENERATED (benchmarks/accuracy.py) -->", "<!-- END GENERATED -->"


def regime_text(name: str, res: dict, rel: str) -> list[str]:
    cfg = res["config"]
    epochs = cfg["steps"] * cfg["replicas"] * cfg["batch"] / res["train_bytes"]
    return [
        f"### {name}: {REGIMES[name]['about']}",
        "",
        f"{res['train_bytes']} training bytes ({epochs:.1f} epochs), {res['params']} parameters; "
        f"R = {cfg['replicas']} replicas x batch {cfg['batch']} (data parallel: global batch "
        f"{cfg['replicas'] * cfg['batch']}), {cfg['steps']} steps, {cfg['optimizer']} (weight decay "
        f"{cfg['weight_decay']}), peak LR {cfg['lr']} after {cfg['warmup']} linear warm-up steps, cosine to "
        f"{cfg['min_lr']}; H_base {cfg['h_base']}, alpha {cfg['alpha']} for gamma 2 (gamma 1 and 3: alpha "
        f"{alpha_for(1, Config(**_cfg_args(cfg))):.4g} and {alpha_for(3, Config(**_cfg_args(cfg))):.4g}, so H "
        f"leaves H_base at the same LR), H_large {res['h_large']}; post-local: H = 1 until step "
        f"{int(cfg['steps'] * cfg['post_local_switch'])}, then H_large. Seeds {list(cfg['seeds'])}; "
        f"{res['wall_seconds']:.0f} s.",
        "",
        table(res["summary"]),
        "",
        "The paper's ordering, on final validation accuracy ('holds' when every seed agrees; a seed "
        "pairs the same initialization and data streams across methods):",
        "",
        *verdict(res["summary"]),
        "",
        *((["QSR with overlapped or compressed rounds (same seeds, same schedule):", "",
            *variant_claims(res["summary"]), ""]) if any(m in res["summary"] for m in VARIANTS) else []),
        f"![{name}]({rel}/accuracy_{name}.png)",
        "",
    ]


def write_report(result: dict, out_dir: str, report: str) -> None:
    rel = os.path.relpath(out_dir, os.path.dirname(os.path.abspath(report)))
    runs = [f"`{c['command']}`: {c['wall_seconds']:.0f} s wall ({c['cpu_seconds']:.0f} s CPU)"
            + (f", load average {c['load'][0]:.1f} at the start, {c['load'][1]:.1f} at the end" if c.get("load") else "")
            for c in commands_of(result)]
    body = [BEGIN, f"Run: {'; then '.join(runs)} (a later run's rows replace the same method and seed, the "
            f"rest are kept); torch {result['torch']}, Python {result['python']}, {result['threads']} thread(s); "
            f"validation: the last {result['val_bytes']} bytes.", ""]
    for name, res in result["regimes"].items():
        body += regime_text(name, res, rel)
    body = "\n".join(body + [END])
    if os.path.exists(report):
        with open(report) as f:
            text = f.read()
        if BEGIN in text and END in text:
            text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: body, text, flags=re.S)
        else:
            text = text.rstrip() + "\n\n" + body + "\n"
    else:
        text = f"# Accuracy: QSR and its baselines\n\n{body}\n"
    with open(report, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------- main


# The peak LR of each regime is the best of {3e-3, 1e-2, 2e-2, 4e-2} for data parallel (seed 0,
# see accuracy.md); every method shares it, and alpha = 2 x peak LR (the paper's ViT-B run has
# 0.0175 / 0.008 = 2.2), so QSR's H starts to grow as soon as the LR decays.
REGIMES = {
    "one_pass": {"about": "the whole training text, under one pass (compute-limited)",
                 "overrides": {"lr": 1e-2, "alpha": 2e-2}},
    "multi_epoch": {"about": "the first 50 KB of the training text, several epochs (data-limited)",
                    "overrides": {"train_bytes": 50_000, "lr": 2e-2, "alpha": 4e-2}},
}


def _cfg_args(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def parse_args(argv=None) -> tuple[argparse.Namespace, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (< 30 s); use with --out-dir")
    p.add_argument("--out-dir", default=RESULTS, help="where accuracy.json and the plots go")
    p.add_argument("--report", default=None, help="the .md report (default: benchmarks/accuracy.md, or "
                   "OUT_DIR/accuracy.md when --out-dir is given)")
    p.add_argument("--report-only", action="store_true", help="rebuild plots and report from OUT_DIR/accuracy.json")
    p.add_argument("--merge-from", nargs="+", metavar="JSON", help="merge these accuracy.json files (e.g. from runs "
                   "in parallel) into OUT_DIR/accuracy.json, in order, and rebuild plots and report; no training")
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    p.add_argument("--threads", type=int, default=1)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, tuple):
            p.add_argument(flag, nargs="+", type=int if f.name == "seeds" else str, default=None)
        else:
            p.add_argument(flag, type=type(f.default), default=None)
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    overrides = _cfg_args(overrides)
    unknown = set(overrides.get("methods", ())) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    configs = {}
    for name in args.regimes:
        configs[name] = Config(**{**REGIMES[name]["overrides"], **(SMOKE if args.smoke else {}), **overrides})
    if args.report is None:
        same = os.path.abspath(args.out_dir) == os.path.abspath(RESULTS)
        args.report = REPORT if same else os.path.join(args.out_dir, "accuracy.md")
    return args, configs


def run_regime(name: str, cfg: Config, train: torch.Tensor, val: torch.Tensor) -> dict:
    if cfg.train_bytes:
        train = train[: cfg.train_bytes]
    start, runs = time.perf_counter(), []
    print(f"\n{name}: {REGIMES[name]['about']}")
    print(f"{'method':24s} {'seed':>4s} {'rounds':>6s} {'val acc':>8s} {'val loss':>8s} {'seconds':>7s}")
    for method in cfg.methods:
        for seed in cfg.seeds:
            r = run(method, seed, cfg, train, val)
            r.pop("params")
            runs.append(r)
            print(f"{LABELS[method]:24s} {seed:4d} {r['rounds']:6d} {100 * r['val_acc']:7.2f}% "
                  f"{r['val_loss']:8.4f} {r['train_seconds']:7.1f}", flush=True)
    return {"config": dataclasses.asdict(cfg), "train_bytes": len(train), "wall_seconds": time.perf_counter() - start,
            "params": sum(p.numel() for p in ByteMLP(cfg).parameters()), "h_large": h_large(cfg),
            "summary": summarize(runs, cfg), "runs": runs}


def commands_of(result: dict) -> list[dict]:
    """The runs a result holds, oldest first (a JSON written before merging holds one)."""
    return result.get("commands") or [{k: result.get(k) for k in ("command", "wall_seconds", "cpu_seconds", "load")}]


def check_mergeable(name: str, old: dict, new: dict) -> None:
    """SystemExit naming the fields unless two configs of a regime differ only in methods and seeds."""
    a, b = ({k: v for k, v in json.loads(json.dumps(dataclasses.asdict(Config(**_cfg_args(c))))).items()
             if k not in ("methods", "seeds")} for c in (old, new))  # a key added since: its default
    if a != b:
        raise SystemExit(f"cannot merge regime {name} into the JSON: config differs in "
                         f"{sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))}")


def merge_results(old: dict, new: dict) -> dict:
    """``new``'s runs replace ``old``'s of the same regime, method and seed; old's other runs are kept.

    A regime in both must have the same config but for methods and seeds (else SystemExit naming
    the fields that differ), so merged rows are side by side with the same data, schedule and seeds.
    """
    new = json.loads(json.dumps(new))  # the JSON's lists, not tuples, in configs
    regimes = dict(old["regimes"])
    for name, res in new["regimes"].items():
        prev = regimes.get(name)
        if prev is None:
            regimes[name] = res
            continue
        check_mergeable(name, prev["config"], res["config"])
        ran = {(r["method"], r["seed"]) for r in res["runs"]}
        runs = [r for r in prev["runs"] if (r["method"], r["seed"]) not in ran] + res["runs"]
        runs.sort(key=lambda r: (METHODS.index(r["method"]), r["seed"]))
        cfg = Config(**_cfg_args({**res["config"], "methods": [m for m in METHODS if any(r["method"] == m for r in runs)],
                                  "seeds": sorted({r["seed"] for r in runs})}))
        regimes[name] = {**res, "config": dataclasses.asdict(cfg), "summary": summarize(runs, cfg), "runs": runs,
                         "wall_seconds": prev["wall_seconds"] + res["wall_seconds"]}
    return {**new, "regimes": regimes, "commands": commands_of(old) + commands_of(new),
            "wall_seconds": old["wall_seconds"] + new["wall_seconds"], "cpu_seconds": old["cpu_seconds"] + new["cpu_seconds"]}


def main(argv=None) -> dict:
    args, configs = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, "accuracy.json")
    old = None
    if os.path.exists(json_path):
        with open(json_path) as f:
            old = json.load(f)
    if args.report_only or args.merge_from:
        if old is None and not args.merge_from:
            raise SystemExit(f"--report-only: no {json_path}")
        result = old
        for path in args.merge_from or ():
            with open(path) as f:
                result = json.load(f) if result is None else merge_results(result, json.load(f))
        if args.merge_from:
            with open(json_path, "w") as f:
                json.dump(result, f, indent=1)
    else:
        for name, cfg in configs.items():  # before any training
            if old is not None and name in old["regimes"]:
                check_mergeable(name, old["regimes"][name]["config"], dataclasses.asdict(cfg))
        torch.set_num_threads(args.threads)
        argv = sys.argv[1:] if argv is None else list(argv)
        start, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
        train, val = split(corpus())
        regimes = {name: run_regime(name, cfg, train, val) for name, cfg in configs.items()}
        result = {"command": " ".join(["python benchmarks/accuracy.py", *argv]),
                  "wall_seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, "torch": torch.__version__,
                  "python": sys.version.split()[0], "threads": args.threads, "val_bytes": len(val),
                  "load": [load, os.getloadavg()[0]], "regimes": regimes}
        if old is not None:
            result = merge_results(old, result)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    for name, res in result["regimes"].items():
        cfg = Config(**_cfg_args(res["config"]))
        plot(res["runs"], cfg, os.path.join(args.out_dir, f"accuracy_{name}.png"), REGIMES[name]["about"])
        print(f"\n{name}: {REGIMES[name]['about']}\n{table(res['summary'])}\n" + "\n".join(verdict(res["summary"])))
    write_report(result, args.out_dir, args.report)
    print(f"\nwrote {json_path}, plots and {args.report} ({result['wall_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
