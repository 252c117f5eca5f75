"""The synchronization schedule: how many local steps H each round takes.

Pure Python, no torch.distributed. The semantics follow the QSR reference code
(Gu et al., ICLR 2024, arXiv 2310.14423) and are pinned by tests/unit/test_schedule.py:

* steps are counted from 0; a round that starts after ``s`` completed optimizer steps
  uses ``lr`` = the learning rate that step ``s`` (0-based) will use;
* while ``s < warmup_steps``, or for the constant rule (or ``alpha == 0``), H = h_base;
* otherwise H = max(floor((alpha / lr) ** gamma), h_base);
* post_local: H = 1 while ``s < switch_step``, then h_base;
* every round is cut so that it ends no later than ``total_steps`` (training always
  ends on an average), and H is never below 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

RULE_GAMMA = {"qsr": 2.0, "linear": 1.0, "cubic": 3.0}
RULES = ("qsr", "linear", "cubic", "constant", "post_local")


class ScheduleError(ValueError):
    """An impossible schedule setting, or a tracker asked to do something inconsistent."""


@dataclass(frozen=True, kw_only=True)
class SyncSchedule:
    """The H rule of one training run.

    Keyword-only; see the module docstring for the exact semantics.
    """

    rule: str = "qsr"
    """qsr | linear | cubic | constant | post_local."""
    h_base: int = 4
    """The smallest H; the constant rule's H; post-local's H after the switch."""
    alpha: float = 0.0
    """Growth coefficient in H = (alpha / lr) ** gamma; 0 means constant H."""
    gamma: float | None = None
    """Exponent of the rule; None takes the rule's own (qsr 2, linear 1, cubic 3)."""
    warmup_steps: int = 0
    """H = h_base while fewer than this many steps are completed."""
    total_steps: int = 1
    """Optimizer steps in the whole run; the last round ends exactly here."""
    switch_step: int | None = None
    """post_local only: H = 1 before this step, h_base from it on."""

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ScheduleError(f"unknown rule {self.rule!r}; expected one of {', '.join(RULES)}")
        if isinstance(self.h_base, bool) or not isinstance(self.h_base, int) or self.h_base < 1:
            raise ScheduleError(f"h_base must be an integer >= 1, got {self.h_base!r}")
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise ScheduleError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        if self.gamma is not None and not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ScheduleError(f"gamma must be a finite number > 0, got {self.gamma!r}")
        if self.warmup_steps < 0:
            raise ScheduleError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if self.total_steps < 1:
            raise ScheduleError(f"total_steps must be >= 1, got {self.total_steps!r}")
        if self.rule == "post_local" and (self.switch_step is None or self.switch_step < 0):
            raise ScheduleError("the post_local rule needs switch_step >= 0")

    @property
    def effective_gamma(self) -> float | None:
        """The exponent in use, or None for rules that ignore the learning rate."""
        if self.rule in ("constant", "post_local"):
            return None
        return self.gamma if self.gamma is not None else RULE_GAMMA[self.rule]

    def uncut_h(self, completed_steps: int, lr: float) -> int:
        """H by the rule alone, before the last round is cut at total_steps."""
        gamma = self.effective_gamma
        if self.rule == "post_local":
            return 1 if completed_steps < self.switch_step else self.h_base
        if gamma is None or self.alpha == 0 or completed_steps < self.warmup_steps:
            return self.h_base
        if lr is None or not lr > 0:
            raise ScheduleError(f"learning rate must be > 0 for rule {self.rule!r}, got {lr!r} at step {completed_steps}")
        try:
            grown = math.floor((self.alpha / lr) ** gamma)
        except OverflowError:
            grown = self.total_steps
        return max(grown, self.h_base)

    def next_h(self, completed_steps: int, lr: float) -> int:
        """H of the round that starts after ``completed_steps`` optimizer steps.

        ``lr`` is the learning rate step ``completed_steps`` (0-based) will use.
        """
        if not 0 <= completed_steps < self.total_steps:
            raise ScheduleError(
                f"a round can only start at 0 <= step < total_steps={self.total_steps}, got {completed_steps}"
            )
        return max(min(self.uncut_h(completed_steps, lr), self.total_steps - completed_steps), 1)

    def rounds(self, lr_at: Callable[[int], float]) -> list[tuple[int, int]]:
        """Every round as (start_step, H), for ``lr_at(step_index) -> lr``."""
        out, step = [], 0
        while step < self.total_steps:
            h = self.next_h(step, lr_at(step))
            out.append((step, h))
            step += h
        return out

    def boundaries(self, lr_at: Callable[[int], float]) -> list[int]:
        """Completed-step counts after which replicas average; the last is total_steps."""
        return [start + h for start, h in self.rounds(lr_at)]


class SyncTracker:
    """Counts optimizer steps and says when a round closes.

    Call ``on_step(lr_of_next_step)`` once after every optimizer step (a step skipped for
    fp16 overflow counts too: replicas must agree on when to communicate). It returns True
    when that step closes a round; the next round's H is then decided from
    ``lr_of_next_step``, the learning rate the following step will use.
    """

    def __init__(self, schedule: SyncSchedule, first_lr: float) -> None:
        self.schedule = schedule
        self.completed_steps = 0
        self.rounds_done = 0
        self.current_h = schedule.next_h(0, first_lr)
        self.round_start = 0

    @property
    def next_boundary(self) -> int:
        """Completed-step count at which the current round closes."""
        return self.round_start + self.current_h

    @property
    def finished(self) -> bool:
        return self.completed_steps >= self.schedule.total_steps

    def on_step(self, lr_of_next_step: float | None) -> bool:
        if self.finished:
            raise ScheduleError(
                f"step {self.completed_steps + 1} is past total_steps={self.schedule.total_steps}; "
                "raise total_steps in the qsr config to train longer"
            )
        self.completed_steps += 1
        if self.completed_steps < self.next_boundary:
            return False
        self.rounds_done += 1
        self.round_start = self.completed_steps
        if not self.finished:
            self.current_h = self.schedule.next_h(self.completed_steps, lr_of_next_step)
        return True

    def state_dict(self) -> dict:
        return {
            "completed_steps": self.completed_steps,
            "rounds_done": self.rounds_done,
            "current_h": self.current_h,
            "round_start": self.round_start,
            "schedule": schedule_fingerprint(self.schedule),
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"completed_steps", "rounds_done", "current_h", "round_start", "schedule"} - set(state)
        if missing:
            raise ScheduleError(f"QSR tracker state is missing {sorted(missing)}")
        mine = schedule_fingerprint(self.schedule)
        if state["schedule"] != mine:
            changed = sorted(k for k in mine if state["schedule"].get(k) != mine[k])
            raise ScheduleError(
                f"checkpoint was written with another qsr schedule (differs in {', '.join(changed)}): "
                f"saved {state['schedule']}, now {mine}"
            )
        self.completed_steps = int(state["completed_steps"])
        self.rounds_done = int(state["rounds_done"])
        self.current_h = int(state["current_h"])
        self.round_start = int(state["round_start"])


def schedule_fingerprint(schedule: SyncSchedule) -> dict:
    """The fields that must match for a resume to continue the same schedule."""
    return {
        "rule": schedule.rule,
        "h_base": schedule.h_base,
        "alpha": schedule.alpha,
        "gamma": schedule.effective_gamma,
        "warmup_steps": schedule.warmup_steps,
        "total_steps": schedule.total_steps,
        "switch_step": schedule.switch_step,
    }
