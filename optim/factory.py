"""--optimizer choices. `lars` (the default) is the fused official-semantics LARS; `lars-loop` is the
same formula one parameter at a time (the reference the benchmark measures the fusion against);
`torch-optimizer-lars` is the LARS users would otherwise pick (torch-optimizer's, the LARC formula
r = eta ||p|| / (||g|| + wd ||p||)), `lamb` torch-optimizer's LAMB, `sgd` torch's SGD."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch_optimizer

from optim.lars import LARS, PerParameterLARS
from optim.param_groups import split_1d_params

OPTIMIZERS = ("lars", "lars-loop", "torch-optimizer-lars", "lamb", "sgd")


def build_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    eta: float = 1e-3,
    device: torch.device | str = "cpu",
) -> torch.optim.Optimizer:
    """Every choice excludes 1-D tensors (biases, norm weights) from weight decay (and trust ratio).

    Parameters
    ----------
    name: --optimizer, one of OPTIMIZERS; ValueError otherwise.
    params: the online network's parameters (the target is never optimized).
    lr: the initial learning rate; the step sets it every step (`optim.lars.set_lr`), so the schedule's
        first value is what matters. lars and lars-loop hold it as a float32 tensor on `device`.
    weight_decay: applied to the parameters with more than one dimension only.
    momentum: for lars, lars-loop, torch-optimizer-lars and sgd (lamb ignores it).
    eta: the LARS trust coefficient (lars, lars-loop, and torch-optimizer-lars's trust_coefficient).
    device: where the parameters are (the lr tensor of lars and lars-loop goes there).
    """
    groups = split_1d_params([{"params": list(params)}])
    if name in ("lars", "lars-loop"):
        # A device tensor lr lets the compiled step read the schedule without recompiling.
        lr_tensor = torch.tensor(lr, dtype=torch.float32, device=device)
        kind = LARS if name == "lars" else PerParameterLARS
        return kind(groups, lr=lr_tensor, momentum=momentum, weight_decay=weight_decay, eta=eta, exclude_1d=False)
    for group in groups:
        group.pop("lars_adapt", None)
    if name == "torch-optimizer-lars":
        return torch_optimizer.LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=eta)
    if name == "lamb":
        return torch_optimizer.Lamb(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown --optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
