"""optim/schedules.py: the tau and learning-rate schedules against hand values."""

from __future__ import annotations

import math

import pytest

from optim.schedules import Schedule, lr_at, scaled_lr, tau_at, warmup_steps


def test_tau_schedule_hand_values():
    assert tau_at(0, 100, 0.99) == pytest.approx(0.99)
    assert tau_at(100, 100, 0.99) == pytest.approx(1.0)
    assert tau_at(50, 100, 0.99) == pytest.approx(1 - 0.01 * 0.5)
    assert tau_at(25, 100, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)


def test_lr_schedule_warmup_then_cosine():
    peak = scaled_lr(0.45, 512)
    assert peak == pytest.approx(0.9)
    assert lr_at(0, 1000, peak, 100) == 0.0
    assert lr_at(50, 1000, peak, 100) == pytest.approx(0.45)
    assert lr_at(100, 1000, peak, 100) == pytest.approx(peak)
    assert lr_at(550, 1000, peak, 100) == pytest.approx(peak / 2)
    assert lr_at(1000, 1000, peak, 100) == pytest.approx(0.0, abs=1e-12)


def test_short_run_warms_up_a_tenth_then_anneals_to_zero():
    # 5 epochs of 100 steps with the recipe's 10 warmup epochs: the warmup is capped at 50 steps.
    total = 500
    warmup = warmup_steps(total, steps_per_epoch=100, warmup_epochs=10)
    assert warmup == 50
    lrs = [lr_at(step, total, 1.0, warmup) for step in range(total + 1)]
    assert lrs[warmup] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert lrs[total - 1] < 1e-4 and lrs[total] == pytest.approx(0.0, abs=1e-12)
    # A long run keeps the recipe's epochs: 10 of 300.
    assert warmup_steps(300 * 100, steps_per_epoch=100, warmup_epochs=10) == 1000


def test_schedule_is_the_run_s_lr_and_tau_by_hand():
    schedule = Schedule(total_steps=10, steps_per_epoch=5, peak_lr=2.0, warmup_steps=2, tau_base=0.9)
    assert [schedule.lr(k) for k in (0, 1, 2)] == [0.0, 1.0, 2.0]  # linear warmup over 2 steps
    assert schedule.lr(6) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))  # cosine: 4 of 8 steps
    assert schedule.lr(10) == pytest.approx(0.0)
    assert (schedule.tau(0), schedule.tau(10)) == (pytest.approx(0.9), pytest.approx(1.0))
