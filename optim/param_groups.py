"""The parameter-group rule every --optimizer shares: 1-D tensors (biases, norm weights) get no weight
decay and no LARS trust ratio, as in the official BYOL code."""

from __future__ import annotations

from typing import Any


def split_1d_params(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move every 1-D tensor of each group into a sibling group without weight decay or trust ratio."""
    result = []
    for group in groups:
        params = list(group["params"])
        matrices = [p for p in params if p.ndim > 1]
        vectors = [p for p in params if p.ndim <= 1]
        if matrices:
            result.append({**group, "params": matrices})
        if vectors:
            result.append({**group, "params": vectors, "weight_decay": 0.0, "lars_adapt": False})
    return result
