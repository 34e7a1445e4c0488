"""Fused LARS against an independent per-parameter float64 loop of the official BYOL formula."""

from __future__ import annotations

import pytest
import torch
import torch_optimizer
from lars_reference import make_grads, make_params, reference_lars_step

from optim.lars import LARS, PerParameterLARS, scale_each, set_lr
from optim.param_groups import split_1d_params


@pytest.mark.parametrize("kind", [LARS, PerParameterLARS])
@pytest.mark.parametrize("lr_as_tensor", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_matches_per_parameter_loop(kind, lr_as_tensor, weight_decay):
    """The fused optimizer and the benchmark's loop (`lars-loop`) both follow the recipe's formula."""
    lr, momentum, eta = 0.7, 0.9, 1e-3
    params = [p.clone().requires_grad_() for p in make_params()]
    ref_params = [p.clone() for p in make_params()]
    ref_buffers = [torch.zeros_like(p) for p in ref_params]
    adapt = [p.ndim > 1 for p in ref_params]
    opt = kind(params, lr=torch.tensor(lr, dtype=torch.float64) if lr_as_tensor else lr,
               momentum=momentum, weight_decay=weight_decay, eta=eta)
    for step in range(5):
        grads = make_grads(ref_params, step)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        reference_lars_step(ref_params, grads, ref_buffers, lr, momentum, weight_decay, eta, adapt)
        for got, want in zip(params, ref_params, strict=True):
            torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-12)
    # The zero-norm weight moved (r = 1, plain momentum), and the parameters really changed.
    assert params[2].detach().abs().sum() > 0
    assert not torch.allclose(params[0].detach(), make_params()[0])


def test_1d_params_excluded_from_decay_and_trust_ratio_by_default():
    params = make_params()
    opt = LARS([p.requires_grad_() for p in params], lr=0.1, weight_decay=0.5)
    by_shape = {tuple(p.shape): g for g in opt.param_groups for p in g["params"]}
    assert by_shape[(5,)]["weight_decay"] == 0.0 and not by_shape[(5,)]["lars_adapt"]
    assert by_shape[(8, 5)]["weight_decay"] == 0.5 and by_shape[(8, 5)]["lars_adapt"]


def test_agrees_with_torch_optimizer_where_the_formulas_coincide():
    """r = eta||p||/||g + wd p|| equals torch-optimizer's eta||p||/(||g|| + wd||p||) when g is a
    positive multiple of p (then ||g + wd p|| = ||g|| + wd ||p||)."""
    ours = [p.clone().requires_grad_() for p in make_params()[:2]]
    theirs = [p.clone().requires_grad_() for p in make_params()[:2]]
    kwargs = dict(lr=0.5, momentum=0.9, weight_decay=1e-2)
    opt_ours = LARS(ours, eta=1e-3, **kwargs)
    opt_theirs = torch_optimizer.LARS(split_1d_params([{"params": theirs}]), trust_coefficient=1e-3, eps=0.0, **kwargs)
    for scale in (0.3, 2.0, 5.0):
        for a, b in zip(ours, theirs, strict=True):
            a.grad = scale * a.detach().clone()
            b.grad = scale * b.detach().clone()
        opt_ours.step()
        opt_theirs.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_state_dict_round_trip_continues_identically():
    def run(opt, params, steps):
        for step in steps:
            for p, g in zip(params, make_grads(params, step), strict=True):
                p.grad = g
            opt.step()

    straight = [p.clone().requires_grad_() for p in make_params()]
    opt = LARS(straight, lr=0.3, weight_decay=1e-3)
    run(opt, straight, range(4))

    first = [p.clone().requires_grad_() for p in make_params()]
    opt_first = LARS(first, lr=0.3, weight_decay=1e-3)
    run(opt_first, first, range(2))
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt_resumed = LARS(resumed, lr=0.0, weight_decay=1e-3)
    opt_resumed.load_state_dict(opt_first.state_dict())
    assert opt_resumed.param_groups[0]["lr"] == 0.3
    run(opt_resumed, resumed, range(2, 4))
    for a, b in zip(straight, resumed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_set_lr_fills_tensor_in_place():
    lr = torch.tensor(0.1)
    opt = LARS([torch.zeros(2, 2, requires_grad=True)], lr=lr)
    set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == 0.25


def test_scale_each_equals_per_tensor_multiply_and_keeps_layouts():
    gen = torch.Generator().manual_seed(7)
    tensors = [
        torch.randn(6, 4, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last),
        torch.randn(5, 7, generator=gen),
        torch.randn(7, 5, generator=gen).t(),  # transposed: memory order differs from dim order
        torch.randn(3, generator=gen),
        torch.randn(2, 1, 1, 4, generator=gen).contiguous(memory_format=torch.channels_last),
    ]
    scales = torch.randn(len(tensors), generator=gen)
    scaled = scale_each(tensors, scales)
    for t, s, got in zip(tensors, scales, scaled, strict=True):
        torch.testing.assert_close(got, t * s.item(), rtol=0, atol=0)
        assert got.stride() == t.stride()


def test_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="momentum"):
        LARS([torch.zeros(2, requires_grad=True)], lr=0.1, momentum=1.5)


@pytest.mark.gpu
def test_step_has_no_host_sync_on_cuda():
    params = [p.cuda().float().requires_grad_() for p in make_params()]
    opt = LARS(params, lr=torch.tensor(0.1, device="cuda"), weight_decay=1e-6)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # allocates momentum buffers
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
