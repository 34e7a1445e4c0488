"""Will one training step fit? A run's memory, estimated before anything is allocated, against what the device has.

A run that does not fit is refused up front (`check_fits`, called by runtime/preflight.py) with the batch size
that does, instead of growing until the kernel's OOM killer ends it without a word (CPU) or CUDA raises
mid-step. The estimate of one process:

    weights     online + target parameters, gradients, optimizer state and the update's temporaries
    activations what autograd keeps for the backward of one step (both views), counted exactly on the meta
                device (no memory is allocated), times BACKWARD_OVERHEAD for backward's own buffers
    loader      the batches in flight (LOADER_BATCHES in the views' dtype)
    overhead    the runtime's own constant (allocator, oneDNN / cuDNN workspaces; a CUDA context)

It covers training; the evaluation's features (N x feature size) come on top at its end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd.graph import saved_tensors_hooks

from config import TrainConfig
from models.step import step_precision, view_dtype
from runtime.assembly import build_model
from runtime.distributed import local_processes, under_launcher

GB = 1e9
# Peak / saved-for-backward bytes of a CPU step, fitted to the peak RSS (VmHWM) of train.py runs on 2 EPYC
# cores (ResNet-18 width 16 at 32 px, batch 64 and 128: slope 1.37, intercept 66 MB; ResNet-18 width 8 and 32,
# ResNet-50 width 8 at 28-64 px came out within 8-15% of the fit): the backward's activation gradients and
# the target network's forward live beside the saved tensors. tests/test_memory.py re-measures two sizes.
BACKWARD_OVERHEAD = 1.37
# The same fit's intercept: what a step adds beyond its tensors (oneDNN scratch, allocator slack).
CPU_OVERHEAD = 64 * 2**20
# A CUDA context and cuDNN/cuBLAS workspaces (not measured here: no GPU was lent while this was written).
CUDA_OVERHEAD = 2**30
# Parameter-sized tensors of a step: online and target weights, gradients, momentum, and about two of
# temporaries in the fused update (LARS's norms and trust ratios, the EMA's difference).
WEIGHT_COPIES = 6
# Batches a loader holds at once: FFCV's batches_ahead (3) plus the one being trained on; DALI's and
# torchvision's queues hold fewer.
LOADER_BATCHES = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training process needs for a step: fixed parts and the per-image part times its batch."""

    weights: int
    overhead: int
    per_image: int  # activations and loader buffers of one image (both views)
    activations_per_image: int
    batch: int  # the per-process batch

    @property
    def activations(self) -> int:
        return self.activations_per_image * self.batch

    @property
    def loader(self) -> int:
        return (self.per_image - self.activations_per_image) * self.batch

    @property
    def total(self) -> int:
        return self.weights + self.overhead + self.per_image * self.batch

    def largest_batch(self, budget: int) -> int:
        """The largest per-process batch whose step fits in `budget` bytes (0: not even one image)."""
        return max(0, int((budget - self.weights - self.overhead) // self.per_image))

    def describe(self) -> str:
        return (f"about {self.total / GB:.1f} GB per process (activations {self.activations / GB:.1f} GB, "
                f"weights and optimizer {self.weights / GB:.2f} GB, loader {self.loader / GB:.2f} GB)")


def _saved_bytes(cfg: TrainConfig, batch: int) -> tuple[int, int]:
    """(bytes autograd saves for backward in the online network's forward of `batch` image pairs, parameter
    bytes), counted on the meta device: shapes only, nothing allocated. Storages shared by several saved
    tensors (an in-place ReLU's output that the next conv saves too) count once."""
    with torch.device("meta"):
        byol = build_model(cfg, torch.device("meta"))
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
        return tensor

    views = torch.empty(batch, 3, cfg.res, cfg.res, device="meta").contiguous(memory_format=torch.channels_last)
    with saved_tensors_hooks(pack, lambda tensor: tensor):
        byol.online(views, views)
    return sum(storages.values()), sum(p.numel() * p.element_size() for p in byol.online.parameters())


def estimate(cfg: TrainConfig, batch: int, device: torch.device) -> MemoryEstimate:
    """One process's memory for a step of `batch` images of `cfg` (resolved) on `device`.

    The saved bytes are counted at two batch sizes: their difference is exactly one image's activations (the
    weights that layers also save for backward cancel out)."""
    two, params = _saved_bytes(cfg, 2)
    four, _ = _saved_bytes(cfg, 4)
    dtype = view_dtype(cfg.precision, device)
    # fp32 counts; a bf16/fp16 step keeps its activations in half the bytes.
    scale = 1.0 if step_precision(cfg.precision, device) == "fp32" else 0.5
    activations = int((four - two) / 2 * BACKWARD_OVERHEAD * scale)
    loader = LOADER_BATCHES * 2 * 3 * cfg.res * cfg.res * dtype.itemsize
    return MemoryEstimate(weights=WEIGHT_COPIES * params,
                          overhead=CUDA_OVERHEAD if device.type == "cuda" else CPU_OVERHEAD,
                          per_image=activations + loader, activations_per_image=activations, batch=batch)


def cpu_memory_available() -> int:
    """Bytes this process may still allocate: MemAvailable, or less where a cgroup (container) limit is lower."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):  # cgroup v1 or none: MemAvailable alone
        pass
    return available


def device_memory(cfg: TrainConfig, world_size: int, use_cuda: bool) -> tuple[int, str]:
    """(bytes one training process may use, how the error line names them).

    CUDA: the smallest total memory of the GPUs the run uses (one process each). CPU: the available memory
    shared by this machine's training processes."""
    if use_cuda:  # under torchrun every process checks its own GPU; `launch` uses GPUs 0..world_size-1
        gpus = [int(os.environ["LOCAL_RANK"])] if under_launcher() else range(world_size)
        smallest = min(torch.cuda.get_device_properties(i).total_memory for i in gpus)
        return smallest, f"each GPU has {smallest / GB:.1f} GB"
    processes = local_processes(world_size)
    available = cpu_memory_available()
    shared = f" shared by {processes} processes" if processes > 1 else ""
    return available // processes, f"this machine has {available / GB:.1f} GB available{shared}"


def check_fits(cfg: TrainConfig, world_size: int, use_cuda: bool) -> None:
    """ValueError, one line naming a --batch-size that fits, when a step of this run needs more memory than
    the device has. `cfg` resolved; `world_size` processes each take batch / world_size images."""
    device = torch.device("cuda" if use_cuda else "cpu")
    needed = estimate(cfg, cfg.batch_size // world_size, device)
    budget, has = device_memory(cfg, world_size, use_cuda)
    if needed.total <= budget:
        return
    fits = needed.largest_batch(budget) * world_size
    what = f"--batch-size {cfg.batch_size} at {cfg.res} px ({cfg.arch}, width {cfg.width})"
    advice = (f"use --batch-size {fits} (or lower --res or --width)" if fits >= world_size else
              "not even one image per process fits: lower --res, --width or --arch")
    raise ValueError(f"{what} needs {needed.describe()}, but {has}; {advice}")
