"""Process layout for DDP: one process per GPU (NCCL), or CPU processes with gloo.

`launch` starts the processes itself (`--gpus N`, `--gpus 0 --processes P`) or, under torchrun
(RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* in the environment), runs the one process it was given:
either way every process calls `fn(cfg)` with the same environment variables set, so the
training code has a single distributed path.

Only the online network is wrapped in DDP. SyncBN converts the BN layers of BOTH the online and
the target network: the official code runs one cross-replica BN network function for both, so the
target's training-mode BN normalises with global-batch statistics too. It is
`models.sync_bn.CrossReplicaBatchNorm` (one functional all-reduce per call, no host sync, no graph
break of its own under torch.compile), so it works with NCCL and gloo alike.
"""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from models.sync_bn import convert_cross_replica_bn

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
RENDEZVOUS_FILE = "FASTBYOL_RENDEZVOUS_FILE"


@dataclass(frozen=True)
class World:
    """This process's place in the run (`init_world`).

    Attributes
    ----------
    rank: the global rank, in [0, size); rank 0 is the main process (`is_main`): it logs and writes.
    local_rank: the rank on this machine; on CUDA the GPU index this process uses.
    size: the world size, the number of training processes (1: no process group).
    device: cuda:<local_rank>, or cpu for gloo processes.
    """

    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_launcher() -> bool:
    """True when torchrun (or SLURM-style wrappers setting the same variables) started us."""
    return all(name in os.environ for name in LAUNCHER_VARS)


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def is_launching_process() -> bool:
    """The process that owns the run's --out: the one `launch` runs in, or rank 0 under torchrun."""
    return not under_launcher() or os.environ["RANK"] == "0"


def local_processes(world_size: int) -> int:
    """Training processes on this machine (torchrun says it in LOCAL_WORLD_SIZE; `launch` starts them all here)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if under_launcher() else world_size


def planned_processes(gpus: int | None, processes: int) -> tuple[int, int]:
    """(gpus, world size) for this run. Under a launcher the world size is its WORLD_SIZE.

    Parameters
    ----------
    gpus: --gpus, the GPUs to train on (None: every visible one); one per process. Under a launcher
        each process uses at most one.
    processes: --processes, the CPU processes when no GPU is used.
    """
    gpus = visible_gpus() if gpus is None else gpus
    if under_launcher():
        return min(gpus, 1), int(os.environ["WORLD_SIZE"])
    return gpus, gpus if gpus > 0 else processes


def threads_per_process(world_size: int) -> int:
    """torch's intra-op threads for each of `world_size` CPU processes on this machine: its usable cores
    shared out, as torchrun's OMP_NUM_THREADS does (each process taking every core made 2 gloo ranks on 2
    cores spin against each other: a 2-process CPU run took 1.6x as long)."""
    return max(1, len(os.sched_getaffinity(0)) // world_size)


def _worker(index: int, fn: Callable[[Any], int], cfg: Any, world_size: int, rendezvous: str) -> None:
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(world_size),
                      **{RENDEZVOUS_FILE: rendezvous})
    if "OMP_NUM_THREADS" not in os.environ:  # the user's (or torchrun's) own choice stands
        torch.set_num_threads(threads_per_process(world_size))
    code = fn(cfg)
    if code:
        sys.exit(code)


def launch(fn: Callable[[Any], int], cfg: Any, world_size: int) -> int:
    """Run fn(cfg) in `world_size` processes (in this one when 1 or under torchrun); return the exit code.

    SIGTERM and SIGINT sent to this process are passed on to every spawned one.

    Parameters
    ----------
    fn: the per-process entry point, returning an exit code (0: success); spawned processes find their
        RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous file in the environment (`init_world` reads them).
        Spawned with the 'spawn' start method, so `fn` and `cfg` must pickle.
    cfg: the one argument of `fn`, the same for every process.
    world_size: the processes to run (`planned_processes`); ignored under torchrun, which started them.
    """
    if world_size == 1 or under_launcher():
        return fn(cfg)
    rendezvous = Path(tempfile.mkdtemp(prefix="fastbyol-rdzv-")) / "store"
    context = mp.start_processes(_worker, args=(fn, cfg, world_size, str(rendezvous)), nprocs=world_size,
                                 start_method="spawn", join=False)

    def forward(signum: int, _frame: Any) -> None:
        # A scheduler may signal only this parent: pass it on so every rank checkpoints and stops.
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as err:
        return err.exit_code if err.exit_code and err.exit_code > 0 else 1
    except mp.ProcessRaisedException as err:
        print(f"train.py: a training process failed:\n{err}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(rendezvous.parent, ignore_errors=True)
    return 0


def init_world(use_cuda: bool) -> World:
    """Join the process group described by the environment (a no-op for a single process).

    Parameters
    ----------
    use_cuda: one GPU per process, cuda:LOCAL_RANK (made the current device), and NCCL; False: CPU and gloo.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        # Processes `launch` spawned meet in a file store (no free-port race); torchrun's use env://.
        init_method = f"file://{os.environ[RENDEZVOUS_FILE]}" if RENDEZVOUS_FILE in os.environ else "env://"
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method=init_method, rank=rank,
                                world_size=size, device_id=device if use_cuda else None)
    return World(rank, local_rank, size, device)


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap_online(byol: nn.Module, world: World, sync_bn: bool) -> nn.Module:
    """Cross-replica BN on online and target, DDP on the online network; returns the module to run.

    With several processes rank 0's target is broadcast to every rank; every rank must call this.

    Parameters
    ----------
    byol: the model (`models.byol.BYOL`), on `world.device`; with `sync_bn` its online and target BN
        layers are replaced in place, before the optimizer is built over its parameters.
    world: this process's place; one process returns `byol.online` unwrapped.
    sync_bn: --sync-bn: cross-replica BN (`models.sync_bn`); False keeps per-rank BN and DDP broadcasts
        rank 0's BN buffers at every forward.
    """
    if world.size == 1:
        return byol.online
    if sync_bn:
        byol.online = convert_cross_replica_bn(byol.online)
        byol.target = convert_cross_replica_bn(byol.target)
    # Same seed on every rank makes the nets equal already; broadcasting makes it a guarantee.
    for tensor in byol.target.state_dict().values():
        dist.broadcast(tensor, src=0)
    return DistributedDataParallel(
        byol.online, device_ids=[world.device.index] if world.device.type == "cuda" else None,
        # Cross-replica BN keeps the BN buffers equal on every rank; without it rank 0's are broadcast.
        **buffer_sync(not sync_bn),
    )


def buffer_sync(sync: bool) -> dict[str, bool]:
    """DDP's keyword for broadcasting rank 0's buffers at every forward. Newer torch renamed it and warns on
    every rank for the old name; the new one also syncs at init, a no-op here (the nets start equal)."""
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers": sync}


def agree(world: World, loss: torch.Tensor, flags: list[bool]) -> tuple[float, list[bool]]:
    """Mean loss over ranks and OR of each flag, in one collective (and the one host sync).

    Parameters
    ----------
    world: this process's place; every rank must call with as many flags.
    loss: this rank's loss, a 0-d (or one-element) device tensor (`ByolStep`'s return).
    flags: this rank's yes/no votes, e.g. [stop requested, checkpoint due]; a flag comes back True when
        any rank set it.
    """
    packed = torch.stack([loss.float().reshape(()), *(torch.tensor(float(f), device=loss.device) for f in flags)])
    if world.size > 1:
        dist.all_reduce(packed)
    values = packed.tolist()
    return values[0] / world.size, [v > 0 for v in values[1:]]


def gather_to_main(world: World, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (valid on rank 0)."""
    if world.size == 1:
        return [obj]
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
