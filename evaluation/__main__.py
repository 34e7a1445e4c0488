"""Evaluate a trained backbone: kNN and linear-probe top-1 on frozen features.

    python -m evaluation --checkpoint runs/fashion-mnist/backbone.pt               # the quickstart's encoder
    python -m evaluation --checkpoint runs/fashion-mnist/backbone.pt --baselines   # + random init, raw pixels
    python -m evaluation --checkpoint backbone.pt --data data/train --val-data data/val

The checkpoint says what it is (arch, width, stem, training resolution: models/export.py), so it needs no
other flag; --data defaults to the built-in fashion-mnist.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn

from evaluation import ArraySet, eval_splits, evaluate_encoder, linear_probe, pixel_features
from models.backbones import ARCHS, SMALL_IMAGE_MAX_RES
from models.export import BackboneInfo, load_backbone

# Without --checkpoint (random init only): the built-in dataset's size and the quickstart's encoder.
DEFAULT_ARCH, DEFAULT_RES, DEFAULT_WIDTH = "resnet18", 28, 8
# An export without its training resolution (older files) and an ImageNet stem: the ImageNet view size.
IMAGENET_RES = 224


def load_encoder(path: str, arch: str | None = None, width: int | None = None) -> tuple[nn.Module, BackboneInfo]:
    """The exported encoder in `path` and what it is (`models.export.load_backbone`); an --arch or --width that
    contradicts the file is one ValueError line naming the file's value."""
    try:
        encoder, info = load_backbone(path)
    except ValueError as err:
        raise ValueError(f"--checkpoint {err}") from err
    for flag, given, own in (("--arch", arch, info.arch), ("--width", width, info.width)):
        if given is not None and given != own:
            raise ValueError(f"--checkpoint {path} is a {info.arch} backbone of width {info.width}, not {flag} "
                             f"{given}: pass {flag} {own} or leave it out (the file says it)")
    return encoder, info


def random_init(info: BackboneInfo, seed: int = 0) -> nn.Module:
    """The same network as `info` describes, at a seeded random initialisation: the baseline to beat."""
    torch.manual_seed(seed)
    return info.new_encoder()


def res_warning(path: str, info: BackboneInfo, res: int) -> str | None:
    """A warning line when --res is not the size the checkpoint was trained at (its features would differ)."""
    if info.res is None or info.res == res:
        return None
    return (f"evaluation: warning: --checkpoint {path} was trained at {info.res} px; evaluating at --res {res} "
            "measures other features than training made (leave --res out to use the file's)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a backbone.pt train.py exported: arch, width, stem and training "
                        "resolution are read from it (default: evaluate a randomly initialised encoder)")
    parser.add_argument("--arch", choices=tuple(ARCHS), help=f"encoder without --checkpoint (default: {DEFAULT_ARCH}); "
                        "with one, only checked against the file")
    parser.add_argument("--data", default="fashion-mnist", help="'fashion-mnist[:idx folder]' or an ImageFolder root")
    parser.add_argument("--val-data", help="labelled ImageFolder to report on (folders only)")
    parser.add_argument("--res", type=int, help="input resolution (default: the checkpoint's training resolution; "
                        f"{DEFAULT_RES} without one or for an export that does not record it)")
    parser.add_argument("--width", type=int, help=f"backbone width without --checkpoint (default: {DEFAULT_WIDTH}); "
                        "with one, only checked against the file")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--k", type=int, default=200, help="kNN neighbours")
    parser.add_argument("--train-limit", type=int, help="use this many evenly spaced training images (default: all)")
    parser.add_argument("--test-limit", type=int, help="use this many evenly spaced test images (default: all)")
    parser.add_argument("--baselines", action="store_true",
                        help="also report the same network at random init and a probe on raw pixels")
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
            encoders[args.checkpoint], info = load_encoder(args.checkpoint, args.arch, args.width)
            res = args.res or info.res or (DEFAULT_RES if info.small_images else IMAGENET_RES)
            if warning := res_warning(args.checkpoint, info, res):
                print(warning, file=sys.stderr)
        else:
            res = args.res or DEFAULT_RES
            info = BackboneInfo.of(args.arch or DEFAULT_ARCH, args.width or DEFAULT_WIDTH,
                                   res <= SMALL_IMAGE_MAX_RES, res)
        if args.baselines or not args.checkpoint:
            encoders[f"{info.arch} width {info.width} random init"] = random_init(info)
        # After the checkpoint: a bad one is refused before a large folder is scanned.
        train_set, test_set = eval_splits(args.data, args.val_data, args.train_limit, args.test_limit)
    except (ValueError, FileNotFoundError) as err:
        print(f"evaluation: error: {err}", file=sys.stderr)
        return 2
    for name, encoder in encoders.items():
        start = time.perf_counter()
        scores = evaluate_encoder(encoder.to(device, memory_format=torch.channels_last), train_set, test_set,
                                  device, res=res, k=args.k)
        print(f"{name}: kNN (k={scores['knn_k']}) top-1 {100 * scores['knn_top1']:.2f}%  linear top-1 "
              f"{100 * scores['linear_top1']:.2f}%  (wd {scores['linear_weight_decay']:g}, "
              f"{time.perf_counter() - start:.0f} s)")
    if args.baselines and isinstance(train_set, ArraySet):
        result = linear_probe(*pixel_features(train_set), *pixel_features(test_set), train_set.num_classes)
        print(f"raw pixels: linear top-1 {100 * result.top1:.2f}%  (wd {result.weight_decay:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
