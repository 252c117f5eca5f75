"""The synchronization plan of a config: rounds, H over training, savings versus data parallel.

Pure except for ``write_plot``, which imports matplotlib only when called. The wall-time
projection's cost model lives in projection.py; ``build_projection`` feeds it this plan's rounds.
"""
from __future__ import annotations

import math
import os
from typing import Callable

from ..config import QSRConfig, QSRConfigError, load, read_json
from .lr import lr_fn_from_deepspeed
from .projection import CostInputs, ProjectionError, dtype_bytes, project, to_dict
from ..schedule import ScheduleError, SyncSchedule

LrFn = Callable[[int], float]


def _phases(config: QSRConfig, rounds: list[tuple[int, int]], lr_at: LrFn) -> list[dict]:
    """Warm-up, then each tenth of the steps after it.

    A phase's ``rounds`` counts rounds that start in it; its H range covers every round
    running during it, so a phase inside one long round still shows that round's H.
    """
    total, warmup = config.total_steps, min(config.warmup_steps, config.total_steps)
    spans = [("warm-up", 0, warmup)] if warmup else []
    cuts = [warmup + (total - warmup) * k // 10 for k in range(11)]
    spans += [(f"{k + 1}/10", cuts[k], cuts[k + 1]) for k in range(10)]
    out = []
    for name, start, end in spans:
        if start >= end:
            continue
        hs = [h for s, h in rounds if s < end and s + h > start]
        out.append({
            "name": name,
            "start": start,
            "end": end,
            "rounds": sum(1 for s, _ in rounds if start <= s < end),
            "min_h": min(hs),
            "max_h": max(hs),
            "lr_start": lr_at(start),
        })
    return out


def _warnings(config: QSRConfig, lr_at: LrFn) -> list[str]:
    out = []
    sched_total = getattr(lr_at, "total_num_steps", None)
    if sched_total is not None and sched_total != config.total_steps:
        out.append(
            f"qsr.total_steps={config.total_steps} but scheduler.params.total_num_steps={sched_total}; "
            "keep them equal so the last round ends where the LR schedule does"
        )
    sched_warmup = getattr(lr_at, "warmup_num_steps", None)
    growing = config.schedule().effective_gamma is not None and config.alpha > 0
    if growing and sched_warmup is not None and config.warmup_steps < sched_warmup:
        out.append(
            f"qsr.warmup_steps={config.warmup_steps} is shorter than the LR warm-up "
            f"({sched_warmup} steps): H grows while the LR is still small"
        )
    return out


def _rounds(config: QSRConfig, lr_at: LrFn) -> list[tuple[int, int]]:
    try:
        return config.schedule().rounds(lr_at)
    except ScheduleError as err:
        raise QSRConfigError(f"{config.source}: {err}") from None


def build_plan(config: QSRConfig, lr_at: LrFn) -> dict:
    """The plan of ``config`` under ``lr_at(step) -> lr`` (0-based optimizer steps)."""
    schedule = config.schedule()
    rounds = _rounds(config, lr_at)
    total = config.total_steps
    grown = [s for s, h in rounds if h > config.h_base]
    last_start, last_h = rounds[-1]
    return {
        "config": config.source,
        "scheduler": type(lr_at).__name__,
        "rule": config.rule,
        "h_base": config.h_base,
        "alpha": config.alpha,
        "gamma": schedule.effective_gamma,
        "warmup_steps": config.warmup_steps,
        "switch_step": config.switch_step,
        "total_steps": total,
        "rounds": len(rounds),
        "data_parallel_rounds": total,
        "constant_h_rounds": math.ceil(total / config.h_base),
        "comm_ratio": len(rounds) / total,
        "first_growth_step": grown[0] if grown else None,
        "max_h": max(h for _, h in rounds),
        "last_round_h": last_h,
        "last_round_start": last_start,
        "outer": config.to_dict()["outer"],
        "phases": _phases(config, rounds, lr_at),
        "warnings": _warnings(config, lr_at),
    }


# Averaged entries with one number per parameter; "buffers" (BatchNorm statistics) are not counted.
_PER_PARAMETER = ("params", "exp_avg", "exp_avg_sq", "momentum")


def cost_inputs(config: QSRConfig, *, step_seconds: float, replicas: int, params: float,
                bandwidth_bits_per_s: float, state_dtype: str = "fp32", grad_dtype: str | None = None,
                latency_s: float = 0.0, overlap_steps: int | None = None, compress: str | None = None,
                int8_block: int = 256, dp_overlap: float = 0.0, compress_route: str | None = None) -> CostInputs:
    """The cost model's inputs for ``config`` on a model of ``params`` parameters.

    A round averages every entry of ``config.average`` that has one number per parameter,
    in ``state_dtype``; data parallel all-reduces gradients in ``grad_dtype`` (default: the
    state's). ``overlap_steps``, ``compress`` and ``compress_route`` default to the config's own settings, if it
    has them. Errors are ProjectionErrors naming the keyword.
    """
    if not (isinstance(params, (int, float)) and params >= 1):
        raise ProjectionError("params", f"must be >= 1, got {params!r}")
    elements_per_param = sum(1 for name in _PER_PARAMETER if name in config.averages)
    state_size = _dtype(state_dtype, "state_dtype")
    grad_size = state_size if grad_dtype is None else _dtype(grad_dtype, "grad_dtype")
    if overlap_steps is None:
        overlap_steps = int(getattr(config, "overlap_steps", 0) or 0)
    if compress is None:
        compress = getattr(config, "compress", None) or "none"
    if compress_route is None:
        compress_route = getattr(config, "compress_route", "gather")
    elements = params * elements_per_param
    return CostInputs(
        step_seconds=step_seconds, replicas=replicas, state_bytes=elements * state_size, state_elements=elements,
        grad_bytes=params * grad_size, bandwidth_bits_per_s=bandwidth_bits_per_s, latency_s=latency_s,
        overlap_steps=overlap_steps, compress=compress, int8_block=int8_block, dp_overlap=dp_overlap,
        compress_route=compress_route,
    )


def _dtype(name: str, field: str) -> int:
    try:
        return dtype_bytes(name)
    except ValueError as err:
        raise ProjectionError(field, str(err)) from None


def build_projection(config: QSRConfig, lr_at: LrFn, inputs: CostInputs) -> dict:
    """Projected hours of compute only, data parallel, constant H = h_base and ``config``'s schedule."""
    constant = SyncSchedule(rule="constant", h_base=config.h_base, total_steps=config.total_steps)
    methods = project(inputs, constant_rounds=constant.rounds(lambda step: 0.0),
                      schedule_rounds=_rounds(config, lr_at), rule=config.rule, h_base=config.h_base)
    out = to_dict(inputs, methods)
    out["ranks_per_replica"] = config.ranks_per_replica
    out["averaged"] = [name for name in config.average if name in _PER_PARAMETER]
    return out


def load_plan_inputs(path: str | os.PathLike) -> tuple[QSRConfig, LrFn]:
    """The "qsr" section and the lr function of a DeepSpeed JSON file."""
    source = os.fspath(path)
    data = read_json(source)
    return load(source), lr_fn_from_deepspeed(data, source)


def format_plan(plan: dict) -> str:
    """A short human-readable report of a plan."""
    rule = f"rule {plan['rule']}, h_base {plan['h_base']}"
    if plan["gamma"] is not None:
        rule += f", alpha {plan['alpha']:g}, gamma {plan['gamma']:g}"
    if plan["switch_step"] is not None:
        rule += f", switch_step {plan['switch_step']:,}"
    if plan.get("outer"):
        outer = plan["outer"]
        rule += f", outer {outer['optimizer']} lr {outer['lr']:g} momentum {outer['momentum']:g}"
    growth = plan["first_growth_step"]
    rows = [
        ("averaging rounds", f"{plan['rounds']:,}", ""),
        ("data-parallel rounds", f"{plan['total_steps']:,}", "one all-reduce per step"),
        (f"constant H={plan['h_base']} rounds", f"{plan['constant_h_rounds']:,}", ""),
        ("rounds / total steps", f"{plan['comm_ratio']:.4f}", f"{1 / plan['comm_ratio']:.2f}x fewer than data parallel"),
        (f"H first above {plan['h_base']} at step", "never" if growth is None else f"{growth:,}", ""),
        ("largest H", f"{plan['max_h']:,}", ""),
        ("last round H", f"{plan['last_round_h']:,}", f"from step {plan['last_round_start']:,}"),
    ]
    width = max(len(label) for label, _, _ in rows)
    lines = [f"{plan['config']}: {rule}, warm-up {plan['warmup_steps']:,} steps, lr from {plan['scheduler']}", ""]
    lines += [f"  {label:<{width}} {value:>10}" + (f"   ({note})" if note else "") for label, value, note in rows]
    lines += ["", f"  {'phase':<8} {'steps':>17} {'rounds':>8} {'H min':>7} {'H max':>7} {'lr at start':>12}"]
    for p in plan["phases"]:
        steps = f"{p['start']:,}-{p['end']:,}"
        lines.append(
            f"  {p['name']:<8} {steps:>17} {p['rounds']:>8,} {p['min_h']:>7,} {p['max_h']:>7,} {p['lr_start']:>12.3e}"
        )
    lines.append("  (rounds: those starting in the phase; H: rounds running during it)")
    return "\n".join(lines)


def write_plot(config: QSRConfig, lr_at: LrFn, path: str | os.PathLike) -> None:
    """Plot lr (left axis) and H (right axis, log scale) against the step into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = config.total_steps
    stride = max(1, total // 4000)
    steps = list(range(0, total, stride))
    rounds = config.schedule().rounds(lr_at)
    fig, ax_lr = plt.subplots(figsize=(8, 4.5))
    ax_lr.plot(steps, [lr_at(s) for s in steps], color="tab:blue", label="lr")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate", color="tab:blue")
    ax_h = ax_lr.twinx()
    starts = [s for s, _ in rounds] + [total]
    hs = [h for _, h in rounds] + [rounds[-1][1]]
    ax_h.step(starts, hs, where="post", color="tab:red", label="H")
    ax_h.set_yscale("log")
    ax_h.set_ylabel("H (local steps per round)", color="tab:red")
    ax_lr.set_title(f"{config.rule}: {len(rounds):,} rounds over {total:,} steps ({os.path.basename(config.source)})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
