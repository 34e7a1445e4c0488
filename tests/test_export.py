"""The exported backbone (models/export.py): what the file holds, where it loads, and the one-line refusals."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm
from PIL import Image

from models.backbones import build_backbone
from models.export import BackboneInfo, load_backbone, save_backbone


def _exported(tmp_path, arch: str, width: int, small_images: bool, res: int):
    torch.manual_seed(0)
    encoder, _ = build_backbone(arch, small_images=small_images, width=width)
    path = tmp_path / "backbone.pt"
    save_backbone(path, encoder, arch=arch, width=width, small_images=small_images, res=res)
    return encoder, path


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, res: int) -> bool:
    x = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_a_full_width_imagenet_stem_export_loads_into_torchvision_with_only_fc_missing(tmp_path):
    encoder, path = _exported(tmp_path, "resnet18", 64, small_images=False, res=224)
    content = torch.load(path, weights_only=True)
    reference = tvm.resnet18()
    result = reference.load_state_dict(content["state_dict"], strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    reference.fc = torch.nn.Identity()
    assert _same_outputs(reference, encoder, res=64)  # torchvision's own forward gives the trained features
    loaded, info = load_backbone(path)
    assert info == BackboneInfo("resnet18", 64, False, 224, 512) and info.is_torchvision_state_dict
    assert "torchvision.models.resnet18()" in info.how_to_load()
    assert not list(tmp_path.glob(".*tmp*")), "the atomic write left its temp file"


def test_a_narrow_small_stem_export_is_not_torchvisions_and_rebuilds_identically(tmp_path):
    encoder, path = _exported(tmp_path, "resnet18", 8, small_images=True, res=28)
    with pytest.raises(RuntimeError, match="size mismatch"):
        tvm.resnet18().load_state_dict(torch.load(path, weights_only=True)["state_dict"], strict=False)
    loaded, info = load_backbone(path)
    assert info == BackboneInfo("resnet18", 8, True, 28, 64) and not info.is_torchvision_state_dict
    assert "models.export.load_backbone" in info.how_to_load()
    assert loaded.conv1.kernel_size == (3, 3) and _same_outputs(loaded, encoder, res=28)


@pytest.mark.parametrize(("arch", "small_images", "width", "feature_dim"),
                         [("resnet34", True, 8, 64), ("resnet50", False, 4, 128)])
def test_an_older_bare_state_dict_still_loads_with_its_form_read_from_the_tensors(tmp_path, arch, small_images,
                                                                                  width, feature_dim):
    torch.manual_seed(0)
    encoder, _ = build_backbone(arch, small_images=small_images, width=width)
    torch.save(encoder.state_dict(), tmp_path / "old.pt")
    loaded, info = load_backbone(tmp_path / "old.pt")
    assert info == BackboneInfo(arch, width, small_images, None, feature_dim)
    assert _same_outputs(loaded, encoder, res=32)


def _truncated(path) -> None:
    torch.save(build_backbone("resnet18", small_images=True, width=8)[0].state_dict(), path)
    path.write_bytes(path.read_bytes()[:2000])


def _missing_a_tensor(path) -> None:
    state = build_backbone("resnet18", small_images=True, width=8)[0].state_dict()
    del state["layer4.1.bn2.bias"]
    torch.save(state, path)


@pytest.mark.parametrize(("make", "what"), [
    (lambda path: None, "does not exist"),
    (lambda path: path.write_bytes(b""), "is empty (0 bytes)"),
    (_truncated, "is a truncated PyTorch file"),
    (lambda path: Image.new("RGB", (8, 8)).save(path, format="JPEG"), "is a JPEG image, not a checkpoint"),
    (lambda path: path.write_text("step,loss\n1,0.5\n"), "is not a PyTorch checkpoint"),
    (lambda path: torch.save(torch.zeros(3), path), "holds a Tensor, not a backbone state dict"),
    (lambda path: torch.save({"online": {}, "step": 7}, path), "is a training checkpoint (step 7)"),
    (lambda path: torch.save({"weight": torch.zeros(2)}, path), "not a backbone state dict (no conv1.weight)"),
    (_missing_a_tensor, 'does not fit a resnet18 of width 8: Missing key(s) in state_dict: "layer4.1.bn2.bias"'),
])
def test_a_file_that_is_not_a_backbone_is_one_value_error_line(tmp_path, make, what):
    path = tmp_path / "backbone.pt"
    make(path)
    with pytest.raises(ValueError) as raised:
        load_backbone(path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(str(path)) and what in message
