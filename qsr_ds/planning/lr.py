"""DeepSpeed's learning-rate schedules as pure functions of the optimizer step.

These reproduce WarmupLR, WarmupDecayLR and WarmupCosineLR of
deepspeed/runtime/lr_schedules.py (0.19.x) operation by operation, so the floats are
identical. The engine builds the scheduler with last_batch_iteration = -1 (which sets the
optimizer's lr to the schedule's value at iteration -1) and calls scheduler.step() after
every applied optimizer step. So 0-based optimizer step s runs with the schedule's value
at iteration s - 1: step 0 gets warmup_min_lr (WarmupLR, WarmupDecayLR) or 0.0
(WarmupCosineLR). Steps skipped for fp16 overflow do not advance the scheduler; these
functions assume none is skipped.

Only the first parameter group is modelled: a per-group list in the params uses its first entry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..config import QSRConfigError
from ..schedule import ScheduleError

SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")


def _warmup_fraction(iteration: int, warmup_num_steps: int, warmup_type: str) -> float:
    """DeepSpeed's warm-up gamma (callers ensure iteration < warmup_num_steps)."""
    if warmup_type == "linear":
        return iteration / warmup_num_steps
    return (1.0 / math.log(warmup_num_steps)) * math.log(iteration + 1)


@dataclass(frozen=True, kw_only=True)
class WarmupLR:
    """warmup_min_lr -> warmup_max_lr over warmup_num_steps, then constant."""

    warmup_min_lr: float = 0.0
    warmup_max_lr: float = 0.001
    warmup_num_steps: int = 1000
    warmup_type: str = "log"
    """"log" or "linear"; DeepSpeed treats anything else as "log"."""

    def _gamma(self, iteration: int, warmup: int) -> float:
        if iteration < warmup:
            return _warmup_fraction(iteration, warmup, self.warmup_type)
        return 1.0

    def at_iteration(self, iteration: int) -> float:
        """The lr after the scheduler's last_batch_iteration became ``iteration``."""
        if iteration < 0:
            return self.warmup_min_lr
        warmup = max(2, self.warmup_num_steps)
        delta = self.warmup_max_lr - self.warmup_min_lr
        return self.warmup_min_lr + (delta * self._gamma(iteration, warmup))

    def __call__(self, step: int) -> float:
        """The lr that 0-based optimizer step ``step`` uses."""
        return self.at_iteration(step - 1)


@dataclass(frozen=True, kw_only=True)
class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay to 0 at total_num_steps."""

    total_num_steps: int

    def _gamma(self, iteration: int, warmup: int) -> float:
        if iteration < warmup:
            return _warmup_fraction(iteration, warmup, self.warmup_type)
        return max(
            0.0,
            float(self.total_num_steps - iteration) / float(max(1.0, self.total_num_steps - warmup)),
        )


@dataclass(frozen=True, kw_only=True)
class WarmupCosineLR:
    """Ratios of the optimizer's lr: warmup_min_ratio -> 1, then cosine to cos_min_ratio."""

    base_lr: float
    """The optimizer's lr (DeepSpeed's org_lrs)."""
    total_num_steps: int
    warmup_min_ratio: float = 0.0
    warmup_num_steps: int = 1000
    cos_min_ratio: float = 0.0001
    warmup_type: str = "log"

    def ratio(self, iteration: int) -> float:
        if iteration < 0:
            return 0.0
        warmup = max(2, self.warmup_num_steps)
        if iteration < warmup:
            ratio = _warmup_fraction(iteration, warmup, self.warmup_type)
            return self.warmup_min_ratio + ratio * (1.0 - self.warmup_min_ratio)
        real_last_step = iteration - warmup + 1
        real_total_steps = max(1, self.total_num_steps - warmup)
        progress = min(1.0, real_last_step / real_total_steps)
        ratio = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * ratio)

    def at_iteration(self, iteration: int) -> float:
        return self.base_lr * self.ratio(iteration)

    def __call__(self, step: int) -> float:
        return self.at_iteration(step - 1)


_PARAMS = {
    "WarmupLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"},
    "WarmupDecayLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "total_num_steps"},
    "WarmupCosineLR": {"warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type", "total_num_steps"},
}


def _optimizer_lr(ds_config: dict, source: str, scheduler: str) -> float:
    params = (ds_config.get("optimizer") or {}).get("params") or {}
    lr = params.get("lr")
    if lr is None:
        raise QSRConfigError(
            f'{source}: {scheduler} takes the optimizer\'s lr; add "optimizer": {{"type": "AdamW", '
            f'"params": {{"lr": ...}}}} to {source}, or pass base_lr when the optimizer is built in code'
        )
    return lr


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _check_params(params: dict, kind: str, source: str) -> dict:
    known = _PARAMS[kind] | {"last_batch_iteration"}
    for key in params:
        if key not in known:
            raise QSRConfigError(
                f"{source}: scheduler.params.{key}: unknown parameter of {kind}; known: {', '.join(sorted(known))}"
            )
    if params.get("last_batch_iteration", -1) != -1:
        raise QSRConfigError(f"{source}: scheduler.params.last_batch_iteration: only -1 (a fresh schedule) is supported")
    out = {k: _first(v) for k, v in params.items() if k != "last_batch_iteration"}
    for key, value in out.items():
        numeric = key != "warmup_type"
        if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise QSRConfigError(f"{source}: scheduler.params.{key}: expected a number, got {value!r}")
    steps = out.get("warmup_num_steps", 1000)
    if not isinstance(steps, int) or steps <= 0:
        raise QSRConfigError(f"{source}: scheduler.params.warmup_num_steps: must be a positive integer, got {steps!r}")
    if "total_num_steps" in _PARAMS[kind] and "total_num_steps" not in out:
        raise QSRConfigError(f"{source}: scheduler.params.total_num_steps: {kind} needs it (the run's optimizer steps)")
    return out


def lr_fn_from_deepspeed(ds_config: dict, source: str, *, base_lr: float | None = None) -> Callable[[int], float]:
    """The lr that 0-based optimizer step s uses under the config's "scheduler" section.

    ``base_lr`` stands in for the "optimizer" section's params.lr (an optimizer built in code).
    """
    section = ds_config.get("scheduler")
    if not isinstance(section, dict):
        raise QSRConfigError(
            f'{source}: no "scheduler" section; QSR sets H from the learning rate, so add one to {source}, e.g. '
            '"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 1000, "warmup_num_steps": 100}}'
        )
    kind = section.get("type")
    if kind not in SCHEDULERS:
        raise QSRConfigError(
            f"{source}: scheduler.type: {kind!r} is not supported by qsr-ds; use one of {', '.join(SCHEDULERS)}"
        )
    params = section.get("params") or {}
    if not isinstance(params, dict):
        raise QSRConfigError(f"{source}: scheduler.params: expected a JSON object, got {params!r}")
    params = _check_params(params, kind, source)
    if kind == "WarmupCosineLR":
        lr = base_lr if base_lr is not None else _optimizer_lr(ds_config, source, kind)
        return WarmupCosineLR(base_lr=lr, **params)
    if kind == "WarmupLR":
        if "warmup_max_lr" not in params:
            # DeepSpeed's WarmupLR falls back to the optimizer's lr; WarmupDecayLR does not (0.001).
            params["warmup_max_lr"] = base_lr if base_lr is not None else _optimizer_lr(ds_config, source, kind)
        return WarmupLR(**params)
    return WarmupDecayLR(**params)


MAX_PLANNED_ROUNDS = 10**6


def check_planned_rounds(ds_config: dict, qsr, source: str, *, base_lr: float | None = None) -> None:
    """Fail at start-up, not hours in, when the "scheduler" would stop a round from being planned.

    QSR needs lr > 0 at every round start after warm-up; a scheduler that reaches 0 before
    qsr.total_steps (total_num_steps smaller than qsr.total_steps, WarmupLR from 0 with
    qsr.warmup_steps 0, ...) used to pass start-up and raise ScheduleError at that round.
    Schedulers qsr_ds.planning.lr does not reproduce, and runs of more than MAX_PLANNED_ROUNDS
    rounds (the walk costs one step per round), are left to the per-round check.
    """
    schedule = qsr.schedule()
    if schedule.effective_gamma is None or schedule.alpha == 0:
        return  # H does not depend on the learning rate
    if schedule.total_steps // schedule.h_base > MAX_PLANNED_ROUNDS:
        return
    try:
        lr_at = lr_fn_from_deepspeed(ds_config, source, base_lr=base_lr)
    except QSRConfigError:
        return
    try:
        schedule.rounds(lr_at)
    except ScheduleError as err:
        raise QSRConfigError(
            f"{source}: qsr: {err} under the \"scheduler\" section; give the scheduler a learning rate > 0 up to "
            f"qsr.total_steps={schedule.total_steps} (e.g. scheduler total_num_steps >= qsr.total_steps) or "
            f"raise qsr.warmup_steps; `qsr-ds plan --config {source}` shows every round"
        ) from None
