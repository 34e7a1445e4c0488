"""optim/factory.py: every --optimizer choice builds, keeps 1-D tensors out of weight decay, and takes a
step; 1-D tensors run at --lr-1d-scale times the lr; an unknown name is one clear error."""

from __future__ import annotations

import pytest
import torch

from optim.factory import OPTIMIZERS, build_optimizer
from optim.lars import set_lr


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_choice_excludes_1d_tensors_from_weight_decay_and_steps(name):
    net = small_net()
    optimizer = build_optimizer(name, net.parameters(), lr=0.1, weight_decay=0.5)
    by_rank = {tuple(p.ndim for p in g["params"]): g["weight_decay"] for g in optimizer.param_groups}
    assert by_rank == {(2,): 0.5, (1, 1, 1): 0.0}  # the weight matrix decays; bias and BN weights do not
    assert all(("lars_adapt" in g) == name.startswith("lars") for g in optimizer.param_groups)
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))


def test_an_unknown_name_is_one_clear_error():
    with pytest.raises(ValueError, match=r"^unknown --optimizer 'adamw'; choose one of lars, lars-loop, "):
        build_optimizer("adamw", small_net().parameters(), lr=0.1, weight_decay=0.0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_1d_group_runs_at_its_scale_of_every_scheduled_lr(name):
    optimizer = build_optimizer(name, small_net().parameters(), lr=0.8, weight_decay=0.5, lr_1d_scale=0.25)
    lrs = {tuple(p.ndim for p in g["params"]): float(g["lr"]) for g in optimizer.param_groups}
    assert lrs == {(2,): pytest.approx(0.8), (1, 1, 1): pytest.approx(0.2)}  # from the start, before any set_lr
    set_lr(optimizer, 0.3)  # what ByolStep does before every step
    lrs = {tuple(p.ndim for p in g["params"]): float(g["lr"]) for g in optimizer.param_groups}
    assert lrs == {(2,): pytest.approx(0.3), (1, 1, 1): pytest.approx(0.075)}


@pytest.mark.parametrize("name", ["lars", "lars-loop", "sgd"])
def test_1d_tensors_take_plain_momentum_sgd_at_the_scaled_lr_and_matrices_full_lars(name):
    # Hand-computed first step (momentum buffers start at the gradient): a 1-D tensor moves by lr * scale * g
    # exactly (no weight decay, no trust ratio); the matrix moves by lr * r * (g + wd p) with LARS's ratio
    # r = eta ||p|| / ||g + wd p|| (sgd: r = 1).
    net = small_net()
    lr, scale, wd, eta = 0.3, 0.1, 0.5, 0.02
    optimizer = build_optimizer(name, net.parameters(), lr=1.0, weight_decay=wd, eta=eta, lr_1d_scale=scale)
    set_lr(optimizer, lr)
    net(torch.randn(8, 4)).square().mean().backward()
    before = [(p.detach().clone(), p.grad.clone()) for p in net.parameters()]
    optimizer.step()
    for param, (p0, g) in zip(net.parameters(), before, strict=True):
        if p0.ndim == 1:
            expected = p0 - lr * scale * g
        else:
            u = g + wd * p0
            ratio = eta * p0.norm() / u.norm() if name.startswith("lars") else 1.0
            expected = p0 - lr * ratio * u
        torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-7)
