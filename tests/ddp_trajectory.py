"""The reference DDP trajectory: a BN-free BYOL (GroupNorm encoder, BN-less heads) trained with LARS for
a few steps on this rank's slice of fixed global batches, wired as train.py wires it, so 2 ranks can be
compared with 1 process."""

from __future__ import annotations

import torch
import torch.nn as nn

from models.byol import BYOL
from models.step import ByolStep
from optim.factory import build_optimizer
from runtime.distributed import World, agree, wrap_online

GLOBAL_BATCH, STEPS = 8, 5


def bn_free_byol() -> BYOL:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.GroupNorm(2, 8), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
    byol = BYOL(encoder, 8, hidden_dim=16, proj_dim=8)
    for head in (byol.online.projector, byol.online.predictor, byol.target[1]):
        head[1] = nn.Identity()
    return byol


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=generator),
             torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=generator)) for _ in range(STEPS)]


def trajectory(world: World) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train the BN-free BYOL on this rank's slice of each global batch, as train.py wires it."""
    byol = bn_free_byol().to(world.device)
    online = wrap_online(byol, world, sync_bn=True)
    optimizer = build_optimizer("lars", byol.online.parameters(), lr=0.5, weight_decay=1e-4)
    step = ByolStep(byol, optimizer, world.device, precision="fp32", compile=False, online=online)
    share = GLOBAL_BATCH // world.size
    rows = slice(world.rank * share, (world.rank + 1) * share)
    losses = [agree(world, step(v1[rows].to(world.device), v2[rows].to(world.device), lr=0.5, tau=0.9), [])[0]
              for v1, v2 in global_batches()]
    return losses, {k: v.clone() for k, v in byol.state_dict().items()}
