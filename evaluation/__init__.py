"""Evaluation of frozen encoders: kNN monitor and linear probe.

What train.py calls:

    from evaluation import Ranks, eval_splits, knn_monitor, evaluate_encoder
    train_set, test_set = eval_splits(cfg.data)                  # once, before training, on every rank
    ranks = Ranks(rank, world_size)                              # Ranks() (the default): one process
    acc = knn_monitor(byol.online.encoder, train_set, test_set, device, res=cfg.res, ranks=ranks)  # every rank
    scores = evaluate_encoder(byol.online.encoder, train_set, test_set, device, res=cfg.res, ranks=ranks)  # at the end

With several ranks each extracts the features of its shard of both sets and they are all-gathered
(evaluation.distributed); the kNN monitor then runs on every rank (cheap, identical), so no rank
waits long in a collective. Both leave the encoder in the mode they found it in.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from evaluation.data import ArraySet, EvalSet, FolderSet, eval_splits
from evaluation.distributed import SINGLE_PROCESS, Ranks, gathered_features
from evaluation.features import extract_features, pixel_features
from evaluation.knn import DEFAULT_K, DEFAULT_TEMPERATURE, effective_k, knn_accuracy, knn_predict
from evaluation.linear_probe import ProbeResult, linear_probe
from pipelines.views import BYOL_VIEWS, ViewRecipe

__all__ = [
    "ArraySet", "EvalSet", "FolderSet", "ProbeResult", "Ranks", "effective_k", "eval_splits",
    "evaluate_against_baselines",
    "evaluate_encoder", "extract_features", "gathered_features", "knn_accuracy", "knn_monitor", "knn_predict",
    "linear_probe", "pixel_features", "summary",
]


def knn_monitor(
    encoder: nn.Module,
    train_set: EvalSet,
    val_set: EvalSet,
    device: torch.device | str,
    res: int | None = None,
    recipe: ViewRecipe = BYOL_VIEWS,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    ranks: Ranks = SINGLE_PROCESS,
) -> float:
    """kNN top-1 in [0, 1] on `val_set` with `train_set` features as the memory bank, on every rank.

    Parameters
    ----------
    encoder: the frozen backbone, (B, 3, res, res) -> (B, D), e.g. byol.online.encoder; run in eval mode
        (BN running statistics) and put back in the mode it was in.
    train_set, val_set: the labelled sets (`eval_splits`); train_set gives the memory bank and num_classes.
    device: where the features are extracted and compared.
    res: the side in pixels images are resized (arrays) or centre-cropped (folders) to (default: recipe.res).
    recipe: its mean and std normalize the images (no augmentation).
    k, temperature: the kNN vote (`knn_predict`).
    ranks: this process's place among those sharing the extraction; every rank must call with the same sets.
    """
    (bank, bank_labels), (queries, query_labels) = gathered_features(encoder, (train_set, val_set), device, res,
                                                                     recipe, ranks)
    return knn_accuracy(bank, bank_labels, queries, query_labels, train_set.num_classes, k, temperature)


def evaluate_encoder(
    encoder: nn.Module,
    train_set: EvalSet,
    test_set: EvalSet,
    device: torch.device | str,
    res: int | None = None,
    recipe: ViewRecipe = BYOL_VIEWS,
    k: int = DEFAULT_K,
    ranks: Ranks = SINGLE_PROCESS,
) -> dict[str, float] | None:
    """{'knn_top1', 'linear_top1', 'linear_weight_decay'} from one feature extraction of each set.

    With several ranks the extraction is shared and the scores are computed on rank 0 alone; the
    other ranks return None as soon as the features are gathered. The probe is not sharded, and
    running it on every rank would only repeat it (and slow it P-fold where P CPU processes share
    the cores). The gathers are this call's last collective, so rank 0 keeps nobody waiting: the
    caller must make no collective after it (train.py: only rank-0 file writes, then leaving the group).

    Parameters
    ----------
    encoder: the frozen backbone, (B, 3, res, res) -> (B, D), e.g. byol.online.encoder; run in eval mode
        (BN running statistics) and put back in the mode it was in.
    train_set: the kNN memory bank and the probe's training set (split for its penalty sweep).
    test_set: the set both are scored on.
    device: where the features are extracted, the kNN and the probe run.
    res: the images' side in pixels at the encoder (default: recipe.res).
    recipe: its mean and std normalize the images (no augmentation).
    k: the kNN's neighbours (temperature: DEFAULT_TEMPERATURE).
    ranks: this process's place among those sharing the extraction (default: one process).
    """
    (train_x, train_y), (test_x, test_y) = gathered_features(encoder, (train_set, test_set), device, res, recipe,
                                                             ranks)
    if not ranks.is_main:
        return None
    probe = linear_probe(train_x, train_y, test_x, test_y, train_set.num_classes)
    return {
        "knn_top1": knn_accuracy(train_x, train_y, test_x, test_y, train_set.num_classes, k),
        "knn_k": effective_k(len(train_x), train_set.num_classes, k),
        "linear_top1": probe.top1,
        "linear_weight_decay": probe.weight_decay,
    }


def evaluate_against_baselines(
    encoder: nn.Module,
    random_encoder: nn.Module,
    train_set: EvalSet,
    test_set: EvalSet,
    device: torch.device | str,
    res: int | None = None,
    recipe: ViewRecipe = BYOL_VIEWS,
    ranks: Ranks = SINGLE_PROCESS,
) -> dict[str, float] | None:
    """`evaluate_encoder`'s scores for the trained encoder, beside the same architecture at random init
    (`random_init_*`) and, for in-memory sets, a linear probe on raw pixels (`pixels_linear_top1`):
    measured in the same run, so a claim that training helped is checked against both.
    Collectives and return value as `evaluate_encoder` (None on ranks other than 0).

    Parameters
    ----------
    encoder: the trained backbone.
    random_encoder: the same architecture at its random initialisation (e.g. `build_backbone` with the
        run's arguments, seeded as the run); evaluated exactly as `encoder`.
    train_set, test_set, device, res, recipe, ranks: as `evaluate_encoder`'s.
    """
    scores = evaluate_encoder(encoder, train_set, test_set, device, res, recipe, ranks=ranks)
    random_init = evaluate_encoder(random_encoder, train_set, test_set, device, res, recipe, ranks=ranks)
    if scores is None or random_init is None:
        return None
    scores |= {f"random_init_{name}": value for name, value in random_init.items()}
    if isinstance(train_set, ArraySet) and isinstance(test_set, ArraySet):
        pixels = linear_probe(*pixel_features(train_set), *pixel_features(test_set), train_set.num_classes)
        scores |= {"pixels_linear_top1": pixels.top1, "pixels_linear_weight_decay": pixels.weight_decay}
    return scores


def summary(scores: dict[str, float]) -> str:
    """One line: each top-1 of the trained encoder with the baselines measured beside it.

    `scores`: what `evaluate_encoder` or `evaluate_against_baselines` returned (fractions, shown as %).
    """
    def percent(key: str) -> str:
        return f"{100 * scores[key]:.1f}%"

    knn = (f"kNN (k={scores['knn_k']}) " if "knn_k" in scores else "kNN ") + f"top-1 {percent('knn_top1')}"
    linear = f"linear top-1 {percent('linear_top1')}"
    if "random_init_knn_top1" in scores:
        knn += f" (random init {percent('random_init_knn_top1')})"
        baselines = [f"random init {percent('random_init_linear_top1')}"]
        if "pixels_linear_top1" in scores:
            baselines.append(f"raw pixels {percent('pixels_linear_top1')}")
        linear += f" ({', '.join(baselines)})"
    return f"{knn}, {linear}"
