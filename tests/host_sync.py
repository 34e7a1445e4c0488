"""Prove "no host sync" on a CPU: record every aten op a callable dispatches and flag the ones that
make a CUDA stream wait for the host or the host wait for the GPU.

On CUDA, `torch.cuda.set_sync_debug_mode("error")` catches syncs as they happen; a CPU never syncs,
so there the ops themselves are checked instead. A `TorchDispatchMode` sees every op at the top of
the dispatcher, whatever the device, so an op that would sync on CUDA is caught on CPU too:
- reading a device value on the host: `_local_scalar_dense` (`.item()`, `float(t)`, a 0-d tensor
  passed where a Python number is expected), `is_nonzero` (`if t:`), `equal`;
- output shapes that depend on values: `nonzero`, `masked_select`, `unique`, boolean-mask indexing,
  `repeat_interleave` without `output_size`;
- result checks on the host: `_linalg_check_errors` (`torch.linalg.inv` and friends);
- tensors built from Python data (`torch.tensor([...])`, `lift_fresh`): on CUDA a copy from
  pageable host memory, which blocks the host;
- copies between devices toward the host (`.cpu()`, `.tolist()` of a device tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

SYNC_OPS = {
    aten._local_scalar_dense.default: "reads a device value on the host (.item() or a tensor used as a number)",
    aten.is_nonzero.default: "reads a device value on the host (a tensor used as a bool)",
    aten.equal.default: "torch.equal returns a host bool",
    aten.nonzero.default: "output shape depends on values",
    aten.masked_select.default: "output shape depends on values",
    aten._unique2.default: "output shape depends on values",
    aten.unique_dim.default: "output shape depends on values",
    aten.unique_consecutive.default: "output shape depends on values",
    aten._linalg_check_errors.default: "checks a linalg result on the host",
    aten.lift_fresh.default: "builds a tensor from Python data (a copy from pageable host memory on CUDA)",
}


def _sync_reason(func: Any, args: tuple, kwargs: dict) -> str | None:
    if func in SYNC_OPS:
        return SYNC_OPS[func]
    if func is aten.index.Tensor and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
    ):
        return "boolean-mask indexing: output shape depends on values"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None and len(args) < 2:
        return "repeat_interleave without output_size: output shape depends on values"
    if func in (aten._to_copy.default, aten.copy_.default):
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        target = kwargs.get("device")
        devices = {t.device.type for t in tensors} | ({torch.device(target).type} if target is not None else set())
        if "cpu" in devices and len(devices) > 1:
            return "copy between the host and a device"
    return None


class HostSyncRecorder(TorchDispatchMode):
    """Records (op name, reason) for every host-syncing op dispatched inside the `with` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.syncs: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(str(func))
        reason = _sync_reason(func, args, kwargs)
        if reason is not None:
            self.syncs.append((str(func), reason))
        return func(*args, **kwargs)


def assert_no_host_sync(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run fn(*args, **kwargs) and fail, naming each op and why it syncs, if anything in it would
    make the host wait for the GPU. Returns fn's result."""
    with HostSyncRecorder() as recorder:
        result = fn(*args, **kwargs)
    assert recorder.ops, "no aten op was dispatched: the check saw nothing (compiled code? wrong callable?)"
    assert not recorder.syncs, "host syncs: " + "; ".join(f"{op}: {why}" for op, why in recorder.syncs)
    return result
