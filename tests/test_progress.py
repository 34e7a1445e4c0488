"""benchmark/progress.py: the budget's arithmetic on a fake clock, and the heartbeat's lines (every phase
at once, then at most `interval` apart while nothing changes)."""

from __future__ import annotations

import io
import re
import time

import pytest

from benchmark.progress import HEARTBEAT_S, Budget, Heartbeat


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budget_counts_down_on_its_clock_and_refuses_what_cannot_fit() -> None:
    clock = FakeClock()
    budget = Budget(100, clock)
    assert budget.left() == 100 and budget.allow(30, reserve=50) == 50
    clock.now += 60
    assert budget.spent() == 60 and budget.left() == 40
    assert budget.allow(30, reserve=20) is None  # 30 s + 20 s kept for later > 40 s left
    assert budget.allow(20, reserve=20) == 20
    clock.now += 100
    assert budget.left() == 0 and budget.allow(0.1) is None
    started_earlier = Budget(100, clock, started=clock.now - 30)  # the time before it was made counts
    assert started_earlier.left() == 70


def test_no_budget_allows_everything() -> None:
    budget = Budget(None)
    assert budget.left() == float("inf") and budget.allow(1e9, reserve=1e9) == float("inf")
    assert not budget.limited


@pytest.mark.parametrize("seconds", [0, -5])
def test_a_budget_must_be_positive(seconds) -> None:
    with pytest.raises(ValueError, match="--budget must be above 0"):
        Budget(seconds)


def test_heartbeat_prints_each_phase_and_then_at_most_every_interval() -> None:
    out = io.StringIO()
    with Heartbeat("check", interval=0.1, stream=out) as beat:
        beat.phase("compiling")
        time.sleep(0.55)
        beat.status("child: step 3")  # silent now, shown by the next beat
        time.sleep(0.25)
    lines = out.getvalue().splitlines()
    assert lines[0] == "check: compiling"
    repeats = [line for line in lines if re.fullmatch(r"check: compiling, \d+ s", line)]
    assert len(repeats) >= 4  # 0.55 s at one line per 0.1 s, with slack for a busy machine
    assert any(re.fullmatch(r"check: child: step 3, \d+ s", line) for line in lines)
    assert HEARTBEAT_S <= 15  # the acceptance's promise: a line at least every 15 s
