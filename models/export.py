"""The exported backbone (`OUT/backbone.pt`): the encoder's weights plus what it takes to rebuild it.

    save_backbone(path, encoder, arch="resnet18", width=8, small_images=True, res=28)
    encoder, info = load_backbone(path)     # built with build_backbone, weights loaded strictly

The file is `torch.save` of {"format": FORMAT, "version": VERSION, "arch", "width", "small_images", "res",
"feature_dim", "zero_init_residual", "state_dict"}: plain values and tensors, read with `weights_only=True` (a file
written before "zero_init_residual" reads as False: the initialisation every run used then). Older exports were a bare
state_dict; they still load, with arch, width and stem read from the tensors' shapes and `res` unknown (None).
A file that is not a backbone is one ValueError line saying what it is instead.
"""

from __future__ import annotations

import io
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

# File I/O, not a step of the data flow: the one atomic writer and the one image-signature table.
from datasources.imagefolder import sniff_format
from foundation.atomic_files import atomic_write
from models.backbones import ARCHS, DEFAULT_WIDTH, build_backbone, feature_dim

FORMAT = "fastbyol-backbone"
VERSION = 1
# A zip file's end-of-directory record lies within its last 64 KiB (22 bytes plus a comment of < 64 KiB).
ZIP_TAIL_BYTES = 65558
# What torch.load raises for a file that is not a weights-only checkpoint: arbitrary bytes reach its
# unpickler's stack machine, which fails with whatever error it meets (EOFError, KeyError, IndexError, ...).
LOAD_ERRORS = (Exception,)
ADVICE = "give the backbone.pt a run exported"


@dataclass(frozen=True)
class BackboneInfo:
    """What an exported backbone is: enough to rebuild it (`new_encoder`), and to draw the same network at random
    init as the baseline its training must beat.

    res: the view size it was trained at (None for exports older than this metadata).
    zero_init_residual: how its training run initialised the residual blocks (`build_backbone`).
    """

    arch: str
    width: int
    small_images: bool
    res: int | None
    feature_dim: int
    zero_init_residual: bool = False

    @classmethod
    def of(cls, arch: str, width: int, small_images: bool, res: int | None,
           zero_init_residual: bool = False) -> BackboneInfo:
        """The info of a `build_backbone(arch, small_images, width, zero_init_residual)` encoder trained at `res`."""
        return cls(arch, width, small_images, res, feature_dim(arch, width), zero_init_residual)

    def new_encoder(self) -> nn.Module:
        """This network at a fresh initialisation, drawn from torch's global generator (seed it first)."""
        return build_backbone(self.arch, self.small_images, self.width, self.zero_init_residual)[0]

    @property
    def is_torchvision_state_dict(self) -> bool:
        """Whether the weights load into `torchvision.models.<arch>()` (strict=False, only fc.* missing):
        torchvision's 7x7 stem and max-pool, at torchvision's width."""
        return not self.small_images and self.width == DEFAULT_WIDTH

    def how_to_load(self) -> str:
        """One phrase for a user: where this file's weights load."""
        if self.is_torchvision_state_dict:
            return (f"torch.load(it)['state_dict'] loads into torchvision.models.{self.arch}() with strict=False, "
                    "only fc missing; or use models.export.load_backbone")
        stem = "small-image stem" if self.small_images else "ImageNet stem"
        return f"{self.arch} width {self.width}, {stem}: load it with models.export.load_backbone"


def save_backbone(path: str | Path, encoder: nn.Module, *, arch: str, width: int, small_images: bool,
                  res: int, zero_init_residual: bool = False) -> BackboneInfo:
    """Write `encoder`'s weights (on the CPU) and its rebuild metadata to `path`, atomically; return that metadata."""
    info = BackboneInfo.of(arch, width, small_images, res, zero_init_residual)
    state = {"format": FORMAT, "version": VERSION, **asdict(info),
             "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()}}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(Path(path), buffer.getvalue())
    return info


def load_backbone(path: str | Path, map_location: torch.device | str = "cpu") -> tuple[nn.Module, BackboneInfo]:
    """The encoder `path` holds, rebuilt and loaded strictly, and what it is; ValueError (one line) otherwise."""
    content = _read(Path(path), map_location)
    if content.get("format") == FORMAT:
        if content.get("version", VERSION) > VERSION:
            raise ValueError(f"{path} is a backbone of format version {content['version']}, newer than this "
                             f"code's {VERSION}; update fastbyol")
        state = content["state_dict"]
        info = BackboneInfo(content["arch"], content["width"], content["small_images"], content["res"],
                            content["feature_dim"], content.get("zero_init_residual", False))
    else:
        state = _bare_state_dict(path, content)
        info = _inferred_info(path, state)
    encoder = info.new_encoder()
    try:
        encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    except RuntimeError as err:  # missing, unexpected or differently shaped tensors
        raise ValueError(f"{path} does not fit a {info.arch} of width {info.width}: "
                         f"{_first_problem(str(err))}; {ADVICE}") from err
    return encoder, info


def _read(path: Path, map_location: torch.device | str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except LOAD_ERRORS as err:
        raise ValueError(f"{path} {_what_file(path, err)}; {ADVICE}") from err
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a {type(content).__name__}, not a backbone state dict; {ADVICE}")
    if "online" in content and "step" in content:
        raise ValueError(f"{path} is a training checkpoint (step {content['step']}), not a backbone; "
                         "give the backbone.pt the run exported at its end")
    return content


def _bare_state_dict(path: str | Path, content: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of an export older than the metadata (or one nested under "state_dict")."""
    state = content["state_dict"] if isinstance(content.get("state_dict"), dict) else content
    if "conv1.weight" not in state:
        raise ValueError(f"{path} is not a backbone state dict (no conv1.weight); {ADVICE}")
    return state


def _inferred_info(path: str | Path, state: dict[str, torch.Tensor]) -> BackboneInfo:
    """The stem's shape tells the form: its kernel the stem (3x3 = small images), its channels the width."""
    arch = arch_of(state)
    if arch is None:
        raise ValueError(f"{path}: its layers match none of {', '.join(ARCHS)}; {ADVICE}")
    stem = state["conv1.weight"]
    small, width = stem.shape[-1] == 3, stem.shape[0]
    return BackboneInfo.of(arch, width, small, None)


def arch_of(state: dict[str, torch.Tensor]) -> str | None:
    """The ARCHS name whose blocks the state dict's keys show (layerN.M.*), or None if none matches."""
    blocks = [0, 0, 0, 0]
    for key in state:
        found = re.match(r"layer([1-4])\.(\d+)\.", key)
        if found:
            layer, block = int(found[1]) - 1, int(found[2])
            blocks[layer] = max(blocks[layer], block + 1)
    bottleneck = any(re.match(r"layer[1-4]\.\d+\.conv3\.", key) for key in state)
    return next((name for name, (block, layers) in ARCHS.items()
                 if list(layers) == blocks and (block.__name__ == "Bottleneck") == bottleneck), None)


def _first_problem(message: str) -> str:
    """The first specific line of load_state_dict's multi-line error."""
    lines = [line.strip() for line in message.splitlines()[1:] if line.strip()]
    return (lines[0] if lines else message.strip()).rstrip(".")


def _what_file(path: Path, err: Exception) -> str:
    """What a file torch.load rejected is, from its first and last bytes."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(16)
        f.seek(max(0, size - ZIP_TAIL_BYTES))
        tail = f.read()
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format: its directory is at the end
        return ("is a truncated PyTorch file (its zip directory is missing)" if b"PK\x05\x06" not in tail
                else f"is a damaged PyTorch file ({type(err).__name__})")
    if sniff_format(head):
        return f"is a {sniff_format(head)} image, not a checkpoint"
    if head.startswith(b"\x80") and isinstance(err, pickle.UnpicklingError):
        return "is a pickle of Python objects other than tensors (not a state dict; refused unloaded)"
    return "is not a PyTorch checkpoint"
