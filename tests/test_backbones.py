"""models/backbones.py: ResNet encoders with torchvision-compatible weights, the small-image stem and
--width."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from models.backbones import build_backbone


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
