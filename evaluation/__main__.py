"""Evaluate a trained backbone: kNN and linear-probe top-1 on frozen features.

    python -m evaluation --checkpoint runs/byol/backbone.pt --arch resnet18 --data fashion-mnist --res 28
    python -m evaluation --arch resnet18 --data fashion-mnist --res 28 --baselines   # random init + raw pixels
    python -m evaluation --checkpoint backbone.pt --arch resnet50 --data data/train --val-data data/val
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from evaluation import ArraySet, eval_splits, evaluate_encoder, linear_probe, pixel_features
from models.backbones import ARCHS, DEFAULT_WIDTH, SMALL_IMAGE_MAX_RES, build_backbone


def load_encoder(path: str | None, arch: str, small_images: bool, width: int = DEFAULT_WIDTH) -> nn.Module:
    """The encoder with the checkpoint's weights (a torchvision-named state dict), or random init if None.

    The stem and width are read from the checkpoint (3x3 conv1 = small-image stem), so they cannot mismatch.
    """
    if path is None:
        return build_backbone(arch, small_images=small_images, width=width)[0]
    if not Path(path).is_file():
        raise ValueError(f"--checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    if "conv1.weight" not in state:
        raise ValueError(f"--checkpoint {path} is not a backbone state dict (no conv1.weight); "
                         "give the exported backbone.pt")
    # The stem's shape tells the exported encoder's form: its kernel the stem, its channels the width.
    stem = state["conv1.weight"]
    encoder, _ = build_backbone(arch, small_images=stem.shape[-1] == 3, width=stem.shape[0])
    missing, unexpected = encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")},
                                                  strict=False)
    if missing or unexpected:
        raise ValueError(f"--checkpoint {path} does not fit --arch {arch}: "
                         f"{len(missing)} missing and {len(unexpected)} unexpected tensors")
    return encoder


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
        train_set, test_set = eval_splits(args.data, args.val_data, args.train_limit, args.test_limit)
        encoders = {}
        if args.checkpoint:
            encoders[args.checkpoint] = load_encoder(args.checkpoint, args.arch, args.res <= SMALL_IMAGE_MAX_RES)
        if args.baselines or not args.checkpoint:
            torch.manual_seed(0)
            small = args.res <= SMALL_IMAGE_MAX_RES
            encoders[f"{args.arch} random init"] = load_encoder(None, args.arch, small, args.width)
    except (ValueError, FileNotFoundError) as err:
        print(f"evaluation: error: {err}", file=sys.stderr)
        return 2
    for name, encoder in encoders.items():
        start = time.perf_counter()
        scores = evaluate_encoder(encoder.to(device, memory_format=torch.channels_last), train_set, test_set,
                                  device, res=args.res, k=args.k)
        print(f"{name}: kNN (k={args.k}) top-1 {100 * scores['knn_top1']:.2f}%  linear top-1 "
              f"{100 * scores['linear_top1']:.2f}%  (wd {scores['linear_weight_decay']:g}, "
              f"{time.perf_counter() - start:.0f} s)")
    if args.baselines and isinstance(train_set, ArraySet):
        result = linear_probe(*pixel_features(train_set), *pixel_features(test_set), train_set.num_classes)
        print(f"raw pixels: linear top-1 {100 * result.top1:.2f}%  (wd {result.weight_decay:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
