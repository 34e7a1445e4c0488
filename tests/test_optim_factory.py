"""optim/factory.py: every --optimizer choice builds, keeps 1-D tensors out of weight decay, and takes a
step; an unknown name is one clear error."""

from __future__ import annotations

import pytest
import torch

from optim.factory import OPTIMIZERS, build_optimizer


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
