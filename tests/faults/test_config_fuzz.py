"""Generated "qsr" sections and config files: QSRConfigError or a config that can really run.

A section either fails with one QSRConfigError that names the file (and the key, when one
key is to blame), or it yields a QSRConfig from which everything training builds at start
(the schedule, the H of any round, the process-group timeout, the bucket size, R for a
world size) works without raising. Nothing else may escape, whatever the input: wrong
types, NaN and Infinity (JSON accepts both), huge and tiny numbers, unknown keys, text
that is not JSON or not UTF-8.
"""
from __future__ import annotations

import dataclasses
import json
import math
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qsr_ds.config import AVERAGE_CHOICES, KERNEL_CHOICES, QSRConfig, QSRConfigError, _KEYS, from_dict, load
from qsr_ds.schedule import RULES

pytestmark = pytest.mark.timeout(120)

SOURCE = "fuzz.json"
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
ints = st.one_of(st.integers(-3, 60), st.integers(-(10**30), 10**30))
numbers = st.one_of(ints, st.floats(allow_nan=True, allow_infinity=True), st.floats(1e-12, 1e12),
                    st.sampled_from([0.0, 1e-300, 5e-324, 1e300, 1.7976931348623157e308]))

# values that are often valid, so that accepted sections are generated too
plausible = {
    "rule": st.one_of(st.sampled_from(RULES), st.text(max_size=6)),
    "h_base": ints,
    "alpha": numbers,
    "gamma": st.one_of(st.none(), numbers),
    "warmup_steps": ints,
    "total_steps": ints,
    "switch_step": st.one_of(st.none(), ints),
    "ranks_per_replica": ints,
    "average": st.lists(st.sampled_from(AVERAGE_CHOICES + ("exp_avg2", "")), max_size=6),
    "bucket_mb": numbers,
    "kernel": st.one_of(st.sampled_from(KERNEL_CHOICES), st.text(max_size=5)),
    "check_finite": st.one_of(st.booleans(), junk),
    "timeout_s": numbers,
}
key = st.one_of(st.sampled_from(_KEYS), st.sampled_from(["h_bsae", "Rule", "alpha ", ""]), st.text(max_size=8))
sections = st.one_of(
    st.fixed_dictionaries({}, optional={k: st.one_of(v, junk) if k != "rule" else v for k, v in plausible.items()}),
    st.fixed_dictionaries({}, optional=plausible),
    st.dictionaries(key, junk, max_size=5),
)


def _check_runs(config: QSRConfig) -> None:
    """What qsr_ds.initialize, Topology.create and ReplicaAverager build from an accepted section."""
    assert isinstance(config.h_base, int) and config.h_base >= 1
    assert isinstance(config.total_steps, int) and config.total_steps >= 1
    assert isinstance(config.ranks_per_replica, int) and config.ranks_per_replica >= 1
    assert math.isfinite(config.alpha) and config.alpha >= 0
    assert config.rule in RULES and config.kernel in KERNEL_CHOICES
    assert "params" in config.average and set(config.average) <= set(AVERAGE_CHOICES)
    assert isinstance(config.check_finite, bool)
    timedelta(seconds=config.timeout_s)  # Topology.create's process-group timeout
    assert timedelta(seconds=config.timeout_s) > timedelta(0)
    assert max(1, int(config.bucket_mb * 2**20) // 4) >= 1  # ReplicaAverager's bucket size in floats
    schedule = config.schedule()
    for step in {0, config.warmup_steps, config.total_steps - 1, min(config.total_steps - 1, 10**6)}:
        if 0 <= step < config.total_steps:
            for lr in (1e-12, 3e-4, 1.0, 1e6):
                h = schedule.next_h(step, lr)
                assert 1 <= h <= config.total_steps - step
    for world in (1, config.ranks_per_replica, 2 * config.ranks_per_replica, 7):
        try:
            assert config.num_replicas(world) * config.ranks_per_replica == world
        except QSRConfigError as err:
            assert SOURCE in str(err) and "ranks_per_replica" in str(err)
    assert from_dict(config.to_dict(), SOURCE) == config  # what a checkpoint or a log would carry back


@FUZZ
@given(sections)
@example({"bucket_mb": float("inf")})
@example({"bucket_mb": 1e303})
@example({"timeout_s": float("inf")})
@example({"timeout_s": 1e300})
@example({"timeout_s": 1e-9})
@example({"rule": "post_local", "switch_step": 3, "h_base": 10**30})
def test_a_generated_section_is_rejected_clearly_or_can_run(section):
    try:
        config = from_dict(section, SOURCE)
    except QSRConfigError as err:
        message = str(err)
        assert message.startswith(f"{SOURCE}: "), message
        assert "qsr" in message, message
        return
    _check_runs(config)


@FUZZ
@given(st.one_of(st.binary(max_size=60), st.text(max_size=60).map(str.encode),
                 st.recursive(junk, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                              max_leaves=8).map(lambda doc: json.dumps({"qsr": doc}).encode()),
                 sections.map(lambda sec: json.dumps({"train_batch_size": 8, "qsr": sec}).encode())))
@example(b"\xff\xfe{}")
@example(b'{"qsr": {"alpha": NaN, "bucket_mb": Infinity}}')
@example(b"[" * 100_000)
def test_a_generated_config_file_is_rejected_clearly_or_can_run(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / SOURCE
    path.write_bytes(data)
    try:
        config = load(path)
    except QSRConfigError as err:
        assert str(err).startswith(str(path)), str(err)
        return
    _check_runs(dataclasses.replace(config, source=SOURCE))


# ------------------------------------------------ the "qsr" section against the "scheduler" section

schedulers = st.one_of(
    st.builds(lambda total, warm, ratio, cos: {"type": "WarmupCosineLR", "params": {
        "total_num_steps": total, "warmup_num_steps": warm, "warmup_min_ratio": ratio, "cos_min_ratio": cos}},
        st.integers(1, 120), st.integers(1, 40), st.sampled_from([0.0, 0.01, 0.5]), st.sampled_from([0.0, 0.1])),
    st.builds(lambda total, warm, lr: {"type": "WarmupDecayLR", "params": {
        "total_num_steps": total, "warmup_num_steps": warm, "warmup_max_lr": lr}},
        st.integers(1, 120), st.integers(1, 40), st.sampled_from([1e-3, 0.1])),
    st.builds(lambda warm, low: {"type": "WarmupLR", "params": {"warmup_num_steps": warm, "warmup_min_lr": low,
                                                                "warmup_max_lr": 0.01}},
              st.integers(1, 40), st.sampled_from([0.0, 1e-5])),
)
lr_sections = st.fixed_dictionaries({
    "rule": st.sampled_from(["qsr", "linear", "cubic"]), "h_base": st.integers(1, 6),
    "alpha": st.sampled_from([0.001, 0.01, 0.05]), "warmup_steps": st.integers(0, 50),
    "total_steps": st.integers(1, 120)})


@FUZZ
@given(schedulers, lr_sections)
def test_a_scheduler_that_reaches_lr_0_at_a_round_start_is_refused_at_start_up(scheduler, section):
    from qsr_ds.planning.lr import check_planned_rounds, lr_fn_from_deepspeed
    from qsr_ds.schedule import SyncTracker

    ds_config = {"optimizer": {"type": "AdamW", "params": {"lr": 0.003}}, "scheduler": scheduler, "qsr": section}
    config = from_dict(section, SOURCE)
    try:
        check_planned_rounds(ds_config, config, SOURCE)
    except QSRConfigError as err:
        assert str(err).startswith(f"{SOURCE}: qsr: learning rate must be > 0"), str(err)
        return
    # accepted: the tracker, driven the way the DeepSpeed hook drives it, never fails mid-run
    lr_at = lr_fn_from_deepspeed(ds_config, SOURCE)
    tracker = SyncTracker(config.schedule(), lr_at(0))
    rounds = sum(tracker.on_step(lr_at(step + 1)) for step in range(config.total_steps))
    assert tracker.finished and rounds == tracker.rounds_done >= 1


def test_initialize_refuses_such_a_scheduler_before_any_process_group_traffic():
    import torch
    import torch.distributed as dist

    import qsr_ds

    model = torch.nn.Linear(4, 4)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 10, "warmup_num_steps": 2,
                                                                "warmup_max_lr": 0.01}},
              "qsr": {"rule": "qsr", "h_base": 2, "alpha": 0.001, "warmup_steps": 2, "total_steps": 24}}
    with pytest.raises(QSRConfigError) as err:
        qsr_ds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01), config=config)
    assert not dist.is_initialized()
    assert str(err.value).startswith("<config dict>: qsr: learning rate must be > 0 for rule 'qsr', got 0.0 at step ")
    assert "total_num_steps >= qsr.total_steps" in str(err.value)
