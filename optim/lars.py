"""LARS with the official BYOL semantics, multi-tensor and free of host-device syncs.

Per parameter p with gradient g (see docs/recipe.md):
    u = g + wd * p
    r = eta * ||p|| / ||u||   (r = 1 where ||p|| == 0 or ||u|| == 0)
    m = mu * m + r * u
    p = p - lr * m
Parameters in a group with `lars_adapt=False` (by default every 1-D tensor: biases and norm
weights) get neither weight decay nor the trust ratio: plain SGD with momentum, at the schedule's lr
times the group's `lr_scale` (`set_lr`).

This differs from the LARC / timm / torch-optimizer formula r = eta ||p|| / (||g|| + wd ||p||).
Every operation is a `torch._foreach_*` call over a whole group, the norms are stacked on the
device, the zero-norm cases are chosen with `torch.where` and the per-tensor ratios are applied
by one multiply over the concatenated updates (`scale_each`), so `step()` launches a few kernels
per group and never waits for the GPU. `lr` may be a tensor (see `set_lr`) so a compiled step
does not recompile as the schedule moves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from optim.param_groups import split_1d_params


def _memory_order(t: torch.Tensor) -> list[int]:
    """t's dims from outermost to innermost in memory (channels_last weights are not NCHW in memory)."""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


def scale_each(tensors: list[torch.Tensor], scales: torch.Tensor) -> list[torch.Tensor]:
    """[t_i * scales[i]] in a handful of kernels, however many tensors, with no host sync.

    `_foreach_mul` with a list of 0-d scale tensors leaves the multi-tensor fast path (it needs
    equal shapes) and launches one kernel per tensor. Instead all tensors are concatenated in their
    own memory order, multiplied once by the matching run of scales, and split back into views with
    the original shapes and strides (so the momentum buffers that follow stay on the fast path).

    Parameters
    ----------
    tensors: the tensors to scale, any shapes and strides, one dtype and device; not modified.
    scales: (len(tensors),) one factor per tensor (LARS's trust ratios), on the tensors' device.
    """
    orders = [_memory_order(t) for t in tensors]
    flat = torch.cat([t.permute(order).reshape(-1) for t, order in zip(tensors, orders, strict=True)])
    numels = [t.numel() for t in tensors]
    flat.mul_(torch.cat([s.expand(n) for s, n in zip(scales.unbind(), numels, strict=True)]))
    scaled = []
    for chunk, t, order in zip(flat.split(numels), tensors, orders, strict=True):
        inverse = sorted(range(t.dim()), key=order.__getitem__)
        scaled.append(chunk.view([t.shape[d] for d in order]).permute(inverse))
    return scaled


class LARS(Optimizer):
    """LARS as in the module docstring; build it with `optim.factory.build_optimizer` for --optimizer lars.

    Parameters
    ----------
    params: tensors, or param-group dicts (a group may set lr, momentum, weight_decay, eta, lars_adapt, lr_scale).
    lr: the learning rate (>= 0); a 0-d tensor on the parameters' device is updated in place by `set_lr`,
        so a compiled step does not recompile as it moves.
    momentum: mu, in [0, 1); 0 skips the momentum buffers.
    weight_decay: wd (>= 0), added to the gradient before the trust ratio.
    eta: the trust coefficient (> 0) of r = eta * ||p|| / ||u||.
    exclude_1d: move every 1-D tensor (biases, norm weights) into a group with neither weight decay nor
        trust ratio (`optim.param_groups.split_1d_params`); False when the groups are already split.
    lr_1d_scale: with exclude_1d, the 1-D group's lr as a multiple of the schedule's (`set_lr`).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 1e-3,
        exclude_1d: bool = True,
        lr_1d_scale: float = 1.0,
    ):
        if not isinstance(lr, torch.Tensor) and lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: need weight_decay >= 0 and eta > 0, got {weight_decay}, {eta}")
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        if exclude_1d:
            groups = split_1d_params(groups, lr_1d_scale)
        # A scaled group holds its own lr (a new tensor when lr is one), which `set_lr` fills with its multiple.
        groups = [{**group, "lr": lr * group["lr_scale"]} if "lr" not in group and group.get("lr_scale", 1.0) != 1.0
                  else group for group in groups]
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_adapt=True)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(group, params)
        return loss

    def _momentum_buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(state["momentum_buffer"])
        return buffers

    def _update_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        weight_decay = group["weight_decay"]
        updates = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else grads
        if group["lars_adapt"]:
            param_norms = torch.stack(torch._foreach_norm(params))
            update_norms = torch.stack(torch._foreach_norm(updates))
            ratios = torch.where(
                (param_norms > 0) & (update_norms > 0),
                group["eta"] * param_norms / update_norms,
                torch.ones_like(param_norms),
            )
            updates = scale_each(updates, ratios)
        if group["momentum"]:
            buffers = self._momentum_buffers(params)
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            updates = buffers
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            torch._foreach_sub_(params, torch._foreach_mul(updates, lr))
        else:
            torch._foreach_add_(params, updates, alpha=-lr)


class PerParameterLARS(LARS):
    """The same formula as `LARS`, one parameter at a time with plain tensor ops (no `_foreach_*`, no
    concatenation): the reference the benchmark times the fusion against and checks it with.

    Like `LARS` it never reads a value back to the host, so the two differ only in kernel count.
    """

    def _update_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        for param, buffer in zip(params, self._momentum_buffers(params), strict=True):
            update = param.grad.add(param, alpha=group["weight_decay"]) if group["weight_decay"] else param.grad
            if group["lars_adapt"]:
                param_norm, update_norm = param.norm(), update.norm()
                ratio = torch.where((param_norm > 0) & (update_norm > 0), group["eta"] * param_norm / update_norm,
                                    torch.ones_like(param_norm))
                update = update * ratio
            if group["momentum"]:
                update = buffer.mul_(group["momentum"]).add_(update)
            param.sub_(update * group["lr"])


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set every group's lr to `lr` times its `lr_scale` (1 where it has none); tensor lrs are filled in place
    (no host sync, no recompile).

    Parameters
    ----------
    optimizer: any torch optimizer; ByolStep calls this before every step.
    lr: the step's learning rate (`optim.schedules.Schedule.lr`).
    """
    for group in optimizer.param_groups:
        group_lr = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(group_lr)
        else:
            group["lr"] = group_lr
