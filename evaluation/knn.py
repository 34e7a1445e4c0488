"""Weighted kNN classifier on frozen features (the InstDisc / solo-learn monitor).

Cosine similarity to every memory-bank feature; the k most similar vote for their label with
weight exp(sim / T). Cheap enough to run every few epochs during training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.07
# Queries per similarity matmul: bounds memory at chunk x bank-size floats.
QUERY_CHUNK = 1024


def effective_k(bank_size: int, num_classes: int, k: int = DEFAULT_K) -> int:
    """The neighbours a kNN evaluation uses: `k`, at most half of a class's average share of the bank.

    More neighbours than a class has images make the vote one of the whole bank: with 200 images of 10
    classes, k = 200 gave every encoder the same 9.0%."""
    return max(1, min(k, bank_size // (2 * num_classes)))


@torch.no_grad()
def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> torch.Tensor:
    """Predicted class (N_queries,) for each query row, from the k nearest bank rows by cosine similarity.

    Parameters
    ----------
    bank: (N_bank, D) features of the labelled memory bank (any float dtype; normalized here).
    bank_labels: (N_bank,) int64 class indices in [0, num_classes), on the bank's device.
    queries: (N_queries, D) features to classify, on the bank's device.
    num_classes: the number of classes (the vote's width).
    k: neighbours that vote (>= 1; ValueError otherwise), at most N_bank.
    temperature: T of each neighbour's weight exp(similarity / T); lower favours the nearest.
    """
    if k < 1:
        raise ValueError(f"kNN needs k >= 1, got {k}")
    k = min(k, len(bank))
    bank = F.normalize(bank.float(), dim=1)
    predictions = []
    for chunk in F.normalize(queries.float(), dim=1).split(QUERY_CHUNK):
        similarity, neighbours = (chunk @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        votes.scatter_add_(1, bank_labels[neighbours], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> float:
    """Top-1 accuracy in [0, 1] of `knn_predict` on labelled queries.

    Parameters
    ----------
    bank, bank_labels, queries, num_classes, temperature: as `knn_predict`'s.
    k: the neighbours asked for; `effective_k` of them vote.
    query_labels: (N_queries,) int64 true classes of the queries (any device).
    """
    predictions = knn_predict(bank, bank_labels, queries, num_classes, effective_k(len(bank), num_classes, k),
                              temperature)
    return (predictions == query_labels.to(predictions.device)).float().mean().item()
