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

from models.backbones import NarrowBatchNorm2d, SubsampledPointwiseConv, build_backbone


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


@pytest.mark.parametrize("channels", [8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_narrow_batch_norm_matches_batch_norm_in_values_gradients_and_running_stats(channels, dtype):
    torch.manual_seed(0)
    reference, ours = nn.BatchNorm2d(channels), NarrowBatchNorm2d(channels)
    with torch.no_grad():
        for module in (reference, ours):
            module.weight.copy_(torch.linspace(0.5, 2.0, channels))
            module.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    x = (3 * torch.randn(6, channels, 7, 7) + 1).to(dtype)
    x_ours = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    x_ref = x.clone().requires_grad_()
    grad = torch.randn(6, channels, 7, 7).to(dtype)
    y_ours, y_ref = ours(x_ours), reference(x_ref)
    y_ours.backward(grad.contiguous(memory_format=torch.channels_last))
    y_ref.backward(grad)
    assert y_ours.is_contiguous(memory_format=torch.channels_last)  # the next conv gets the layout it expects
    tol = {"rtol": 1e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(y_ours, y_ref, **tol)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **tol)
    for a, b in ((ours.weight.grad, reference.weight.grad), (ours.bias.grad, reference.bias.grad),
                 (ours.running_mean, reference.running_mean), (ours.running_var, reference.running_var)):
        torch.testing.assert_close(a, b, **tol)
    assert ours.num_batches_tracked == reference.num_batches_tracked == 1


@pytest.mark.parametrize("channels,needs_grad,normalised_channels_last",
                         [(8, True, False), (8, False, True), (16, True, True)])
def test_narrow_batch_norm_takes_nchw_only_for_a_narrow_input_that_needs_a_gradient(
        monkeypatch, channels, needs_grad, normalised_channels_last):
    layouts = []
    batch_norm = torch.nn.functional.batch_norm

    def recording_batch_norm(x, *args, **kwargs):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return batch_norm(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "batch_norm", recording_batch_norm)
    x = torch.randn(4, channels, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_(needs_grad)
    NarrowBatchNorm2d(channels)(x)
    assert layouts == [normalised_channels_last]


def test_every_batch_norm_of_the_encoder_is_narrow_batch_norm():
    encoder, _ = build_backbone("resnet18", small_images=True, width=8)
    norms = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 20 and all(isinstance(m, NarrowBatchNorm2d) for m in norms)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_zero_init_residual_starts_every_block_as_its_shortcut_from_the_same_draws(arch):
    torch.manual_seed(0)
    plain, _ = build_backbone(arch, small_images=True, width=8)
    torch.manual_seed(0)
    zeroed, _ = build_backbone(arch, small_images=True, width=8, zero_init_residual=True)
    blocks = [m for m in zeroed.modules() if isinstance(m, (torchvision.models.resnet.BasicBlock,
                                                             torchvision.models.resnet.Bottleneck))]
    assert len(blocks) == (8 if arch == "resnet18" else 16)
    # Only the blocks' last batch-norm scales differ from the default build: the rest are the same random draws.
    last_norms = {f"{name}.weight" for name, m in zeroed.named_modules()
                  if name.endswith(".bn3" if arch == "resnet50" else ".bn2")}
    assert len(last_norms) == len(blocks)
    for (name, a), b in zip(zeroed.state_dict().items(), plain.state_dict().values(), strict=True):
        if name in last_norms:
            assert torch.count_nonzero(a) == 0 and torch.all(b == 1)
        else:
            assert torch.equal(a, b), name
    x = zeroed.relu(zeroed.bn1(zeroed.conv1(torch.randn(4, 3, 16, 16))))
    for block in blocks:
        shortcut = x if block.downsample is None else block.downsample(x)
        # By hand: the residual branch's last BN outputs its bias (0), so the block is relu(shortcut).
        x, expected = block(x), torch.relu(shortcut)
        torch.testing.assert_close(x, expected)


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
