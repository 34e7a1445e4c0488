"""Cross-replica BatchNorm with one functional all-reduce per call: no host sync, no graph break.

torch's SyncBatchNorm all-gathers per-rank mean / invstd / count, reads sizes on the host and
graph-breaks under torch.compile. Here each rank packs its per-channel sum, sum of squares and
element count into ONE tensor, all-reduces it with `torch.distributed._functional_collectives`
(traced by Dynamo like any other op) and normalises with the global mean and biased variance, as
the official BYOL (Haiku) cross-replica BN does. The all-reduce is differentiable, so backward adds
every rank's contribution to the statistics' gradient (one more all-reduce per layer).

Without a process group of more than one rank, or in eval mode, it is exactly nn.BatchNorm.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward sums the incoming gradients over ranks (every rank's output
    depends on every rank's input). Our own Function: older torch's functional all_reduce has no
    autograd formula."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return funcol.wait_tensor(funcol.all_reduce(tensor, "sum", group))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", ctx.group)), None


class CrossReplicaBatchNorm(_BatchNorm):
    """BatchNorm over the union of all ranks' batches for (N, C) and (N, C, ...) inputs.

    Parameters and buffers are nn.BatchNorm's, so state_dicts load either way.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, device, dtype: as nn.BatchNorm2d's. The
        running variance is updated with the unbiased variance of the global batch (n / (n - 1)).
    group: the process group to normalise over (None: the default group, looked up at call time).
        A group of one rank, no initialized process group, or eval mode with running stats: plain BN.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, group: dist.ProcessGroup | None = None,
                 device: Any = None, dtype: torch.dtype | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.group = group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def _replica_group(self) -> dist.ProcessGroup | None:
        """The group to reduce over, or None when this process is alone (plain BN)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.group if self.group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # nn.BatchNorm's rule for when batch statistics are used.
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        group = self._replica_group() if batch_stats else None
        if group is None:
            return super().forward(input)
        self._check_input_dim(input)
        return self._cross_replica(input, group)

    def _cross_replica(self, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        # fp32 statistics even for bf16/fp16 activations (fp64 stays fp64).
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        count = torch.full((1,), x.numel() // channels, dtype=xf.dtype, device=x.device)
        totals = _AllReduceSum.apply(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]), group)
        n = totals[2 * channels:]
        mean = totals[:channels] / n
        # E[x^2] - E[x]^2 can round below zero.
        var = (totals[channels:2 * channels] / n - mean * mean).clamp_min(0)

        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum=None is nn.BatchNorm's cumulative average, kept as a tensor (no .item()).
                m = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_((mean * m).to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_((var * (n / (n - 1)) * m).to(self.running_var.dtype))

        shape = [1, channels] + [1] * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        y = (xf - mean.view(shape)) * scale.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.group is None else ", group=custom")


def convert_cross_replica_bn(module: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every nn.BatchNorm1d/2d in `module` by CrossReplicaBatchNorm, reusing its Parameter and
    buffer objects (same state_dict keys, same tensors an optimizer may already hold).

    Parameters
    ----------
    module: the network; its children are replaced in place, and the return value is `module` itself
        unless `module` is a BatchNorm (then its replacement: use the return value).
    group: the process group every converted layer normalises over (None: the default group).
    """
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        converted = CrossReplicaBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                          module.track_running_stats, group)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(converted, name, getattr(module, name))
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_cross_replica_bn(child, group))
    return module
