"""Preemption and resume through train.py: SIGTERM mid-run, a corrupt newest checkpoint, then --resume
must end with exactly the weights of an uninterrupted run (deterministic CPU mode, synthetic loader);
and for every real loader, a run resumed mid-epoch repeats an uninterrupted run's losses and weights."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_runs import RUN, STEPS, final_state, tensors

from datasources.ffcv_convert import main as ffcv_convert
from runtime.checkpoint import CheckpointDir


def train_here(out: Path, *extra: str, run: tuple[str, ...]) -> subprocess.CompletedProcess:
    """A train.py run in this process (train.main, its output captured): for the runs that are not interrupted by a
    signal, whose test is what they compute, not the process; every ffcv run after the first then reuses the
    numba pipeline compiled once, instead of compiling it again in each new process (~10 s each on 2 cores)."""
    import train as trainer

    stdout, stderr = io.StringIO(), io.StringIO()
    args = [*run[1:], "--out", str(out), *extra]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = trainer.main(args)
    return subprocess.CompletedProcess(run, code, stdout.getvalue(), stderr.getvalue())


def train_until_sigterm(out: Path, after_step: int) -> tuple[int, str]:
    """Start a run, send SIGTERM once it has logged `after_step`, return (exit code, stdout)."""
    # This process's intra-op threads: a deterministic run repeats its numbers only at the same thread count, and
    # the runs it is compared with run here (`train_here`).
    process = subprocess.Popen([sys.executable, *RUN, "--out", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env=os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())})
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
    straight = train_here(root / "straight", run=RUN)
    code, stopped_log = train_until_sigterm(root / "killed", after_step=4)
    ckpts = CheckpointDir(root / "killed" / "checkpoints", keep=3)
    before = [p.name for p in ckpts.paths()]
    newest = ckpts.paths()[0]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])  # as if the disk filled up mid-write
    resumed = train_here(root / "killed", "--resume", run=RUN)
    return {"root": root, "straight": straight, "code": code, "stopped_log": stopped_log,
            "checkpoints_after_kill": before, "resumed": resumed}


def differing_tensors(out_a: Path, out_b: Path) -> list[str]:
    """Names of the weights, target weights and optimizer tensors that differ between two runs' last
    checkpoints (both must hold the same, non-trivial set)."""
    a, b = (tensors({part: state[part] for part in ("online", "target", "optimizer")})
            for state in (final_state(out_a), final_state(out_b)))
    assert a.keys() == b.keys() and len(a) > 100
    return [k for k in a if not torch.equal(a[k], b[k])]


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
    different = differing_tensors(runs["root"] / "straight", runs["root"] / "killed")
    assert not different, different[:5]
    # The metric files hold each step once: rows logged after the resumed-from checkpoint were dropped.
    jsonl = (runs["root"] / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in jsonl] == [2, 4, 6, 8]


# ---------------------------------------------------------------- every loader, resumed mid-epoch

# 64 images in batches of 16: 4 steps an epoch; the resumed run restarts 2 steps into epoch 1.
LOADER_STEPS, RESUME_AT = 10, 6
LOADER_RUN = ("train.py", "--gpus", "0", "--arch", "resnet18", "--width", "8", "--res", "8", "--batch-size", "16",
              "--no-compile", "--hidden-dim", "64", "--proj-dim", "32", "--deterministic",
              "--steps", str(LOADER_STEPS), "--log-every", "1",
              # A checkpoint after every step (kept), so any step can be the one a run was interrupted after.
              "--checkpoint-minutes", "1e-6", "--keep-checkpoints", str(LOADER_STEPS + 1))


@pytest.fixture(scope="module")
def photo_beton(photo_corpus, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("beton") / "photos.beton")
    assert ffcv_convert(["--src", photo_corpus, "--out", out, "--max-res", "64", "--workers", "2"]) == 0
    return out


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, LOADER_STEPS + 1))
    return {row["step"]: row["loss"] for row in rows}


def resume_from(straight: Path, resumed: Path, step: int) -> None:
    """`resumed`: `straight` as it stood when interrupted right after saving `step` (later checkpoints gone)."""
    shutil.copytree(straight, resumed)
    for path in CheckpointDir(resumed / "checkpoints", keep=LOADER_STEPS + 1).paths():
        if int(path.name[5:14]) > step:
            path.unlink()


# The uninterrupted reference runs with 2 workers: each epoch's draws are a function of (seed, epoch, sample or
# batch) alone, so of neither the worker count nor an interruption; a resume with --workers 0 is held to it too.
REFERENCE_WORKERS = 2


@pytest.fixture(scope="module")
def uninterrupted(photo_corpus, tmp_path_factory, request):
    """loader -> (its LOADER_RUN command, its uninterrupted run's --out), each run once per module."""
    done = {}

    def run_for(loader: str) -> tuple[tuple[str, ...], Path]:
        if loader not in done:
            data = request.getfixturevalue("photo_beton") if loader == "ffcv" else photo_corpus
            run = (*LOADER_RUN, "--loader", loader, "--data", data)
            out = tmp_path_factory.mktemp(f"straight-{loader}") / "run"
            straight = train_here(out, "--workers", str(REFERENCE_WORKERS), run=run)
            assert straight.returncode == 0, straight.stderr
            done[loader] = run, out
        return done[loader]

    return run_for


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("loader", "workers"), [("torchvision", 0), ("torchvision", 2), ("dali", 2), ("ffcv", 2)])
def test_every_loader_resumed_mid_epoch_matches_an_uninterrupted_run(loader, workers, uninterrupted,
                                                                     tmp_path) -> None:
    """The augmentations of a resumed epoch used to differ from the uninterrupted run's: torchvision's
    DataLoader workers restarted from their first seed (and with --workers 0 the skipped batches drew
    again from the restored generator), DALI rebuilt its pipeline with another order and seed, and FFCV's
    on-device augmentation drew from the trainer's generator. Each epoch's draws are now a function of
    (seed, epoch, sample or batch) alone. The resumed run continues the uninterrupted run's own folder,
    as a preempted job does (the worker count may change on resume)."""
    run, straight = uninterrupted(loader)
    resume_from(straight, tmp_path / "resumed", RESUME_AT)
    resumed = train_here(tmp_path / "resumed", "--workers", str(workers), "--resume", run=run)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {RESUME_AT}" in resumed.stdout
    expected, got = losses(straight), losses(tmp_path / "resumed")
    assert got == expected
    assert final_state(tmp_path / "resumed")["step"] == LOADER_STEPS
    different = differing_tensors(straight, tmp_path / "resumed")
    assert not different, different[:5]
