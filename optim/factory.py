"""--optimizer choices. `lars` (the default) is the fused official-semantics LARS; `lars-loop` is the
same formula one parameter at a time (the reference the benchmark measures the fusion against);
`torch-optimizer-lars` is the LARS users would otherwise pick (torch-optimizer's, the LARC formula
r = eta ||p|| / (||g|| + wd ||p||)), `lamb` torch-optimizer's LAMB, `sgd` torch's SGD."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch_optimizer

from optim.lars import LARS, PerParameterLARS, set_lr
from optim.param_groups import split_1d_params

Groups = list[dict[str, Any]]


def _lars(kind: type[LARS]) -> Callable[..., torch.optim.Optimizer]:
    def build(groups: Groups, lr: float, weight_decay: float, momentum: float, eta: float,
              device: torch.device | str) -> torch.optim.Optimizer:
        # A device tensor lr lets the compiled step read the schedule without recompiling.
        lr_tensor = torch.tensor(lr, dtype=torch.float32, device=device)
        return kind(groups, lr=lr_tensor, momentum=momentum, weight_decay=weight_decay, eta=eta, exclude_1d=False)
    return build


def _plain(groups: Groups) -> Groups:
    """The groups without LARS's own `lars_adapt` key, which other optimizers would keep as an unknown option."""
    return [{k: v for k, v in group.items() if k != "lars_adapt"} for group in groups]


# name -> builder(groups, lr, weight_decay, momentum, eta, device): the one list of --optimizer choices.
BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "lars": _lars(LARS),
    "lars-loop": _lars(PerParameterLARS),
    "torch-optimizer-lars": lambda groups, lr, weight_decay, momentum, eta, device: torch_optimizer.LARS(
        _plain(groups), lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=eta),
    "lamb": lambda groups, lr, weight_decay, momentum, eta, device: torch_optimizer.Lamb(
        _plain(groups), lr=lr, weight_decay=weight_decay),
    "sgd": lambda groups, lr, weight_decay, momentum, eta, device: torch.optim.SGD(
        _plain(groups), lr=lr, momentum=momentum, weight_decay=weight_decay),
}
OPTIMIZERS = tuple(BUILDERS)


def build_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    eta: float = 1e-3,
    device: torch.device | str = "cpu",
    lr_1d_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """Every choice excludes 1-D tensors (biases, norm weights) from weight decay (and trust ratio) and runs them at
    `lr_1d_scale` times the lr.

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
    lr_1d_scale: the 1-D tensors' lr as a multiple of `lr` (--lr-1d-scale; the schedule keeps the ratio, `set_lr`).
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown --optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    groups = split_1d_params([{"params": list(params)}], lr_1d_scale)
    optimizer = BUILDERS[name](groups, lr, weight_decay, momentum, eta, device)
    set_lr(optimizer, lr)  # the 1-D group starts at its multiple too, before the first scheduled step
    return optimizer
