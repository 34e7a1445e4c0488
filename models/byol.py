"""BYOL networks and loss (Grill et al. 2020), per docs/recipe.md.

The online network (encoder, projector, predictor) is the only trained module and the only one
DDP wraps; it takes both views in one call so DDP sees a single forward per step. The target
(encoder, projector) is an EMA of the online parameters, never receives gradients and keeps its
own BN running buffers (BN runs in training mode: batch statistics of its own forward).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> BN -> ReLU -> Linear(no bias): the BYOL projector and predictor shape."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
    )


def forward_views(
    net: Callable[[torch.Tensor], torch.Tensor], v1: torch.Tensor, v2: torch.Tensor, bn_per_view: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run both views: separately (each view is its own BN batch, as in the official code) or as
    one concatenated 2B batch (one launch set, faster, but BN statistics mix the views).

    Parameters
    ----------
    net: the online network's `predict` or the target network; (B, ...) -> (B, D).
    v1, v2: the two views' batches, the same shape (B, 3, H, W).
    bn_per_view: True: two calls, one per view; False: one call on the 2B batch.
    """
    if bn_per_view:
        return net(v1), net(v2)
    out1, out2 = net(torch.cat([v1, v2])).chunk(2)
    return out1, out2


class OnlineNetwork(nn.Module):
    """Encoder -> projector -> predictor, run on both views in one call (the module DDP wraps).

    Parameters
    ----------
    encoder: the backbone, (B, 3, H, W) -> (B, feature_dim) (`models.backbones.build_backbone`).
    feature_dim: the encoder's output width.
    hidden_dim: the hidden width of the projector and predictor MLPs.
    proj_dim: the projection (and prediction) width the loss compares.
    bn_per_view: normalize each view's batch on its own (`forward_views`).
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, hidden_dim: int, proj_dim: int, bn_per_view: bool):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp_head(feature_dim, hidden_dim, proj_dim)
        self.predictor = mlp_head(proj_dim, hidden_dim, proj_dim)
        self.bn_per_view = bn_per_view

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.encoder(x)))

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_views(self.predict, v1, v2, self.bn_per_view)


class BYOL(nn.Module):
    """The online network and its EMA target (a copy of the online encoder and projector, made here).

    Parameters
    ----------
    encoder: the backbone, (B, 3, H, W) -> (B, feature_dim) (`models.backbones.build_backbone`); it
        becomes `online.encoder` and is deep-copied into the target.
    feature_dim: the encoder's output width (build_backbone returns it).
    hidden_dim: the hidden width of the projector and predictor MLPs (--hidden-dim; the recipe's 4096).
    proj_dim: the projection width the loss compares (--proj-dim; the recipe's 256).
    bn_per_view: BN statistics per view, as the official code (True), or over both views' 2B batch.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, hidden_dim: int = 4096, proj_dim: int = 256,
                 bn_per_view: bool = True):
        super().__init__()
        self.online = OnlineNetwork(encoder, feature_dim, hidden_dim, proj_dim, bn_per_view)
        self.target = nn.Sequential(copy.deepcopy(self.online.encoder), copy.deepcopy(self.online.projector))
        self.target.requires_grad_(False)

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(target params, matching online params), in the same order."""
        online = [*self.online.encoder.parameters(), *self.online.projector.parameters()]
        return list(self.target.parameters()), online

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, online: nn.Module | None = None) -> torch.Tensor:
        """Symmetric BYOL loss, mean over the batch: a 0-d fp32 tensor in [0, 4].

        Parameters
        ----------
        v1, v2: the two views of the same B images, (B, 3, H, W), normalized (pipelines/base.py).
        online: the module that runs the online network: the DDP-wrapped one under DDP
            (default: self.online). The target always runs without gradients.
        """
        p1, p2 = (online or self.online)(v1, v2)
        with torch.no_grad():
            z1, z2 = forward_views(self.target, v1, v2, self.online.bn_per_view)
        return (byol_loss(p1, z2) + byol_loss(p2, z1)).mean()


def byol_loss(prediction: torch.Tensor, target_projection: torch.Tensor) -> torch.Tensor:
    """Per-sample 2 - 2 cos(p, z'), computed in fp32 with z' detached (stop-gradient)."""
    p = F.normalize(prediction.float(), dim=-1)
    z = F.normalize(target_projection.detach().float(), dim=-1)
    return 2 - 2 * (p * z).sum(dim=-1)


@torch.no_grad()
def ema_update_(target: list[torch.Tensor], online: list[torch.Tensor], tau: torch.Tensor | float) -> None:
    """xi <- tau * xi + (1 - tau) * theta for all tensors in a few fused kernels, no host sync.

    Written as xi += (1 - tau) * (theta - xi): `_foreach_lerp_` would take a tensor tau only as a
    Python scalar, i.e. through `.item()`, a host sync every step in eager mode; `_foreach_mul_` takes
    a 0-d device tensor as it is.

    Parameters
    ----------
    target: the target's parameters xi, updated in place (`BYOL.ema_pairs()[0]`).
    online: the matching online parameters theta, the same order and shapes (`BYOL.ema_pairs()[1]`).
    tau: the EMA decay in [0, 1] (`optim.schedules.tau_at`); a 0-d tensor on the parameters' device
        keeps the update free of host syncs and recompiles.
    """
    step = torch._foreach_sub(online, target)
    torch._foreach_mul_(step, 1 - tau)
    torch._foreach_add_(target, step)
