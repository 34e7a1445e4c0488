"""Evaluation shared over ranks (evaluation.distributed) on CPU with gloo: each rank extracts its shard,
the all-gathered features equal one process's in the set's order, the kNN monitor gives every rank
the single-process value, and train.py's 2-process run evaluates on both ranks and writes eval.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_sets import gray_set, needs_fashion_mnist
from tiny_models import TinyEncoder
from train_runs import TINY, run_train

from evaluation import FolderSet, Ranks, eval_splits, evaluate_encoder, gathered_features, knn_monitor
from evaluation.distributed import interleave
from runtime.distributed import close_world, init_world, launch

RES = 16


def test_shards_are_disjoint_cover_the_set_and_interleave_back_in_order() -> None:
    for total in range(8):
        data = gray_set(n=total, side=2)
        for world_size in range(1, 5):
            shards = [data.shard(rank, world_size) for rank in range(world_size)]
            longest = max(len(shard) for shard in shards)
            assert longest - min(len(shard) for shard in shards) <= 1
            # Pad as all_gather_rows does; the padding (-1) must not survive.
            padded = [torch.cat([shard.images, torch.full((longest - len(shard), 1, 2, 2), -1)]) for shard in shards]
            assert torch.equal(interleave(padded, total), data.images.long())


def test_ranks_reject_a_rank_outside_the_group() -> None:
    assert Ranks().is_main and Ranks().size == 1 and not Ranks(1, 2).is_main
    with pytest.raises(ValueError, match="rank 2 is not in a group of 2"):
        Ranks(2, 2)


def random_encoder() -> torch.nn.Module:
    """The same encoder in every process, with BN statistics that matter in eval mode."""
    torch.manual_seed(0)
    encoder = TinyEncoder()
    encoder.bn.running_mean.uniform_(-1, 1)
    encoder.bn.running_var.uniform_(0.5, 2)
    return encoder


def odd_sets(photos: str) -> dict[str, object]:
    """Odd sizes, so the two ranks' shards differ in length; one set smaller than the world."""
    train, test = eval_splits("fashion-mnist", train_limit=301, test_limit=99)
    folder = FolderSet(photos, workers=0).limit(63)
    return {"train": train, "test": test, "folder": folder, "one": gray_set(n=1, side=20)}


def evaluations(encoder: torch.nn.Module, photos: str, ranks: Ranks) -> dict[str, object]:
    sets = odd_sets(photos)
    features = dict(zip(sets, gathered_features(encoder, list(sets.values()), "cpu", res=RES, ranks=ranks),
                        strict=True))
    return {"features": features,
            "knn": knn_monitor(encoder, sets["train"], sets["test"], "cpu", res=RES, ranks=ranks),
            "scores": evaluate_encoder(encoder, sets["train"], sets["test"], "cpu", res=RES, ranks=ranks)}


def eval_rank(args: tuple[str, str]) -> int:
    out, photos = args
    torch.set_num_threads(1)  # the two ranks share the CI machine's cores: no oversubscribed spinning
    world = init_world(use_cuda=False)
    try:
        encoder = random_encoder()
        if world.rank == 1:
            # Per-rank BN under DDP: rank 1's statistics drift from rank 0's, and rank 0's must win.
            for buffer in encoder.buffers():
                buffer.add_(1)
        results = evaluations(encoder, photos, Ranks(world.rank, world.size))
    finally:
        close_world(world)
    torch.save(results, Path(out) / f"rank{world.rank}.pt")
    return 0


@needs_fashion_mnist
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_gloo_ranks_gather_the_single_process_features_and_knn(photo_corpus, tmp_path) -> None:
    assert launch(eval_rank, (str(tmp_path), photo_corpus), world_size=2) == 0
    single = evaluations(random_encoder(), photo_corpus, Ranks())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, (features, labels) in single["features"].items():
        assert features.shape[0] in (301, 99, 63, 1)
        for rank in ranks:
            gathered, gathered_labels = rank["features"][name]
            assert torch.equal(gathered_labels, labels), name
            # Same samples in the same order; only the batch composition differs (float noise at most).
            torch.testing.assert_close(gathered, features, rtol=1e-4, atol=1e-5, msg=name)
    assert ranks[0]["knn"] == ranks[1]["knn"] == single["knn"]
    assert ranks[1]["scores"] is None  # the scores are rank 0's; rank 1 left after the gathers
    assert ranks[0]["scores"]["knn_top1"] == single["scores"]["knn_top1"] == single["knn"]
    assert ranks[0]["scores"]["linear_top1"] == pytest.approx(single["scores"]["linear_top1"], abs=0.02)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_train_py_two_processes_share_the_knn_monitor_and_the_final_evaluation(photo_corpus, tmp_path) -> None:
    # 64 photos, global batch 16 over 2 ranks: 4 steps per epoch; 63 evaluation images split 32 / 31.
    result = run_train("--loader", "torchvision", "--data", photo_corpus, "--val-data", photo_corpus, *TINY[2:],
                       "--batch-size", "16", "--processes", "2", "--res", "16", "--epochs", "1", "--log-every", "2",
                       "--eval-every", "1", "--eval-limit", "63", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr  # the launcher's 0: both ranks exited cleanly
    assert "global batch 16 over 2 process(es)" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and "knn_top1" in records[-1]
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert 0 <= scores["linear_top1"] <= 1 and scores["knn_top1"] == pytest.approx(records[-1]["knn_top1"])
    assert result.stdout.count("final evaluation") == 1  # rank 0 only
