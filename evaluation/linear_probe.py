"""Linear probe: multinomial logistic regression on frozen, standardized features.

Features are standardized with the training set's per-dimension mean/std. The classifier is fit
full-batch with L-BFGS (deterministic, no lr to tune); the L2 penalty is picked from a small sweep
by accuracy on a held-out part of the training set, then the probe is refit on the whole training
set with that penalty and scored on the test set. The refit probe comes back folded into one
`nn.Linear` on the raw features (the standardization in its weights), e.g. to start a fine-tune's head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2)
VAL_FRACTION = 0.1
MAX_ITER = 150


@dataclass(frozen=True)
class ProbeResult:
    """What `linear_probe` measured (its fields' comments say what each is)."""

    top1: float  # test accuracy in [0, 1]
    weight_decay: float  # the penalty chosen on the held-out split
    val_top1: float  # its held-out accuracy
    classifier: torch.nn.Linear  # the refit probe on raw (not standardized) features: logits = classifier(x)


def standardization(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set's per-dimension mean and std (a constant dimension's std is 1e-6: it stays 0)."""
    return train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)


@torch.no_grad()
def fold_standardization(probe: torch.nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> torch.nn.Linear:
    """A new Linear computing probe((x - mean) / std) from raw x: weight W / std, bias b - (W / std) @ mean."""
    folded = torch.nn.Linear(probe.in_features, probe.out_features, device=probe.weight.device)
    folded.weight.copy_(probe.weight / std)
    folded.bias.copy_(probe.bias - folded.weight @ mean)
    return folded


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = MAX_ITER
) -> torch.nn.Linear:
    """Mean cross-entropy + weight_decay/2 * ||W||^2, minimized with full-batch L-BFGS.

    Parameters
    ----------
    x: (N, D) float32 standardized features; the probe is made on their device.
    y: (N,) int64 labels in [0, num_classes).
    num_classes: the probe's outputs.
    weight_decay: the L2 penalty on the weights (not the bias).
    max_iter: L-BFGS iterations (one `step` of torch's LBFGS), starting from zero weights.
    """
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], num_classes, device=x.device)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), y) + 0.5 * weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return probe


@torch.no_grad()
def accuracy(probe: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return (probe(x).argmax(dim=1) == y).float().mean().item()


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    val_fraction: float = VAL_FRACTION,
    seed: int = 0,
) -> ProbeResult:
    """Top-1 on the test set of a linear classifier fit on the (standardized) training features.

    Parameters
    ----------
    train_x, train_y: (N, D) features and (N,) int64 labels it is fit on (`extract_features`).
    test_x, test_y: (M, D) features and (M,) labels it is scored on, on train_x's device.
    num_classes: the number of classes.
    weight_decays: the L2 penalties swept; the one with the best held-out accuracy is refit on all of train.
    val_fraction: the share of the training set held out for the sweep, in (0, 1); ValueError otherwise.
    seed: picks the held-out samples.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train_x, test_x = train_x.float(), test_x.float()
    mean, std = standardization(train_x)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed)).to(train_x.device)
    n_val = max(1, round(val_fraction * len(train_x)))
    val, fit = order[:n_val], order[n_val:]
    scores = {wd: accuracy(fit_logistic(train_x[fit], train_y[fit], num_classes, wd), train_x[val], train_y[val])
              for wd in weight_decays}
    best = max(scores, key=scores.get)
    probe = fit_logistic(train_x, train_y, num_classes, best)
    return ProbeResult(top1=accuracy(probe, test_x, test_y), weight_decay=best, val_top1=scores[best],
                       classifier=fold_standardization(probe, mean, std))
