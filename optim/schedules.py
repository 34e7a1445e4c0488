"""Per-step schedules from the recipe: LR (scaled, linear warmup, cosine to 0) and target EMA tau."""

from __future__ import annotations

import math
from dataclasses import dataclass


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
    """lr = base_lr * batch / 256 (the recipe's linear scaling rule); `global_batch_size`: over all ranks."""
    return base_lr * global_batch_size / 256


# The official runs warm up 10 of 300-1000 epochs; a run shorter than 100 epochs would otherwise spend
# more than a tenth of itself (a run of <= 10 epochs: all of itself) warming up and never anneal.
MAX_WARMUP_FRACTION = 0.1


def warmup_steps(total_steps: int, steps_per_epoch: int, warmup_epochs: float) -> int:
    """`warmup_epochs` of steps, at most MAX_WARMUP_FRACTION of the run.

    Parameters
    ----------
    total_steps: the run's optimizer steps (epochs * steps_per_epoch).
    steps_per_epoch: the loader's batches per epoch (`len(loader)`).
    warmup_epochs: --warmup-epochs; fractions of an epoch allowed.
    """
    return min(round(warmup_epochs * steps_per_epoch), round(MAX_WARMUP_FRACTION * total_steps))


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warmup from 0 to peak over warmup_steps, then cosine decay to 0 at total_steps.

    Parameters
    ----------
    step: the optimizer step, counted from 0 (0 gives lr 0 when warming up); steps past total_steps give 0.
    total_steps: the run's optimizer steps.
    peak_lr: the lr at the end of the warmup (`scaled_lr`).
    warmup_steps: `warmup_steps(...)`; 0 starts at peak_lr.
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))


def tau_at(step: int, total_steps: int, tau_base: float) -> float:
    """tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2: tau_base at k = 0, 1 at k = K.

    Parameters
    ----------
    step: k, the optimizer step counted from 0; clamped at total_steps.
    total_steps: K, the run's optimizer steps.
    tau_base: the EMA decay at the start (--tau-base; the recipe's 0.996 at 1000 epochs, lower for shorter runs).
    """
    return 1 - (1 - tau_base) * (math.cos(math.pi * min(step, total_steps) / max(1, total_steps)) + 1) / 2


@dataclass(frozen=True)
class Schedule:
    """One run's schedules: `total_steps` optimizer steps of `steps_per_epoch` each epoch, lr warming up
    over `warmup_steps` to `peak_lr` then annealing to 0, and tau rising from `tau_base` to 1."""

    total_steps: int
    steps_per_epoch: int
    peak_lr: float
    warmup_steps: int
    tau_base: float

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.peak_lr, self.warmup_steps)

    def tau(self, step: int) -> float:
        return tau_at(step, self.total_steps, self.tau_base)
