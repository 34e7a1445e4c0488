"""Evaluation of frozen encoders: kNN monitor and linear probe.

What train.py calls:

    from evaluation import eval_splits, knn_monitor, evaluate_encoder
    train_set, test_set = eval_splits(cfg.data)                  # once, before training
    acc = knn_monitor(byol.online.encoder, train_set, test_set, device, res=cfg.res)   # every --eval-every epochs
    scores = evaluate_encoder(byol.online.encoder, train_set, test_set, device, res=cfg.res)  # at the end

Both leave the encoder in the mode they found it in.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from evaluation.data import ArraySet, EvalSet, FolderSet, eval_splits
from evaluation.features import extract_features, pixel_features
from evaluation.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_accuracy, knn_predict
from evaluation.linear_probe import ProbeResult, linear_probe
from pipelines.views import BYOL_VIEWS, ViewRecipe

__all__ = [
    "ArraySet", "EvalSet", "FolderSet", "ProbeResult", "eval_splits", "evaluate_encoder", "extract_features",
    "knn_accuracy", "knn_monitor", "knn_predict", "linear_probe", "pixel_features",
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
) -> float:
    """kNN top-1 in [0, 1] on `val_set` with `train_set` features as the memory bank."""
    bank, bank_labels = extract_features(encoder, train_set, device, res, recipe)
    queries, query_labels = extract_features(encoder, val_set, device, res, recipe)
    return knn_accuracy(bank, bank_labels, queries, query_labels, train_set.num_classes, k, temperature)


def evaluate_encoder(
    encoder: nn.Module,
    train_set: EvalSet,
    test_set: EvalSet,
    device: torch.device | str,
    res: int | None = None,
    recipe: ViewRecipe = BYOL_VIEWS,
    k: int = DEFAULT_K,
) -> dict[str, float]:
    """{'knn_top1', 'linear_top1', 'linear_weight_decay'} from one feature extraction of each set."""
    train_x, train_y = extract_features(encoder, train_set, device, res, recipe)
    test_x, test_y = extract_features(encoder, test_set, device, res, recipe)
    probe = linear_probe(train_x, train_y, test_x, test_y, train_set.num_classes)
    return {
        "knn_top1": knn_accuracy(train_x, train_y, test_x, test_y, train_set.num_classes, k),
        "linear_top1": probe.top1,
        "linear_weight_decay": probe.weight_decay,
    }
