"""models/backbones.py: ResNet encoders with torchvision-compatible weights, the small-image stem and
--width."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

from models.backbones import SubsampledPointwiseConv, build_backbone


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


@pytest.mark.parametrize("channels", [4, 16])
def test_strided_shortcut_matches_a_plain_strided_conv_in_values_and_gradients(channels):
    torch.manual_seed(0)
    reference = nn.Conv2d(channels, 2 * channels, 1, stride=2, bias=False)
    ours = SubsampledPointwiseConv.replacing(nn.Conv2d(channels, 2 * channels, 1, stride=2, bias=False))
    ours.weight = nn.Parameter(reference.weight.detach().clone())
    x = torch.randn(8, channels, 9, 9)  # odd side: the subsample must keep the stride's first, third... pixels
    x_ours = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    x_ref = x.clone().requires_grad_()
    (ours(x_ours) ** 2).sum().backward()
    (reference(x_ref) ** 2).sum().backward()
    torch.testing.assert_close(ours(x_ours), reference(x_ref))
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad)


def test_every_strided_shortcut_of_a_narrow_resnet_avoids_the_broken_kernel():
    encoder, _ = build_backbone("resnet18", small_images=True, width=4)
    shortcuts = [m for m in encoder.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(shortcuts) == 3 and all(isinstance(m, SubsampledPointwiseConv) for m in shortcuts)


# A width-4 ResNet trained channels_last after an FFCV conversion: the heap state in which oneDNN's
# AVX2 strided 1x1 backward corrupted memory in 3 of 3 runs (a CI segfault) before the shortcut fix.
NARROW_TRAINING = """
import pathlib, sys, tempfile, torch
sys.path.insert(0, "tests")
from image_files import class_folders
from datasources.ffcv_convert import main as ffcv_convert
from models.backbones import build_backbone
tmp = pathlib.Path(tempfile.mkdtemp())
src = class_folders(tmp / "src", ["a", "b"], 20)
assert ffcv_convert(["--src", str(src), "--out", str(tmp / "x.beton"), "--max-res", "64", "--workers", "2"]) == 0
encoder, _ = build_backbone("resnet18", small_images=True, width=4)
encoder = encoder.to(memory_format=torch.channels_last)
for _ in range(20):
    encoder(torch.randn(8, 3, 8, 8).contiguous(memory_format=torch.channels_last)).sum().backward()
print("trained")
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_narrow_resnet_trains_channels_last_on_the_cpu_without_corrupting_memory():
    proc = subprocess.run([sys.executable, "-c", NARROW_TRAINING], capture_output=True, text=True, timeout=110,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and "trained" in proc.stdout, proc.stderr[-2000:]
