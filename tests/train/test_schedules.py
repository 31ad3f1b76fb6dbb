"""Schedules: DINOv3's own scheduler tables (fixture), closed forms, and the lr scaling rule."""

import math
from pathlib import Path

import jax
import numpy as np
import pytest

from braindino_jax.train.schedules import Schedules, scaled_lr, warmup_cosine

FIXTURE = Path(__file__).parent.parent / "fixtures" / "dinov3_schedules.npz"


def _schedules(total, warmup, temp_warmup, freeze) -> Schedules:
    return Schedules(total_steps=total, lr=4e-3, min_lr=1e-6, lr_warmup_steps=warmup,
                     weight_decay=0.04, weight_decay_end=0.4, momentum=0.992, momentum_end=1.0,
                     teacher_temp=0.07, teacher_temp_start=0.04,
                     teacher_temp_warmup_steps=temp_warmup, freeze_last_layer_steps=freeze)


@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_schedules_equal_dinov3_cosine_scheduler_tables(case):
    """Every step of Meta's CosineScheduler tables (tools/make_dinov3_schedule_fixture.py)."""
    ref = np.load(FIXTURE)
    total, warmup, temp_warmup, freeze = (int(v) for v in ref[f"{case}/config"])
    sched = _schedules(total, warmup, temp_warmup, freeze)
    steps = np.arange(len(ref[f"{case}/lr"]))
    ours = jax.vmap(sched)(steps)
    for name in ("lr", "weight_decay", "momentum", "teacher_temp"):
        np.testing.assert_allclose(ours[name], ref[f"{case}/{name}"], rtol=2e-6, atol=1e-9,
                                   err_msg=name)
    np.testing.assert_allclose(ours["lr"] * ours["last_layer_lr_scale"],
                               ref[f"{case}/last_layer_lr"], rtol=2e-6, atol=1e-9)


def test_closed_forms_at_chosen_steps():
    total, warmup = 1000, 100
    s = _schedules(total, warmup, 300, 125)
    at = lambda step: {k: float(v) for k, v in s(step).items()}  # noqa: E731
    assert at(0)["lr"] == 0.0
    assert at(50)["lr"] == pytest.approx(4e-3 * 50 / 99, rel=1e-6)
    assert at(99)["lr"] == pytest.approx(4e-3, rel=1e-6)
    mid = 100 + 450  # half-way through the cosine: the mean of the ends
    assert at(mid)["lr"] == pytest.approx((4e-3 + 1e-6) / 2, rel=1e-5)
    assert at(total + 7)["lr"] == pytest.approx(1e-6)
    assert at(0)["weight_decay"] == pytest.approx(0.04)
    assert at(500)["weight_decay"] == pytest.approx(0.22, rel=1e-6)
    assert at(total)["weight_decay"] == pytest.approx(0.4)
    assert at(0)["momentum"] == pytest.approx(0.992)
    assert at(250)["momentum"] == pytest.approx(1 - 0.008 * (1 + math.cos(math.pi / 4)) / 2,
                                                rel=1e-6)
    assert at(0)["teacher_temp"] == pytest.approx(0.04)
    assert at(299)["teacher_temp"] == pytest.approx(0.07)
    assert at(150)["teacher_temp"] == pytest.approx(0.04 + 0.03 * 150 / 299, rel=1e-6)
    assert at(900)["teacher_temp"] == pytest.approx(0.07)
    assert at(124)["last_layer_lr_scale"] == 0.0 and at(125)["last_layer_lr_scale"] == 1.0


def test_lr_scaling_rule_and_bad_arguments():
    assert scaled_lr(1e-3, 1024) == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 256) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="scaling_rule"):
        scaled_lr(1e-3, 256, "cubic")
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, 1.0, 0.0, total_steps=10, warmup_steps=11)
