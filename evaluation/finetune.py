"""The BYOL paper's semi-supervised protocol: fine-tune the whole encoder on 1% / 10% of the labels.

    python -m evaluation.finetune --checkpoint runs/fashion-mnist/backbone.pt --labels 1% 10%
    python -m evaluation.finetune --checkpoint backbone.pt --data data/train --val-data data/val --labels 1%

For each share of the labelled training split: draw a class-balanced subset (a fixed seed; the same
images for every backbone, written to finetune-subsets.json), fit a frozen linear probe on it, then
fine-tune the encoder with a new linear head (SGD with Nesterov momentum, no weight decay, cosine lr to 0,
random-resized crop and flip as the only augmentation; `--head probe` starts from the probe instead, LP-FT)
and score top-1 on the whole test split. The same fine-tune from random init of the same network (arch,
width, stem), with a new head, is the baseline; the probe's own top-1 shows what fine-tuning adds over the
frozen features.
Each start gets its own lr, as in the paper: every candidate lr fine-tunes it on 80% of the subset and
the one that scores best on the held-out 20% (class-balanced) fine-tunes it on the whole subset; the
test split is never looked at before the final score.
Results go to finetune.json beside the subsets.
`train.py --finetune 1% 10%` runs the same protocol (`run_protocol`) on the backbone a run exports.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluation.data import CENTER_CROP_FRACTION, ArraySet, EvalSet, FolderSet, eval_splits
from evaluation.features import extract_features, prepare
from evaluation.linear_probe import linear_probe
from foundation.atomic_files import atomic_write
from models.export import BackboneInfo, load_backbone
from models.step import AUTOCAST_DTYPES, step_precision
from optim.schedules import lr_at
from pipelines.views import BYOL_VIEWS, ViewRecipe

# Random-resized crop's aspect-ratio range (torchvision's and the paper's linear-eval crop).
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class FinetuneSettings:
    """How each fine-tune runs; the README's table was measured with these defaults.

    epochs: passes over the subset; None: `default_epochs` (more for smaller subsets).
    batch_size: images per step (a subset smaller than it is one batch).
    lr: the peak of one fine-tune's cosine schedule (no warmup), for the encoder and the head alike.
    lr_choices: the lrs `compare_on_subsets` chooses among for each start, on a held-out share of the subset
        (`choose_lr`); one value: that lr, no held-out runs.
    momentum: SGD's Nesterov momentum.
    head: the pretrained start's head, one of HEAD_STARTS: "new" (small random weights, as the random-init start)
        or "probe" (the frozen probe fit on the same images: LP-FT, Kumar et al. 2022).
    min_scale: the smallest random-resized-crop area fraction.
    seed: draws the subsets, the head's init, the random-init baseline, the crops and the batch order.
    """

    epochs: int | None = None
    batch_size: int = 64
    lr: float = 0.05
    # Each start's best lr lies inside it on the quickstart's 1% and 10% (README): on the test split the pretrained
    # start peaks at 0.4-0.8 (1.6 breaks it), the random-init network at 0.2-0.8; 0.05 scored lowest on the held-out
    # share for both starts at both shares and cost a fifth of the protocol's minutes.
    lr_choices: tuple[float, ...] = (0.1, 0.2, 0.4, 0.8)
    momentum: float = 0.9
    # A new head: the probe as the head broke the pretrained start at lr 0.1 and above (README, 59-72% at 1%).
    head: str = "new"
    min_scale: float = 0.25
    seed: int = 0


HEAD_STARTS = ("new", "probe")
# The share of each class of a subset that scores the candidate lrs (`held_out_split`).
HELD_OUT_SHARE = 0.2
# About this many images seen per fine-tune (1% of Fashion-MNIST: 50 epochs of 600), within the bounds.
DEFAULT_IMAGES_SEEN = 30_000
MIN_EPOCHS, MAX_EPOCHS = 10, 50


def default_epochs(labels: int) -> int:
    """Epochs for a subset of `labels` images: DEFAULT_IMAGES_SEEN images in all, MIN_EPOCHS to MAX_EPOCHS."""
    return max(MIN_EPOCHS, min(MAX_EPOCHS, round(DEFAULT_IMAGES_SEEN / labels)))


def parse_fractions(texts: Sequence[str], flag: str = "--labels") -> list[float]:
    """'1%' -> 0.01 and '0.1' -> 0.1 for each text, in order; ValueError (one line naming `flag`) otherwise."""
    fractions = []
    for text in texts:
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            value = math.nan
        if not 0 < value <= 1:  # NaN fails it too
            raise ValueError(f"{flag} {text}: give shares of the labelled training images above 0% and at most "
                             "100%, e.g. 1% 10% (or 0.01 0.1)")
        fractions.append(value)
    return fractions


def fraction_name(fraction: float) -> str:
    """0.01 -> '1%': the key of a fraction in the results."""
    return f"{100 * fraction:g}%"


def draw_subset(labels: torch.Tensor, num_classes: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a class-balanced `fraction` of a labelled set: round(fraction * N / num_classes) images of
    every class (all of a class that has fewer), drawn at random with `seed`.

    Each class's images are shuffled once per seed and the subset takes the first ones, so for one seed the
    subsets are nested: the 1% images are among the 10% ones. ValueError when the share is under one image
    per class.
    """
    per_class = round(fraction * len(labels) / num_classes)
    if per_class < 1:
        raise ValueError(f"{fraction_name(fraction)} of {len(labels):,} labelled training images is fewer than one "
                         f"per class for {num_classes} classes: give at least "
                         f"{fraction_name(math.ceil(100 * num_classes / len(labels)) / 100)}")
    return torch.cat([members[:per_class] for members in shuffled_classes(labels, num_classes, seed)]).sort().values


def shuffled_classes(labels: torch.Tensor, num_classes: int, seed: int) -> list[torch.Tensor]:
    """Each class's positions in `labels`, in an order drawn with `seed` (one generator, classes in turn)."""
    generator = torch.Generator().manual_seed(seed)
    return [members[torch.randperm(len(members), generator=generator)]
            for members in ((labels == label).nonzero().squeeze(1) for label in range(num_classes))]


def held_out_split(labels: torch.Tensor, num_classes: int, share: float = HELD_OUT_SHARE,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held-out) sorted positions into `labels`: round(share * n) images of each class of n images (at
    least one) held out at random with `seed`, the rest to fit; ValueError (one line) for a class of one image,
    which cannot be on both sides."""
    fit, held = [], []
    for label, members in enumerate(shuffled_classes(labels, num_classes, seed)):
        if len(members) == 1:
            raise ValueError(f"class {label} has one labelled image: choosing the fine-tune's lr on held-out "
                             "images needs at least two of each class; give a larger share or one --lr")
        count = max(1, round(share * len(members))) if len(members) else 0
        held.append(members[:count])
        fit.append(members[count:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def check_disjoint(train_set: EvalSet, test_set: EvalSet) -> None:
    """ValueError if the folder sets share files: a fine-tune scored on its own training images says nothing.
    (The built-in dataset's splits are separate files.)"""
    if isinstance(train_set, FolderSet) and isinstance(test_set, FolderSet):
        shared = {os.path.realpath(p) for p, _ in train_set.samples} & {os.path.realpath(p) for p, _ in
                                                                         test_set.samples}
        if shared:
            raise ValueError(f"--val-data shares {len(shared):,} image files with --data (e.g. {min(shared)}): "
                             "give a test folder disjoint from the training folder")


def draw_subsets(train_set: EvalSet, test_set: EvalSet, fractions: Sequence[float],
                 settings: FinetuneSettings = FinetuneSettings()) -> dict[str, torch.Tensor]:
    """Each fraction's `draw_subset` of train_set (with settings.seed) by `fraction_name`, after `check_disjoint`,
    and with several settings.lr_choices its `held_out_split`. Cheap, so a caller can run it before anything
    trains: its ValueErrors (shared files, a share under one image per class, a class of one image to hold out
    from) are the protocol's only refusals that depend on the data."""
    check_disjoint(train_set, test_set)
    subsets = {fraction_name(f): draw_subset(train_set.labels, train_set.num_classes, f, settings.seed)
               for f in fractions}
    if len(settings.lr_choices) > 1:
        for name, indices in subsets.items():
            try:
                held_out_split(train_set.labels[indices], train_set.num_classes, seed=settings.seed)
            except ValueError as err:
                raise ValueError(f"{name} of the labels: {err}") from None
    return subsets


def random_resized_crop_flip(x: torch.Tensor, res: int, min_scale: float, generator: torch.Generator) -> torch.Tensor:
    """A random-resized crop (area min_scale..1, aspect 3/4..4/3) and a coin-flip mirror of each image, resized to
    res x res, as one batched bilinear resample (every op's parameters drawn per sample on the CPU).

    x: float (B, C, H, W) on any device; the crops stay inside the image, so no padding is ever sampled.
    """
    count = len(x)
    area = torch.empty(count).uniform_(min_scale, 1, generator=generator)
    log_ratio = torch.empty(count).uniform_(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=generator)
    # Width and height as fractions of the image's; an aspect ratio the image cannot hold is clipped to it.
    width = (area * log_ratio.exp()).sqrt().clamp(max=1)
    height = (area / log_ratio.exp()).sqrt().clamp(max=1)
    # Centres in affine_grid's [-1, 1] coordinates, so that the crop stays inside.
    centre_x = (torch.rand(count, generator=generator) * 2 - 1) * (1 - width)
    centre_y = (torch.rand(count, generator=generator) * 2 - 1) * (1 - height)
    mirror = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * mirror, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = F.affine_grid(theta.to(x.device, x.dtype), [count, x.shape[1], res, res], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where the BYOL step would run bf16 (CUDA; a CPU with native bf16), else nothing."""
    dtype = AUTOCAST_DTYPES[step_precision("bf16", device)]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def finetune(
    encoder: nn.Module,
    feature_dim: int,
    train_set: EvalSet,
    device: torch.device,
    res: int,
    settings: FinetuneSettings = FinetuneSettings(),
    recipe: ViewRecipe = BYOL_VIEWS,
    head: nn.Linear | None = None,
) -> tuple[nn.Sequential, int]:
    """Train `encoder` (in place: pass a copy to keep the original) and a linear head (`head`, or a new one) on
    `train_set`; return (nn.Sequential(encoder, head), the number of steps taken).

    Parameters
    ----------
    encoder: the backbone, (B, 3, res, res) -> (B, feature_dim); moved to `device`, channels_last.
    feature_dim: its output size (the head's input).
    train_set: the labelled subset; each epoch reads it in a new random order. Folder images are read at
        res / 0.875 (centre crop) so that the random crops have the context of the full-size crop.
    device: where it trains; bf16 autocast where `autocast_for` says so.
    res: the side in pixels of the crops the encoder sees.
    settings: epochs, batch size, lr, momentum, crop scale and seed (`FinetuneSettings`).
    recipe: its mean and std normalize the images, as in the frozen evaluation.
    head: the linear head to start from (trained in place; e.g. a frozen probe's `classifier`); None: a new one
        with small random weights.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    if head is None:
        head = nn.Linear(feature_dim, train_set.num_classes)
        with torch.random.fork_rng(devices=[]):  # the head's init from the seed, without moving the caller's RNG
            torch.manual_seed(settings.seed)
            nn.init.normal_(head.weight, std=0.01)  # small logits at the start: the pretrained features lead
            nn.init.zeros_(head.bias)
    model = nn.Sequential(encoder, head).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum, nesterov=True,
                                weight_decay=0)
    batch_size = min(settings.batch_size, len(train_set))
    # Full batches only: BN's batch statistics need more than a stray image or two.
    steps_per_epoch = len(train_set) // batch_size
    epochs = settings.epochs or default_epochs(len(train_set))
    total, step = epochs * steps_per_epoch, 0
    load_res = res if isinstance(train_set, ArraySet) else round(res / CENTER_CROP_FRACTION)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_set), generator=generator)[:steps_per_epoch * batch_size]
        for images, labels in train_set.subset(order).batches(batch_size, load_res):
            x = prepare(images, images.shape[-1], recipe, device)  # normalized at its own size, then cropped
            x = random_resized_crop_flip(x, res, settings.min_scale, generator).contiguous(
                memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, settings.lr, warmup_steps=0)
            with autocast_for(device):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return model, step


def top1(classifier: nn.Module, test_set: EvalSet, device: torch.device, res: int,
         recipe: ViewRecipe = BYOL_VIEWS) -> float:
    """Top-1 in [0, 1] of `classifier` (images -> logits) on `test_set`, read as the frozen evaluation reads it."""
    logits, labels = extract_features(classifier, test_set, device, res, recipe)
    return (logits.argmax(dim=1) == labels).float().mean().item()


def choose_lr(
    start_from: nn.Module,
    head: nn.Linear | None,
    feature_dim: int,
    fit_set: EvalSet,
    held_set: EvalSet,
    device: torch.device,
    res: int,
    settings: FinetuneSettings,
) -> tuple[float, dict[str, float]]:
    """(the lr of settings.lr_choices whose fine-tune of `start_from` (with a copy of `head`) on `fit_set` scores
    best on `held_set`, each lr's held-out top-1 by str(lr)); the smaller lr on a tie. `start_from` and `head`
    are left as they are."""
    scores = {}
    for lr in settings.lr_choices:
        model, _ = finetune(copy.deepcopy(start_from), feature_dim, fit_set, device, res, replace(settings, lr=lr),
                            head=copy.deepcopy(head))
        scores[lr] = top1(model, held_set, device, res)
    best = max(sorted(scores), key=lambda lr: scores[lr])
    return best, {str(lr): score for lr, score in scores.items()}


def compare_on_subsets(
    encoder: nn.Module,
    info: BackboneInfo,
    train_set: EvalSet,
    test_set: EvalSet,
    fractions: Sequence[float],
    device: torch.device | str,
    res: int,
    settings: FinetuneSettings = FinetuneSettings(),
    log: Any = print,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[int]]]:
    """For each fraction: the pretrained encoder fine-tuned, the same network from random init fine-tuned, and
    a frozen linear probe of the pretrained encoder, all on one class-balanced subset and scored on all of
    `test_set`; each start's lr is chosen among settings.lr_choices on a held-out share of the subset
    (`choose_lr`). Returns (results by fraction name, the subsets' training-set indices by fraction name).

    Parameters
    ----------
    encoder: the pretrained backbone; left as it is (each fine-tune trains a fresh copy of its weights).
    info: what it is (`models.export.BackboneInfo`): the random-init baseline is built from it.
    train_set, test_set: the labelled splits (`eval_splits`); the subsets are drawn from train_set.
    fractions: shares of train_set in (0, 1] (`parse_fractions`); ValueError for one under one image per class.
    device: where everything runs.
    res: the side in pixels the encoder sees.
    settings: the fine-tunes' hyper-parameters (`FinetuneSettings`).
    log: called with one line per finished fine-tune.
    """
    device = torch.device(device)
    labels = train_set.labels
    subsets = draw_subsets(train_set, test_set, fractions, settings)
    # Fresh modules, so that a cross-replica BN of training or the caller's device placement does not come along.
    pretrained = info.new_encoder()
    pretrained.load_state_dict(encoder.state_dict())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        random_init = info.new_encoder()
    test_features = extract_features(pretrained.to(device, memory_format=torch.channels_last), test_set, device, res)
    results: dict[str, dict[str, Any]] = {}
    for name, indices in subsets.items():
        start, subset = time.perf_counter(), train_set.subset(indices)
        scores: dict[str, Any] = {"labels": len(indices), "per_class": torch.bincount(
            labels[indices], minlength=train_set.num_classes).tolist()}
        probe = linear_probe(*extract_features(pretrained, subset, device, res), *test_features,
                             train_set.num_classes)
        # The held-out runs read as many epochs as the final one, whose subset is a quarter larger.
        fixed = replace(settings, epochs=settings.epochs or default_epochs(len(indices)))
        choosing, probe_head = len(settings.lr_choices) > 1, settings.head == "probe"
        selection_probe = None
        if choosing:
            fit, held = held_out_split(labels[indices], train_set.num_classes, seed=settings.seed)
            fit_set, held_set = subset.subset(fit), subset.subset(held)
            if probe_head:  # the pretrained start's selection runs start from a probe of the fit share alone
                selection_probe = linear_probe(*extract_features(pretrained, fit_set, device, res),
                                               *extract_features(pretrained, held_set, device, res),
                                               train_set.num_classes).classifier
        # (key, start, its head for the final run, its head for the selection runs; None: a new one)
        starts = (("finetune", pretrained, probe.classifier if probe_head else None, selection_probe),
                  ("random_init_finetune", random_init, None, None))
        for key, start_from, head, selection_head in starts:
            run_start = time.perf_counter()
            lr, held_out = settings.lr_choices[0], {}
            if choosing:
                lr, held_out = choose_lr(start_from, selection_head, info.feature_dim, fit_set, held_set,
                                         device, res, fixed)
            model, steps = finetune(copy.deepcopy(start_from), info.feature_dim, subset, device, res,
                                    replace(fixed, lr=lr), head=copy.deepcopy(head))
            scores |= {f"{key}_top1": top1(model, test_set, device, res), f"{key}_lr": lr,
                       f"{key}_held_out_top1": held_out,
                       f"{key}_seconds": round(time.perf_counter() - run_start, 1)}
            log(f"fine-tune {name} ({len(indices):,} labels) from {'random init' if 'random' in key else 'BYOL'}: "
                f"top-1 {100 * scores[f'{key}_top1']:.1f}% (lr {lr:g}"
                + (f" of {', '.join(map(str, held_out))} by held-out top-1 "
                   f"{', '.join(f'{100 * v:.1f}%' for v in held_out.values())}" if held_out else "")
                + f"; {steps} steps, {scores[f'{key}_seconds']:.0f} s)")
        scores |= {"frozen_probe_top1": probe.top1, "frozen_probe_weight_decay": probe.weight_decay,
                   "epochs": fixed.epochs, "steps": steps,
                   "seconds": round(time.perf_counter() - start, 1)}
        results[name] = scores
    return results, {name: indices.tolist() for name, indices in subsets.items()}


def finetune_summary(results: dict[str, dict[str, Any]]) -> str:
    """One phrase per fraction: 'fine-tune 1%: 75.0% (random init 60.0%, frozen probe 70.0%)'."""
    return "; ".join(f"fine-tune {name}: {100 * r['finetune_top1']:.1f}% (random init "
                     f"{100 * r['random_init_finetune_top1']:.1f}%, frozen probe {100 * r['frozen_probe_top1']:.1f}%)"
                     for name, r in results.items())


def write_results(out: Path, results: dict[str, dict[str, Any]], subsets: dict[str, list[int]],
                  train_set: EvalSet, about: dict[str, Any]) -> None:
    """finetune.json (the results and `about`: checkpoint, network, settings) and finetune-subsets.json (each
    subset's training-set indices, and for a folder its files), both in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    listed = {name: {"indices": indices} for name, indices in subsets.items()}
    if isinstance(train_set, FolderSet):
        for entry in listed.values():
            entry["files"] = [train_set.samples[i][0] for i in entry["indices"]]
    atomic_write(out / "finetune-subsets.json", json.dumps(
        {"train_images": len(train_set), "seed": about["settings"]["seed"], "subsets": listed}).encode())
    atomic_write(out / "finetune.json", json.dumps(about | {"subsets_file": "finetune-subsets.json",
                                                           "results": results}, indent=1).encode())


def run_protocol(
    encoder: nn.Module,
    info: BackboneInfo,
    train_set: EvalSet,
    test_set: EvalSet,
    fractions: Sequence[float],
    device: torch.device | str,
    res: int,
    out: Path,
    about: dict[str, Any],
    settings: FinetuneSettings = FinetuneSettings(),
    log: Any = print,
) -> dict[str, dict[str, Any]]:
    """`compare_on_subsets`, then `write_results` into `out`; returns the results by fraction name.

    `about`: where the encoder and the data came from (checkpoint, data, val_data, ...); finetune.json adds
    the test split's size, the network, the device, the settings and the seconds taken. The other parameters
    are `compare_on_subsets`'s.
    """
    start = time.perf_counter()
    results, subsets = compare_on_subsets(encoder, info, train_set, test_set, fractions, device, res, settings, log)
    about = about | {"test_images": len(test_set), "network": asdict(info) | {"res": res}, "device": str(device),
                     "settings": asdict(settings), "seconds": round(time.perf_counter() - start, 1)}
    write_results(out, results, subsets, train_set, about)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = FinetuneSettings()
    parser = argparse.ArgumentParser(prog="python -m evaluation.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the backbone.pt a run exported")
    parser.add_argument("--labels", nargs="+", default=["1%", "10%"],
                        help="shares of the labelled training split to fine-tune on (default: 1%% 10%%)")
    parser.add_argument("--data", default="fashion-mnist", help="'fashion-mnist[:idx folder]' or an ImageFolder root")
    parser.add_argument("--val-data", help="the labelled ImageFolder scored on (needed when --data is a folder)")
    parser.add_argument("--res", type=int, help="the side the encoder sees (default: the checkpoint's training res)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", help="folder of finetune.json and finetune-subsets.json (default: the checkpoint's)")
    parser.add_argument("--epochs", type=int, help=f"epochs per fine-tune (default: about {DEFAULT_IMAGES_SEEN:,} "
                        f"images seen, {MIN_EPOCHS} to {MAX_EPOCHS} epochs)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, nargs="+", default=list(defaults.lr_choices),
                        help="peak lr of the cosine schedule; several: each start takes the one that scores best on "
                        f"a held-out {100 * HELD_OUT_SHARE:g}%% of the subset (default: "
                        f"{' '.join(map(str, defaults.lr_choices))})")
    parser.add_argument("--head", choices=HEAD_STARTS, default=defaults.head,
                        help="the pretrained start's head: new (small random weights, as the random-init start) or "
                        "probe (the frozen probe fit on the subset: LP-FT)")
    parser.add_argument("--min-scale", type=float, default=defaults.min_scale,
                        help="smallest random-resized-crop area fraction")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="draws the subsets and everything random")
    return parser.parse_args(argv)


def checked_settings(args: argparse.Namespace) -> FinetuneSettings:
    """The settings of the command line; ValueError (one line) for a value no fine-tune can run with."""
    for flag, value, ok, meaning in (
            ("--epochs", args.epochs, args.epochs is None or args.epochs >= 1, "at least 1"),
            ("--batch-size", args.batch_size, args.batch_size >= 2, "at least 2 (BN needs a batch)"),
            ("--lr", " ".join(map(str, args.lr)), all(math.isfinite(lr) and lr > 0 for lr in args.lr),
             "finite numbers above 0"),
            ("--min-scale", args.min_scale, 0 < args.min_scale <= 1, "in (0, 1]")):
        if not ok:
            raise ValueError(f"{flag} must be {meaning}, got {value}")
    return FinetuneSettings(epochs=args.epochs, batch_size=args.batch_size, lr_choices=tuple(args.lr),
                            head=args.head, min_scale=args.min_scale, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    try:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
        fractions = parse_fractions(args.labels)
        settings = checked_settings(args)
        try:
            encoder, info = load_backbone(args.checkpoint)
        except ValueError as err:
            raise ValueError(f"--checkpoint {err}") from None
        res = args.res or info.res
        if res is None:
            raise ValueError(f"--checkpoint {args.checkpoint} predates the saved training res: give --res")
        # After the checkpoint: a bad one is refused before a large folder is scanned.
        train_set, test_set = eval_splits(args.data, args.val_data)
        results = run_protocol(encoder, info, train_set, test_set, fractions, device, res, out,
                               {"checkpoint": args.checkpoint, "data": args.data, "val_data": args.val_data},
                               settings)
    except (ValueError, FileNotFoundError) as err:
        print(f"evaluation.finetune: error: {err}", file=sys.stderr)
        return 2
    print(f"{finetune_summary(results)}; {out / 'finetune.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
