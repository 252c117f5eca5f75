"""SyncSchedule and SyncTracker: the paper's ViT-B numbers, rule properties, resume."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsr_ds.schedule import ScheduleError, SyncSchedule, SyncTracker

PEAK, FLOOR, WARMUP, TOTAL = 0.008, 1e-6, 10_000, 93_600


def paper_vit_lr(step: int) -> float:
    """The ViT-B recipe's LR as the paper writes it: linear warm-up from 1e-6, then cosine."""
    if step < WARMUP:
        return FLOOR + (PEAK - FLOOR) * step / WARMUP
    return FLOOR + 0.5 * (PEAK - FLOOR) * (1 + math.cos(math.pi * (step - WARMUP) / (TOTAL - WARMUP)))


VIT = SyncSchedule(rule="qsr", h_base=4, alpha=0.0175, warmup_steps=WARMUP, total_steps=TOTAL)


@pytest.fixture(scope="module")
def vit_rounds():
    return VIT.rounds(paper_vit_lr)


def test_vit_round_count(vit_rounds):
    assert len(vit_rounds) == 9_711


def test_vit_first_growth(vit_rounds):
    first = next(i for i, (_, h) in enumerate(vit_rounds) if h > 4)
    assert vit_rounds[first][0] == 17_876
    assert all(h == 4 for _, h in vit_rounds[:first])


def test_vit_last_round(vit_rounds):
    start, h = vit_rounds[-1]
    assert h == 8_142 and start + h == TOTAL


def test_vit_constant_h():
    constant = SyncSchedule(rule="constant", h_base=4, total_steps=TOTAL)
    assert len(constant.rounds(paper_vit_lr)) == 23_400


# --- properties -------------------------------------------------------------------------

def cosine_lr(peak: float, floor: float, warmup: int, total: int):
    def lr(step: int) -> float:
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))

    return lr


@st.composite
def schedules(draw, rules=("qsr", "linear", "cubic", "constant", "post_local")):
    total = draw(st.integers(1, 3000))
    rule = draw(st.sampled_from(rules))
    gamma = draw(st.one_of(st.none(), st.floats(0.5, 3.5))) if rule in ("qsr", "linear", "cubic") else None
    schedule = SyncSchedule(
        rule=rule,
        h_base=draw(st.integers(1, 16)),
        alpha=draw(st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.2])),
        gamma=gamma,
        warmup_steps=draw(st.integers(0, total)),
        total_steps=total,
        switch_step=draw(st.integers(0, total + 5)) if rule == "post_local" else None,
    )
    lr = cosine_lr(draw(st.sampled_from([0.1, 0.01, 1e-3])), 1e-5, schedule.warmup_steps, total)
    return schedule, lr


PROPS = settings(max_examples=60, deadline=None)


@PROPS
@given(schedules())
def test_boundaries_increase_to_total(case):
    schedule, lr = case
    bounds = schedule.boundaries(lr)
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1] == schedule.total_steps
    assert all(h >= 1 for _, h in schedule.rounds(lr))


@PROPS
@given(schedules(rules=("qsr", "linear", "cubic")))
def test_h_grows_while_lr_decays(case):
    schedule, lr = case
    rounds = schedule.rounds(lr)[:-1]  # the last round may be cut short
    after = [(s, h) for s, h in rounds if s >= schedule.warmup_steps]
    for (s0, h0), (s1, h1) in zip(after, after[1:]):
        assert lr(s1) <= lr(s0)
        assert h1 >= h0


@PROPS
@given(st.integers(1, 5000), st.integers(1, 64))
def test_constant_rule_round_count(total, h_base):
    schedule = SyncSchedule(rule="constant", h_base=h_base, total_steps=total, alpha=0.3)
    rounds = schedule.rounds(lambda s: 1e-3)
    assert len(rounds) == math.ceil(total / h_base)


@PROPS
@given(st.integers(1, 2000), st.integers(1, 16), st.data())
def test_post_local(total, h_base, data):
    switch = data.draw(st.integers(0, total))
    rounds = SyncSchedule(rule="post_local", h_base=h_base, switch_step=switch, total_steps=total).rounds(lambda s: 1.0)
    assert rounds[:switch] == [(s, 1) for s in range(switch)]
    assert [s for s, _ in rounds[switch:]] == list(range(switch, total, h_base))
    assert all(h == min(h_base, total - s) for s, h in rounds[switch:])


@pytest.mark.parametrize("rule,gamma", [("linear", 1), ("qsr", 2), ("cubic", 3)])
def test_rule_exponents(rule, gamma):
    schedule = SyncSchedule(rule=rule, h_base=1, alpha=0.5, total_steps=10_000)
    assert schedule.effective_gamma == gamma
    assert schedule.next_h(0, 0.25) == 2 ** gamma  # alpha / lr == 2 exactly
    assert schedule.next_h(0, 0.1) == 5 ** gamma


def test_explicit_gamma_overrides_the_rule():
    schedule = SyncSchedule(rule="qsr", h_base=2, alpha=0.3, gamma=1.5, total_steps=10_000)
    assert schedule.effective_gamma == 1.5
    assert schedule.next_h(0, 0.01) == math.floor(30 ** 1.5)
    assert schedule.next_h(0, 1.0) == 2  # never below h_base


def test_warmup_and_zero_alpha_keep_h_base():
    assert SyncSchedule(rule="qsr", h_base=3, alpha=0.5, warmup_steps=10, total_steps=100).next_h(9, 1e-4) == 3
    assert SyncSchedule(rule="qsr", h_base=3, alpha=0.0, total_steps=100).next_h(50, 1e-4) == 3


# --- the tracker ------------------------------------------------------------------------

@PROPS
@given(schedules())
def test_tracker_agrees_with_boundaries(case):
    schedule, lr = case
    tracker = SyncTracker(schedule, lr(0))
    closed = [s for s in range(1, schedule.total_steps + 1) if tracker.on_step(lr(s) if s < schedule.total_steps else None)]
    assert closed == schedule.boundaries(lr)
    assert tracker.finished and tracker.rounds_done == len(closed)
    with pytest.raises(ScheduleError, match="past total_steps"):
        tracker.on_step(lr(0))


@PROPS
@given(schedules(), st.data())
def test_resume_mid_round(case, data):
    schedule, lr = case
    stop = data.draw(st.integers(0, schedule.total_steps - 1))
    first = SyncTracker(schedule, lr(0))
    for s in range(1, stop + 1):
        first.on_step(lr(s))
    state = first.state_dict()
    resumed = SyncTracker(schedule, lr(0))
    resumed.load_state_dict(state)
    assert (resumed.current_h, resumed.next_boundary, resumed.rounds_done) == (
        first.current_h, first.next_boundary, first.rounds_done)
    rest = [s for s in range(stop + 1, schedule.total_steps + 1)
            if resumed.on_step(lr(s) if s < schedule.total_steps else None)]
    assert rest == [b for b in schedule.boundaries(lr) if b > stop]


@pytest.mark.parametrize("field,value", [("h_base", 5), ("alpha", 0.02), ("total_steps", 90_000), ("warmup_steps", 0)])
def test_resume_from_another_schedule_names_the_field(field, value):
    state = SyncTracker(VIT, paper_vit_lr(0)).state_dict()
    other = SyncSchedule(**{**dict(rule="qsr", h_base=4, alpha=0.0175, warmup_steps=WARMUP, total_steps=TOTAL), field: value})
    with pytest.raises(ScheduleError, match=f"differs in {field}"):
        SyncTracker(other, paper_vit_lr(0)).load_state_dict(state)


def test_resume_state_missing_fields():
    with pytest.raises(ScheduleError, match="missing"):
        SyncTracker(VIT, 1e-6).load_state_dict({"completed_steps": 3})
