"""The DDP path on CPU (gloo): 2 processes follow 1 process with the same global batch, train.py runs
2 processes end to end, and each rank's loader shard is disjoint from the others'.

The equivalence test uses a BN-free BYOL (GroupNorm encoder, BN-less heads; tests/ddp_trajectory.py): what
it checks is the DDP wiring itself (gradient averaging over ranks, the un-wrapped target and its EMA, LARS,
the loss averaged over ranks at log points); cross-replica BN has its own equivalence test (test_sync_bn.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_trajectory import trajectory

from config import TrainConfig
from models.backbones import build_backbone
from runtime.assembly import build_model, make_loader
from runtime.checkpoint import CheckpointDir, load_checkpoint
from runtime.distributed import World, close_world, init_world, launch, threads_per_process


def ddp_rank(out: str) -> int:
    world = init_world(use_cuda=False)
    try:
        losses, state = trajectory(world)
    finally:
        close_world(world)
    torch.save({"losses": losses, "state": state, "threads": torch.get_num_threads()},
               Path(out) / f"rank{world.rank}.pt")
    return 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_gloo_processes_follow_one_process_with_the_same_global_batch(tmp_path):
    assert launch(ddp_rank, str(tmp_path), world_size=2) == 0
    single_losses, single_state = trajectory(World(0, 0, 1, torch.device("cpu")))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the logged loss is the mean over ranks
    # Each CPU rank takes its share of the cores (2 ranks each taking all of them spin against each other).
    assert [rank["threads"] for rank in ranks] == [threads_per_process(2)] * 2
    # Same maths, different summation order (all-reduce of two half-batch gradients): float32 noise only.
    assert ranks[0]["losses"] == pytest.approx(single_losses, rel=1e-5)
    assert single_losses[-1] < single_losses[0] - 1e-3  # it trains, so the comparison is not of constants
    for rank in ranks:
        for name, tensor in single_state.items():
            torch.testing.assert_close(rank["state"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_train_py_runs_two_cpu_processes(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--loader", "synthetic", "--gpus", "0", "--processes", "2",
         "--arch", "resnet18", "--width", "8", "--res", "8", "--batch-size", "8", "--no-compile", "--hidden-dim", "64",
         "--proj-dim", "32", "--workers", "0", "--steps", "2", "--log-every", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "global batch 8 over 2 process(es)" in result.stdout
    assert sum(line.startswith("step") for line in result.stdout.splitlines()) == 2  # rank 0 only
    state = load_checkpoint(CheckpointDir(tmp_path / "checkpoints", keep=3).paths()[0])
    assert state["step"] == 2 and len(state["rng"]) == 2
    # Each rank seeds its augmentation RNG with seed + rank, so the saved streams differ.
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    # Cross-replica BN (--sync-bn is the default) leaves plain-BN state: the checkpoint loads strictly
    # into an unconverted BYOL and the exported backbone into a plain small-stem ResNet-18 (of its width, 8).
    cfg = TrainConfig(arch="resnet18", width=8, res=8, hidden_dim=64, proj_dim=32).resolved()
    byol = build_model(cfg, torch.device("cpu"))
    byol.online.load_state_dict(state["online"])
    byol.target.load_state_dict(state["target"])
    # Per-view BN: 2 training-mode calls per step in each network.
    assert state["online"]["encoder.bn1.num_batches_tracked"] == state["target"]["0.bn1.num_batches_tracked"] == 4
    build_backbone("resnet18", small_images=True, width=8)[0].load_state_dict(torch.load(tmp_path / "backbone.pt",
                                                                                weights_only=True)["state_dict"])


@pytest.fixture(scope="module")
def one_photo_per_class(photo_corpus, tmp_path_factory) -> Path:
    """16 real photos, each its own class, so a batch's labels name exactly which images it holds."""
    root = tmp_path_factory.mktemp("one_per_class")
    for i, photo in enumerate(sorted(Path(photo_corpus).rglob("*.JPEG"))[:16]):
        (root / f"class_{i:02d}").mkdir()
        (root / f"class_{i:02d}" / photo.name).write_bytes(photo.read_bytes())
    return root


@pytest.mark.timeout(300)
def test_rank_loaders_get_disjoint_shards_of_the_global_batch(one_photo_per_class):
    cfg = TrainConfig(loader="torchvision", data=str(one_photo_per_class), batch_size=4, res=16, workers=0,
                      seed=5).resolved()
    seen = []
    for rank in range(2):
        loader = make_loader(cfg, World(rank, rank, 2, torch.device("cpu")), cfg.data)
        loader.set_epoch(0)
        labels = [labels for _, _, labels in loader]
        assert len(labels) == len(loader) == 4 and all(len(batch) == 2 for batch in labels)  # 4 global / 2 ranks
        seen.append({int(x) for batch in labels for x in batch})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(16))
