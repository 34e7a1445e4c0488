"""One whole BYOL optimisation step from two device views.

online on both views -> target on both views -> symmetric loss -> backward -> optimizer step ->
EMA target update. bf16/fp16 autocast on CUDA, channels_last inputs, optionally torch.compile'd.
Schedule values arrive as Python floats and are written into device tensors with `fill_`, so the
compiled graphs never recompile as lr/tau move and nothing in the step waits for the GPU; the
returned loss stays on the device until the caller decides to read it (every N steps).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from models.byol import BYOL, ema_update_
from optim.lars import set_lr

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def cpu_has_native_bf16() -> bool:
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def step_precision(precision: str, device: torch.device) -> str:
    """The precision the step runs in when `precision` (an AUTOCAST_DTYPES key) is asked for on `device`:
    as asked on CUDA. A CPU runs bf16 only where it has native bf16 matmuls (AMX or AVX512-BF16: the
    small-stem ResNet-18 step is 2.5x faster there); elsewhere, and for fp16, fp32."""
    if device.type == "cuda":
        return precision
    return "bf16" if precision == "bf16" and cpu_has_native_bf16() else "fp32"


def view_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Views arrive in the step's autocast dtype (half the bytes on CUDA); fp32 when it runs in fp32."""
    return AUTOCAST_DTYPES[step_precision(precision, device)] or torch.float32


class ByolStep:
    """The whole BYOL step, called once per batch: `step(v1, v2, lr, tau)` returns the loss on the device.

    Parameters
    ----------
    byol: the model; the step trains `byol.online` and EMA-updates `byol.target` after every optimizer step.
    optimizer: over the online network's parameters (`optim.factory.build_optimizer`); its lr is set
        every step (`optim.lars.set_lr`).
    device: where the views and the model are; autocast and the GradScaler follow its type.
    precision: an AUTOCAST_DTYPES key, used as given: callers pass `step_precision(...)` for the
        device. fp16 adds a GradScaler (`scaler`), bf16 and fp16 autocast the forward and loss.
    compile: torch.compile the forward + loss and the EMA update (the backward follows the forward).
    online: the module that runs the online network: DDP(byol.online) under DDP (default: byol.online).
    """

    def __init__(
        self,
        byol: BYOL,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        precision: str = "bf16",
        compile: bool = True,
        online: nn.Module | None = None,
    ):
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"--precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {precision!r}")
        self.byol = byol
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.online = online if online is not None else byol.online
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        # fp16 needs loss scaling; bf16 has fp32's range and does not. The scaler's inf check syncs.
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.tau = torch.zeros((), device=self.device)
        self.target_params, self.online_params = byol.ema_pairs()
        self._loss = torch.compile(self._forward_loss) if compile else self._forward_loss
        self._ema = torch.compile(self._ema_update) if compile else self._ema_update

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward_loss(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.byol(v1, v2, online=self.online)

    def _ema_update(self) -> None:
        ema_update_(self.target_params, self.online_params, self.tau)

    def __call__(self, v1: torch.Tensor, v2: torch.Tensor, lr: float, tau: float) -> torch.Tensor:
        """Run one step and return the loss as a detached device tensor (no host sync).

        Parameters
        ----------
        v1, v2: the batch's two views (pipelines/base.py), on `device`.
        lr: this step's learning rate (`optim.schedules.Schedule.lr`), written into every group.
        tau: this step's target EMA decay (`Schedule.tau`), used by the EMA update after the optimizer step.
        """
        set_lr(self.optimizer, lr)
        self.tau.fill_(tau)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(v1, v2)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self._ema()
        return loss.detach()
