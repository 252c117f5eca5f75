"""qsr_ds.planning.lr against DeepSpeed's own scheduler classes, float for float."""
import math
import os

import pytest

from qsr_ds.config import QSRConfigError
from qsr_ds.planning.lr import WarmupCosineLR, lr_fn_from_deepspeed

os.environ.setdefault("DS_ACCELERATOR", "cpu")

BASE_LR = 0.003

CASES = [
    ("WarmupLR", {"warmup_min_lr": 1e-5, "warmup_max_lr": 0.01, "warmup_num_steps": 37}),
    ("WarmupLR", {"warmup_num_steps": 1}),  # max lr from the optimizer; DeepSpeed clamps warm-up to 2
    ("WarmupDecayLR", {"total_num_steps": 150, "warmup_min_lr": 1e-4, "warmup_max_lr": 0.02, "warmup_num_steps": 30}),
    ("WarmupDecayLR", {"total_num_steps": 20, "warmup_num_steps": 40}),  # default max 0.001, total < warm-up
    ("WarmupCosineLR", {"total_num_steps": 150, "warmup_num_steps": 30, "warmup_min_ratio": 0.01, "cos_min_ratio": 0.05}),
    ("WarmupCosineLR", {"total_num_steps": 93600, "warmup_num_steps": 10000, "warmup_min_ratio": 0.000125,
                        "cos_min_ratio": 0.000125}),
    ("WarmupCosineLR", {"total_num_steps": 10, "warmup_num_steps": 20}),  # no decay window
]


def deepspeed_lrs(kind: str, params: dict, steps: int) -> list[float]:
    """The lr each optimizer step sees under DeepSpeed's engine order: step, then scheduler.step()."""
    torch = pytest.importorskip("torch")
    lr_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE_LR)
    scheduler = getattr(lr_schedules, kind)(optimizer, **params)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    return out


@pytest.mark.parametrize("warmup_type", ["log", "linear"])
@pytest.mark.parametrize("kind,params", CASES)
def test_matches_deepspeed_step_by_step(kind, params, warmup_type):
    params = dict(params, warmup_type=warmup_type)
    ds_config = {"optimizer": {"type": "AdamW", "params": {"lr": BASE_LR}}, "scheduler": {"type": kind, "params": params}}
    lr_at = lr_fn_from_deepspeed(ds_config, "test.json")
    total = params.get("total_num_steps", 120)
    steps = list(range(min(total + 5, 400)))
    if total > 400:  # a long schedule: the start, the warm-up end and the tail
        w = params["warmup_num_steps"]
        steps += list(range(w - 3, w + 3)) + [total // 2, total - 2, total - 1, total]
    expected = deepspeed_lrs(kind, params, max(steps) + 1)
    assert [lr_at(s) for s in steps] == [expected[s] for s in steps]


def test_first_step_uses_the_value_before_any_scheduler_step():
    cosine = {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_min_ratio": 0.5}},
              "optimizer": {"params": {"lr": 0.1}}}
    assert lr_fn_from_deepspeed(cosine, "x.json")(0) == 0.0  # DeepSpeed's quirk: ratio 0 at iteration -1
    assert lr_fn_from_deepspeed(cosine, "x.json")(1) == 0.05
    warm = {"scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.002, "warmup_max_lr": 0.1}}}
    assert lr_fn_from_deepspeed(warm, "x.json")(0) == 0.002


def test_cosine_after_warmup_is_the_papers_cosine():
    lr_at = WarmupCosineLR(base_lr=0.008, total_num_steps=93600, warmup_num_steps=10000, warmup_type="linear",
                           warmup_min_ratio=0.000125, cos_min_ratio=0.000125)
    paper = 1e-6 + 0.5 * (0.008 - 1e-6) * (1 + math.cos(math.pi / 83600))
    assert lr_at(10001) == pytest.approx(paper, rel=1e-12)
    assert lr_at(10000) == pytest.approx(1e-6 + (0.008 - 1e-6) * 9999 / 10000)  # warm-up lags one step


def test_base_lr_stands_in_for_the_optimizer_section():
    cfg = {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_num_steps": 2}}}
    expected = 0.5 * (0.0001 + 0.9999 * (1 + math.cos(math.pi * 1 / 8)) / 2)  # step 3: iteration 2, cosine step 1 of 8
    assert lr_fn_from_deepspeed(cfg, "x.json", base_lr=0.5)(3) == pytest.approx(expected)


@pytest.mark.parametrize(
    "ds_config,needles",
    [
        ({}, ['no "scheduler" section', "add one to cfg.json", '"scheduler": {"type": "WarmupCosineLR"']),
        ({"scheduler": {"type": "OneCycle", "params": {}}}, ["cfg.json", "scheduler.type", "'OneCycle'", "WarmupCosineLR"]),
        ({"scheduler": {"params": {}}}, ["cfg.json", "scheduler.type", "None"]),
        ({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 5}}},
         ["cfg.json", "WarmupCosineLR takes the optimizer's lr", '"optimizer"']),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1, "warmup_nm_steps": 5}}},
         ["cfg.json", "scheduler.params.warmup_nm_steps", "warmup_num_steps"]),
        ({"scheduler": {"type": "WarmupDecayLR", "params": {}}}, ["cfg.json", "total_num_steps"]),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1, "warmup_num_steps": 0}}},
         ["cfg.json", "warmup_num_steps", "positive integer"]),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "1e-3"}}}, ["cfg.json", "warmup_max_lr", "number"]),
    ],
)
def test_bad_scheduler_sections(ds_config, needles):
    with pytest.raises(QSRConfigError) as err:
        lr_fn_from_deepspeed(ds_config, "cfg.json")
    for needle in needles:
        assert needle in str(err.value)
