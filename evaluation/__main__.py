"""Evaluate a trained backbone: kNN and linear-probe top-1 on frozen features.

    python -m evaluation --checkpoint runs/byol/backbone.pt --arch resnet18 --data fashion-mnist --res 28
    python -m evaluation --arch resnet18 --data fashion-mnist --res 28 --baselines   # random init + raw pixels
    python -m evaluation --checkpoint backbone.pt --arch resnet50 --data data/train --val-data data/val
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from datasources.imagefolder import sniff_format
from evaluation import ArraySet, eval_splits, evaluate_encoder, linear_probe, pixel_features
from models.backbones import ARCHS, DEFAULT_WIDTH, SMALL_IMAGE_MAX_RES, build_backbone

# A zip file's end-of-directory record lies within its last 64 KiB (22 bytes plus a comment of < 64 KiB).
ZIP_TAIL_BYTES = 65558
# What torch.load raises for a file that is not a weights-only checkpoint: arbitrary bytes reach its
# unpickler's stack machine, which fails with whatever error it meets (EOFError, KeyError, IndexError, ...).
LOAD_ERRORS = (Exception,)


def load_encoder(path: str | None, arch: str, small_images: bool, width: int = DEFAULT_WIDTH) -> nn.Module:
    """The encoder with the checkpoint's weights (a torchvision-named state dict), or random init if None.

    The stem and width are read from the checkpoint (3x3 conv1 = small-image stem), so they cannot mismatch.
    """
    if path is None:
        return build_backbone(arch, small_images=small_images, width=width)[0]
    state = read_state_dict(path)
    if arch_of(state) not in (arch, None):
        raise ValueError(f"--checkpoint {path} is a {arch_of(state)} backbone, not --arch {arch}: "
                         f"pass --arch {arch_of(state)}")
    # The stem's shape tells the exported encoder's form: its kernel the stem, its channels the width.
    stem = state["conv1.weight"]
    encoder, _ = build_backbone(arch, small_images=stem.shape[-1] == 3, width=stem.shape[0])
    try:
        missing, unexpected = encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")},
                                                      strict=False)
    except RuntimeError as err:  # a tensor of another shape
        raise ValueError(f"--checkpoint {path} does not fit --arch {arch}: {str(err).splitlines()[-1].strip()}") \
            from err
    if missing or unexpected:
        raise ValueError(f"--checkpoint {path} does not fit --arch {arch}: "
                         f"{len(missing)} missing and {len(unexpected)} unexpected tensors")
    return encoder


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The backbone state dict in `path`; ValueError with one line saying what the file is otherwise."""
    if not Path(path).is_file():
        raise ValueError(f"--checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as err:
        raise ValueError(f"--checkpoint {path} {_what_file(path, err)}; give the backbone.pt a run exported") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"--checkpoint {path} holds a {type(state).__name__}, not a backbone state dict; "
                         "give the backbone.pt a run exported")
    if "online" in state and "step" in state:
        raise ValueError(f"--checkpoint {path} is a training checkpoint (step {state['step']}), not a backbone; "
                         "give the backbone.pt the run exported at its end")
    if "conv1.weight" not in state:
        raise ValueError(f"--checkpoint {path} is not a backbone state dict (no conv1.weight); "
                         "give the exported backbone.pt")
    return state


def _what_file(path: str, err: Exception) -> str:
    """What a file torch.load rejected is, from its first and last bytes."""
    size = Path(path).stat().st_size
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="backbone state dict (default: evaluate a randomly initialised encoder)")
    parser.add_argument("--arch", default="resnet18", choices=tuple(ARCHS))
    parser.add_argument("--data", default="fashion-mnist", help="'fashion-mnist[:idx folder]' or an ImageFolder root")
    parser.add_argument("--val-data", help="labelled ImageFolder to report on (folders only)")
    parser.add_argument("--res", type=int, default=28, help="input resolution the encoder was trained at")
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH, help="backbone width of the random-init baseline "
                        "(a checkpoint's own width is read from it)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--k", type=int, default=200, help="kNN neighbours")
    parser.add_argument("--train-limit", type=int, help="use this many evenly spaced training images (default: all)")
    parser.add_argument("--test-limit", type=int, help="use this many evenly spaced test images (default: all)")
    parser.add_argument("--baselines", action="store_true",
                        help="also report the same encoder at random init and a probe on raw pixels")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    try:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
        encoders = {}
        if args.checkpoint:
            encoders[args.checkpoint] = load_encoder(args.checkpoint, args.arch, args.res <= SMALL_IMAGE_MAX_RES)
        if args.baselines or not args.checkpoint:
            torch.manual_seed(0)
            small = args.res <= SMALL_IMAGE_MAX_RES
            encoders[f"{args.arch} random init"] = load_encoder(None, args.arch, small, args.width)
        # After the checkpoint: a bad one is refused before a large folder is scanned.
        train_set, test_set = eval_splits(args.data, args.val_data, args.train_limit, args.test_limit)
    except (ValueError, FileNotFoundError) as err:
        print(f"evaluation: error: {err}", file=sys.stderr)
        return 2
    for name, encoder in encoders.items():
        start = time.perf_counter()
        scores = evaluate_encoder(encoder.to(device, memory_format=torch.channels_last), train_set, test_set,
                                  device, res=args.res, k=args.k)
        print(f"{name}: kNN (k={min(args.k, len(train_set))}) top-1 {100 * scores['knn_top1']:.2f}%  linear top-1 "
              f"{100 * scores['linear_top1']:.2f}%  (wd {scores['linear_weight_decay']:g}, "
              f"{time.perf_counter() - start:.0f} s)")
    if args.baselines and isinstance(train_set, ArraySet):
        result = linear_probe(*pixel_features(train_set), *pixel_features(test_set), train_set.num_classes)
        print(f"raw pixels: linear top-1 {100 * result.top1:.2f}%  (wd {result.weight_decay:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
