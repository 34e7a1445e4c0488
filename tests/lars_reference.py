"""The LARS reference: the official BYOL formula as a plain float64 loop, one parameter at a time, with
the parameters (a weight, a bias, a zero-norm weight, a conv weight, one with zero gradients) and the
per-step gradients it is run on."""

from __future__ import annotations

import torch


def reference_lars_step(params, grads, buffers, lr, momentum, weight_decay, eta, adapt):
    """Plain loop, one parameter at a time, straight from docs/recipe.md."""
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        u = g + weight_decay * p if adapt[i] else g.clone()
        if adapt[i]:
            p_norm, u_norm = p.norm().item(), u.norm().item()
            ratio = eta * p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0
            u = ratio * u
        buffers[i] = momentum * buffers[i] + u
        params[i] = p - lr * buffers[i]


def make_params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(8, 5, generator=gen, dtype=torch.float64),         # weight
        torch.randn(5, generator=gen, dtype=torch.float64),            # bias: excluded
        torch.zeros(4, 3, dtype=torch.float64),                        # zero-norm weight: r = 1
        torch.randn(3, 3, 2, 2, generator=gen, dtype=torch.float64),   # conv weight
        torch.randn(6, 2, generator=gen, dtype=torch.float64),         # gets zero gradients
    ]


def make_grads(params, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    grads[4].zero_()
    return grads
