"""models/byol.py: the BYOL loss, its gradients, target isolation, per-view BN and the EMA against hand
computations (the schedules: test_schedules.py; the backbones: test_backbones.py)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_byol

from models.byol import byol_loss, ema_update_
from optim.factory import build_optimizer
from optim.schedules import tau_at


def test_loss_value_matches_hand_computation():
    p = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]])
    z = torch.tensor([[4.0, 3.0, 0.0], [0.0, 2.0, 0.0]])
    # cos = 24/25 for the first pair, 0 for the orthogonal second pair.
    expected = torch.tensor([2 - 2 * 24 / 25, 2.0])
    torch.testing.assert_close(byol_loss(p, z), expected)


def test_loss_gradient_matches_hand_derivative_and_stops_at_target():
    p = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([[1.5, 0.3, -0.7]], dtype=torch.float64, requires_grad=True)
    byol_loss(p, z).sum().backward()
    pn, zn = p.detach().norm(), z.detach().norm()
    dot = (p.detach() * z.detach()).sum()
    # d/dp [2 - 2 p.z / (|p||z|)] = -2 (z / (|p||z|) - (p.z) p / (|p|^3 |z|))
    expected = -2 * (z.detach() / (pn * zn) - dot * p.detach() / (pn**3 * zn))
    torch.testing.assert_close(p.grad, expected)
    assert z.grad is None


def test_symmetric_loss_is_the_two_directed_losses():
    byol = tiny_byol()
    v1, v2 = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    p1, p2 = byol.online(v1, v2)
    z1, z2 = byol.target(v1), byol.target(v2)
    expected = (byol_loss(p1, z2) + byol_loss(p2, z1)).mean()
    torch.testing.assert_close(byol(v1, v2), expected)


def test_target_gets_no_gradient_and_is_not_optimized():
    byol = tiny_byol()
    opt = build_optimizer("lars", byol.online.parameters(), lr=0.1, weight_decay=1e-6)
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in byol.target.parameters()}
    assert optimized == {id(p) for p in byol.online.parameters()}
    byol(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)).backward()
    assert all(p.grad is None and not p.requires_grad for p in byol.target.parameters())
    assert all(p.grad is not None for p in byol.online.parameters())


def test_ema_update_follows_tau_formula():
    byol = tiny_byol()
    with torch.no_grad():
        for p in byol.online.parameters():
            p.add_(torch.randn_like(p))
    target, online = byol.ema_pairs()
    before = [t.clone() for t in target]
    tau = tau_at(30, 100, 0.99)
    ema_update_(target, online, torch.tensor(tau))
    for new, old, theta in zip(target, before, online, strict=True):
        torch.testing.assert_close(new, tau * old + (1 - tau) * theta.detach())
    # EMA touches parameters only: the target's BN running statistics are its own.
    assert len(target) == len(list(byol.target.parameters()))


@pytest.mark.parametrize("bn_per_view", [True, False])
def test_bn_statistics_per_view_or_concatenated(bn_per_view):
    byol = tiny_byol(bn_per_view)
    v1, v2 = torch.randn(5, 3, 8, 8), 3 + torch.randn(5, 3, 8, 8)
    p1, _ = byol.online(v1, v2)
    alone = byol.online.predict(v1)
    together = byol.online.predict(torch.cat([v1, v2]))[:5]
    torch.testing.assert_close(p1, alone if bn_per_view else together)
    assert not torch.allclose(alone, together)


