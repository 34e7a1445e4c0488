"""Preemption and resume through train.py: SIGTERM mid-run, a corrupt newest checkpoint, then --resume
must end with exactly the weights of an uninterrupted run (deterministic CPU mode, synthetic loader)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.checkpoint import CheckpointDir, load_checkpoint

STEPS = 8
RUN = ("train.py", "--loader", "synthetic", "--gpus", "0", "--arch", "resnet18", "--res", "8", "--batch-size", "8",
       "--no-compile", "--hidden-dim", "64", "--proj-dim", "32", "--workers", "0", "--deterministic",
       "--steps", str(STEPS), "--log-every", "2",
       # Save at every log point, so the interrupted run leaves several checkpoints behind.
       "--checkpoint-minutes", "1e-6")


def train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *RUN, "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=400)


def train_until_sigterm(out: Path, after_step: int) -> tuple[int, str]:
    """Start a run, send SIGTERM once it has logged `after_step`, return (exit code, stdout)."""
    process = subprocess.Popen([sys.executable, *RUN, "--out", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if line.startswith(f"step {after_step:6d}/"):
                process.send_signal(signal.SIGTERM)
                break
        rest, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    return process.returncode, "".join(seen) + rest


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    straight = train(root / "straight")
    code, stopped_log = train_until_sigterm(root / "killed", after_step=4)
    ckpts = CheckpointDir(root / "killed" / "checkpoints", keep=3)
    before = [p.name for p in ckpts.paths()]
    newest = ckpts.paths()[0]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])  # as if the disk filled up mid-write
    resumed = train(root / "killed", "--resume")
    return {"root": root, "straight": straight, "code": code, "stopped_log": stopped_log,
            "checkpoints_after_kill": before, "resumed": resumed}


def final_state(out: Path) -> dict:
    return load_checkpoint(CheckpointDir(out / "checkpoints", keep=3).paths()[0])


def tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_finishes_the_step_saves_and_exits(runs):
    assert runs["straight"].returncode == 0, runs["straight"].stderr
    assert runs["code"] == 128 + signal.SIGTERM, runs["stopped_log"]
    assert "stopped by a signal after step" in runs["stopped_log"]
    steps = [int(name[5:14]) for name in runs["checkpoints_after_kill"]]
    # Saved at the log points 2 and 4, then at the step where the signal was seen (before the end).
    assert steps[1:] == [4, 2] and 4 < steps[0] < STEPS


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_skips_the_corrupt_checkpoint_and_matches_an_uninterrupted_run(runs):
    resumed = runs["resumed"]
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping checkpoint" in resumed.stderr and "resumed from" in resumed.stdout
    assert "ckpt-000000004.pt at step 4" in resumed.stdout
    straight, again = final_state(runs["root"] / "straight"), final_state(runs["root"] / "killed")
    assert straight["step"] == again["step"] == STEPS
    a, b = tensors({k: straight[k] for k in ("online", "target", "optimizer")}), \
        tensors({k: again[k] for k in ("online", "target", "optimizer")})
    assert a.keys() == b.keys() and len(a) > 100
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    # The metric files hold each step once: rows logged after the resumed-from checkpoint were dropped.
    jsonl = (runs["root"] / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in jsonl] == [2, 4, 6, 8]
