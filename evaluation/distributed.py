"""Feature extraction shared by the ranks of a process group.

Under DDP every rank extracts the features of its own shard of a set (samples rank, rank + world,
...), the shards are all-gathered with tensor collectives (gloo on CPU, NCCL on GPU) and put back
in the set's order, so every rank holds the whole set's features after about 1/world of the work.
No rank runs a long extraction while the others sit in a collective, which NCCL's watchdog would
end after its timeout.

    ranks = Ranks(rank, world_size)                      # Ranks() is one process: no collective at all
    [(bank, bank_labels), (queries, query_labels)] = gathered_features(encoder, [train, test], device, ranks=ranks)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from evaluation.data import EvalSet
from evaluation.features import DEFAULT_BATCH_SIZE, extract_features
from pipelines.views import BYOL_VIEWS, ViewRecipe


@dataclass(frozen=True)
class Ranks:
    """This process's place among the `size` processes sharing an evaluation, in `group` (None: the
    default group). Every process of the group must make the same calls with the same sets.

    Attributes
    ----------
    rank: this process's rank in `group`, in [0, size); rank 0 is the one that scores (`is_main`).
    size: the processes sharing the extraction; 1 (the default, SINGLE_PROCESS) makes no collective.
    group: the process group the gathers run in (its backend: gloo for CPU tensors, NCCL for CUDA ones).
    """

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in a group of {self.size}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = Ranks()


def interleave(shards: Sequence[torch.Tensor], total: int) -> torch.Tensor:
    """Inverse of `EvalSet.shard`: rank r's row b is sample b * world + r. `shards` are every rank's
    rows, padded to one length; the padding sorts after sample total - 1 and is cut off."""
    return torch.stack(list(shards), dim=1).flatten(0, 1)[:total]


def all_gather_rows(rows: torch.Tensor, total: int, ranks: Ranks) -> torch.Tensor:
    """Every rank's `rows` (its shard of a `total`-sample set, width equal on all ranks) in set order.

    Parameters
    ----------
    rows: this rank's rows, (n, ...) with n = len(set.shard(rank, size)), on the group's device.
    total: the set's sample count.
    ranks: this process's place; every rank of the group must call.
    """
    padded = rows.new_zeros((-(-total // ranks.size), *rows.shape[1:]))  # the longest shard's length
    padded[:len(rows)] = rows
    shards = [torch.empty_like(padded) for _ in range(ranks.size)]
    dist.all_gather(shards, padded, group=ranks.group)
    return interleave(shards, total)


def broadcast_buffers(module: nn.Module, ranks: Ranks) -> None:
    """Give every rank rank 0's buffers (BN running statistics).

    Without cross-replica BN each rank's last forward updates its statistics from its own batch, so
    the ranks' encoders differ slightly; DDP would overwrite them with rank 0's at the next forward
    anyway, so this changes nothing for training and makes every shard come from rank 0's encoder,
    the one that is saved. Parameters are equal already (DDP all-reduces their gradients).
    """
    src = 0 if ranks.group is None else dist.get_global_rank(ranks.group, 0)
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src, group=ranks.group)


def _shard_features(
    encoder: nn.Module, data: EvalSet, device: torch.device, res: int | None, recipe: ViewRecipe, batch_size: int,
    ranks: Ranks,
) -> torch.Tensor:
    """This rank's shard's features; (0, D) when the shard is empty."""
    shard = data.shard(ranks.rank, ranks.size)
    # Extraction runs the encoder in eval mode, where (cross-replica) BN uses its running statistics
    # and makes no collective: ranks may run different numbers of batches without waiting on each other.
    features = extract_features(encoder, shard, device, res, recipe, batch_size)[0] if len(shard) else None
    width = torch.tensor([0 if features is None else features.shape[1]], device=device)
    if len(data) < ranks.size:
        # Some rank has no sample, so it cannot know the feature width: agree on it. Every rank takes
        # this branch or none does (the set is the same on all), so the collectives still match.
        dist.all_reduce(width, dist.ReduceOp.MAX, group=ranks.group)
    return torch.zeros(0, int(width), device=device) if features is None else features


def gathered_features(
    encoder: nn.Module,
    sets: Sequence[EvalSet],
    device: torch.device | str,
    res: int | None = None,
    recipe: ViewRecipe = BYOL_VIEWS,
    ranks: Ranks = SINGLE_PROCESS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(features float32 (N, D), labels int64 (N,)) of each set, on `device`, in the set's order, on every rank.

    One process extracts everything itself. With several, each rank extracts its shard and the
    features are all-gathered; the labels need no collective, every rank reads them from its own
    copy of the set.

    Parameters
    ----------
    encoder: the backbone; with several ranks rank 0's buffers (BN running statistics) are broadcast
        into it first (`broadcast_buffers`), so every rank's copy changes.
    sets: the labelled sets, the same on every rank; one (features, labels) pair each, in this order.
    device: where the features are extracted and gathered (CPU: gloo, CUDA: NCCL).
    res, recipe, batch_size: as `extract_features`'.
    ranks: this process's place among those sharing the extraction (default: one process, no collective).
    """
    if ranks.size == 1:
        return [extract_features(encoder, data, device, res, recipe, batch_size) for data in sets]
    device = torch.device(device)
    broadcast_buffers(encoder, ranks)
    return [(all_gather_rows(_shard_features(encoder, data, device, res, recipe, batch_size, ranks), len(data), ranks),
             data.labels.to(device))
            for data in sets]
