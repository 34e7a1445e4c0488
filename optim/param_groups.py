"""The parameter-group rule every --optimizer shares: 1-D tensors (biases, norm weights) get no weight
decay and no LARS trust ratio, as in the official BYOL code, and their learning rate is the schedule's
times `lr_scale` (1.0 in the official code; the small-image recipe's value is measured in docs/recipe.md)."""

from __future__ import annotations

from typing import Any


def split_1d_params(groups: list[dict[str, Any]], lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Move every 1-D tensor of each group into a sibling group without weight decay or trust ratio.

    Parameters
    ----------
    groups: param-group dicts; their other keys are kept in both halves.
    lr_scale: the 1-D group's learning rate as a multiple of the schedule's (`optim.lars.set_lr` reads it).
    """
    result = []
    for group in groups:
        params = list(group["params"])
        matrices = [p for p in params if p.ndim > 1]
        vectors = [p for p in params if p.ndim <= 1]
        if matrices:
            result.append({**group, "params": matrices})
        if vectors:
            result.append({**group, "params": vectors, "weight_decay": 0.0, "lars_adapt": False, "lr_scale": lr_scale})
    return result
