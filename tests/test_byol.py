"""BYOL loss, gradients, target isolation, EMA and schedules against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torchvision

from models.backbones import build_backbone
from models.byol import BYOL, byol_loss, ema_update_
from optim.factory import build_optimizer
from optim.schedules import lr_at, scaled_lr, tau_at, warmup_steps


def tiny_encoder() -> tuple[nn.Module, int]:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, 8


def tiny_byol(bn_per_view: bool = True) -> BYOL:
    torch.manual_seed(0)
    encoder, dim = tiny_encoder()
    return BYOL(encoder, dim, hidden_dim=16, proj_dim=4, bn_per_view=bn_per_view)


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


@pytest.mark.parametrize("bn_per_view", [True, False])
def test_bn_statistics_per_view_or_concatenated(bn_per_view):
    byol = tiny_byol(bn_per_view)
    v1, v2 = torch.randn(5, 3, 8, 8), 3 + torch.randn(5, 3, 8, 8)
    p1, _ = byol.online(v1, v2)
    alone = byol.online.predict(v1)
    together = byol.online.predict(torch.cat([v1, v2]))[:5]
    torch.testing.assert_close(p1, alone if bn_per_view else together)
    assert not torch.allclose(alone, together)


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet50", 2048)])
def test_backbone_features_and_torchvision_compatible_weights(arch, dim):
    encoder, feature_dim = build_backbone(arch)
    assert feature_dim == dim
    assert encoder(torch.randn(2, 3, 64, 64)).shape == (2, dim)
    missing, unexpected = getattr(torchvision.models, arch)().load_state_dict(encoder.state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


def test_small_image_stem_keeps_resolution():
    encoder, _ = build_backbone("resnet18", small_images=True)
    assert encoder.conv1.stride == (1, 1) and encoder.conv1.kernel_size == (3, 3)
    assert isinstance(encoder.maxpool, nn.Identity)
    assert encoder(torch.randn(2, 3, 28, 28)).shape == (2, 512)
    with pytest.raises(ValueError, match="unknown --arch"):
        build_backbone("vit")


@pytest.mark.parametrize("arch,widths,dim", [("resnet18", (16, 32, 64, 128), 128), ("resnet50", (8, 16, 32, 64), 256)])
def test_width_scales_every_stage_and_reloads(arch, widths, dim):
    encoder, feature_dim = build_backbone(arch, small_images=True, width=widths[0])
    assert feature_dim == dim and encoder.conv1.out_channels == encoder.bn1.num_features == widths[0]
    expansion = 4 if arch == "resnet50" else 1
    for stage, width in zip((encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4), widths, strict=True):
        assert stage[-1].bn1.num_features == width and stage[-1].conv1.in_channels == width * expansion
    assert encoder(torch.randn(2, 3, 16, 16)).shape == (2, dim)
    same, _ = build_backbone(arch, small_images=True, width=widths[0])
    same.load_state_dict(encoder.state_dict(), strict=True)  # a matching model takes the weights as they are
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_backbone(arch, small_images=True)[0].load_state_dict(encoder.state_dict(), strict=False)


def test_default_width_is_torchvisions_network():
    torch.manual_seed(0)
    ours = build_backbone("resnet50")[0]
    torch.manual_seed(0)
    reference = torchvision.models.resnet50()
    reference.fc = nn.Identity()
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # same initialisation, draw for draw


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
