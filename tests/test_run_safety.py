"""Run safety and honest console output: signals to the process group, a second run on a busy --out,
resumes that cannot work, impossible batches, unwritable --out, out-of-range floats (the --out lock and
the temp files of killed writers on their own: test_outdir.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import runtime.preflight
import train
from config import FIXED, TrainConfig
from runtime.checkpoint import CheckpointDir, load_checkpoint
from runtime.outdir import OutLock
from runtime.resume import incompatible_options

TINY = ("--loader", "synthetic", "--gpus", "0", "--arch", "resnet18", "--width", "8", "--res", "8",
        "--batch-size", "8", "--no-compile", "--hidden-dim", "64", "--proj-dim", "32", "--workers", "0")
REAL = TINY[2:-2]  # without the synthetic loader and --workers 0
TIMEOUT = 120


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """16 random 24x24 JPEGs in 2 classes: enough for a few batches of 4, cheap to decode."""
    root = tmp_path_factory.mktemp("tiny") / "images"
    rng = np.random.default_rng(0)
    for i in range(16):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i}.jpg")
    return root


def start_train(out: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """train.py in its own session (so os.killpg reaches it and its workers, as `timeout` and SLURM do),
    output to a file so waiting for a line can never block."""
    log = out.with_name(out.name + ".log")
    with open(log, "w") as f:
        process = subprocess.Popen([sys.executable, "train.py", *args, "--out", str(out)], stdout=f,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return process, log


def wait_for_step(process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while "step " not in log.read_text():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no training step logged in time:\n" + log.read_text()
        time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=TIMEOUT)


def error_line(capsys, argv: list[str], code: int = 2) -> str:
    """Run train.main in-process; it must return `code` and end with one error line, no traceback."""
    assert train.main(argv) == code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("train.py: error: "), captured.err
    return last.removeprefix("train.py: error: ")


# 1. SIGTERM to the whole process group with DataLoader workers.

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_the_process_group_checkpoints_and_exits_143_with_torchvision_workers(tiny_folder, tmp_path):
    out = tmp_path / "run"
    process, log = start_train(out, *REAL, "--loader", "torchvision", "--data", str(tiny_folder),
                               "--batch-size", "4", "--workers", "2", "--steps", "1000", "--log-every", "1",
                               "--checkpoint-every", "0")  # the only checkpoint is the signal's
    try:
        wait_for_step(process, log)
        os.killpg(process.pid, signal.SIGTERM)  # the workers get it too
        assert process.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM, log.read_text()
    finally:
        stop(process)
    text = log.read_text()
    assert "Traceback" not in text and "checkpoint saved" in text
    [path] = CheckpointDir(out / "checkpoints", keep=3).paths()
    assert load_checkpoint(path)["step"] >= 1


# 2. One run per --out.

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_run_on_the_same_out_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    first, log = start_train(out, *TINY, "--steps", "100000", "--log-every", "1")
    try:
        wait_for_step(first, log)
        second = subprocess.run([sys.executable, "train.py", *TINY, "--steps", "2", "--resume", "--out", str(out)],
                                capture_output=True, text=True, timeout=TIMEOUT)
        assert second.returncode == 2, second.stderr
        [line] = second.stderr.strip().splitlines()
        assert line.startswith(f"train.py: error: --out {out} is in use by another run (pid {first.pid} on host "
                               f"{socket.gethostname()}, started ")
        assert first.poll() is None  # the first run goes on untouched
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # dies without any cleanup of its own
        first.wait(timeout=TIMEOUT)
    with OutLock(out):  # the OS released the dead run's lock
        pass


# 10. Resuming with options that change the saved tensors.

FINISHED = (*TINY, "--steps", "3", "--log-every", "1")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A 3-step run with all its outputs (checkpoints at steps 1, 2 and 3)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train.main([*FINISHED, "--checkpoint-minutes", "1e-6", "--out", str(out)]) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.mark.parametrize(("change", "expected"), [
    (("--arch", "resnet34"), "--arch resnet18 -> resnet34"),
    (("--hidden-dim", "32"), "--hidden-dim 64 -> 32"),
    (("--optimizer", "sgd"), "--optimizer lars -> sgd"),
    (("--res", "96"), "--res 8 -> 96, --small-images True -> False"),
])
def test_resume_with_other_model_options_names_them(capsys, finished, tmp_path, change, expected):
    out = copy_of(finished, tmp_path)
    capsys.readouterr()
    message = error_line(capsys, [*FINISHED, "--resume", "--out", str(out), *change])
    assert message.startswith("--resume: ") and f"other model options ({expected})" in message


@pytest.mark.parametrize(("change", "expected"), [
    # The README's own examples after a finished run: a shorter run, a longer one, another loader.
    (("--steps", "300"), "--steps 3 -> 300"),
    (("--steps", "2"), "--steps 3 -> 2"),
    ((), "--steps 3 -> unset"),  # the run was cut with --steps; the plain command would stretch its schedule
    # Builds the torchvision loader over the 60,000 built-in images before the checkpoint is read: 12 s.
    pytest.param(("--loader", "torchvision"), "--loader synthetic -> torchvision", marks=pytest.mark.slow),
    (("--base-lr", "0.1", "--batch-size", "16"), "--batch-size 8 -> 16, --base-lr 1.0 -> 0.1"),
    (("--seed", "1"), "--seed 0 -> 1"),
    (("--min-scale", "0.08"), "--min-scale 0.2 -> 0.08"),  # the views: the small-image default was filled in
])
def test_resume_that_would_change_the_schedule_or_the_data_is_refused(capsys, finished, tmp_path, change, expected):
    out = copy_of(finished, tmp_path)
    capsys.readouterr()
    argv = [*(FINISHED if change else TINY), "--resume", "--out", str(out), *change]
    message = error_line(capsys, argv)
    assert message.startswith(f"--resume: {out / 'checkpoints'}") and f"schedule or data options ({expected}); " \
        "continuing it with them would stretch or cut its schedule or change its data: pass another --out to start " \
        "a new run, or resume with the saved values" in message
    assert not (out / ".fastbyol.lock").exists(), "a refused run leaves its lock file behind"


def test_a_checkpoint_that_saved_the_crop_unset_reads_as_the_recipes_crop():
    # Before the small-image default (0.2) was filled in, checkpoints saved --min-scale unset: the views' 0.08.
    saved = TrainConfig(res=28).resolved().to_dict() | {"min_scale": None}
    assert incompatible_options(saved, TrainConfig(res=28).resolved(), FIXED) == ["--min-scale 0.08 -> 0.2"]
    assert incompatible_options(saved, TrainConfig(res=28, min_scale=0.08).resolved(), FIXED) == []


def test_resume_may_change_logging_and_workers_and_carries_elapsed_time(capsys, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    checkpoints = CheckpointDir(out / "checkpoints", keep=3)
    checkpoints.paths()[0].unlink()  # as if stopped right after step 2
    saved = load_checkpoint(checkpoints.paths()[0])["elapsed_s"]
    assert saved > 0
    assert train.main([*FINISHED, "--workers", "1", "--log-every", "2", "--resume", "--out", str(out)]) == 0
    assert "resumed from" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[2]["elapsed_s"] > saved >= records[1]["elapsed_s"]


def test_resume_at_the_end_has_nothing_to_do(capsys, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    capsys.readouterr()
    assert train.main([*FINISHED, "--resume", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nothing left to do" in printed and "step 3 of 3" in printed and "done" not in printed
    assert "a longer run is a new run: pass another --out" in printed


# 11. A batch larger than the dataset.

@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_batch_larger_than_the_data_is_one_line(capsys, tiny_folder, tmp_path, loader):
    if not runtime.preflight.is_available(loader):
        pytest.skip(f"{loader} is not installed")
    message = error_line(capsys, [*REAL, "--loader", loader, "--data", str(tiny_folder), "--batch-size", "32",
                                  "--workers", "1", "--steps", "2", "--out", str(tmp_path / "run")])
    assert message == (f"--batch-size 32 is larger than the 16 images of {tiny_folder}, so an epoch has no full "
                       "batch; use --batch-size 16 or less")
    assert not (tmp_path / "run" / "metrics.csv").exists()


# 12. An --out that cannot be written.

@pytest.mark.parametrize("where", ["/proc/fastbyol-out", "under-a-file"])
def test_unwritable_out_is_one_line_before_anything_is_built(capsys, tmp_path, where):
    if where == "under-a-file":
        (tmp_path / "file").write_text("x")
        where = str(tmp_path / "file" / "out")
    message = error_line(capsys, [*TINY, "--steps", "1", "--out", where])
    assert message.startswith(f"--out {where}: cannot create files there (") and "choose a writable folder" in message


# 13. Floats outside their meaningful range, and the NaN stop's message.

@pytest.mark.parametrize(("argv", "expected"), [
    (("--base-lr", "nan"), "--base-lr must be a finite number, got nan"),
    (("--base-lr", "inf"), "--base-lr must be a finite number, got inf"),
    (("--base-lr", "-1"), "--base-lr must be above 0, got -1.0"),
    (("--tau-base", "2"), "--tau-base must be in [0, 1]"),
    (("--momentum", "1"), "--momentum must be in [0, 1), got 1.0"),
    (("--weight-decay=-1e-6",), "--weight-decay must be 0 or more"),
    (("--warmup-epochs", "nan"), "--warmup-epochs must be a finite number"),
    (("--checkpoint-minutes", "inf"), "--checkpoint-minutes must be a finite number"),
])
def test_out_of_range_floats_are_refused_up_front(capsys, tmp_path, argv, expected):
    assert error_line(capsys, [*TINY, "--out", str(tmp_path), *argv]).startswith(expected)


@pytest.mark.timeout(300)
def test_nan_stop_without_a_checkpoint_does_not_claim_one(capsys, tmp_path):
    # lr 1e36 overflows float32 within a few steps; nothing is saved before the end of the run.
    message = error_line(capsys, [*TINY, "--base-lr", "1e36", "--steps", "8", "--log-every", "1",
                                  "--checkpoint-every", "0", "--checkpoint-minutes", "0", "--out", str(tmp_path)],
                         code=train.NAN_EXIT_CODE)
    assert "no checkpoint was saved before it" in message and "kept" not in message
    assert not CheckpointDir(tmp_path / "checkpoints", keep=3).paths()


# 14. --loader ffcv given a folder.

def test_ffcv_given_a_folder_says_how_to_convert_it(capsys, tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setattr(runtime.preflight, "is_available", lambda name: True)
    message = error_line(capsys, [*REAL, "--loader", "ffcv", "--data", str(tiny_folder), "--out", str(tmp_path)])
    assert message == (f"--data {tiny_folder} is a folder; --loader ffcv reads a .beton file: convert it with "
                       f"python -m datasources.ffcv_convert --src {tiny_folder} --out {tiny_folder}.beton")


# Console output.

def test_startup_line_names_what_is_read_and_no_tensorboard_note(capsys, tmp_path, tiny_folder):
    assert train.main([*TINY, "--steps", "1", "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "on synthetic random views (--loader synthetic reads no data)" in printed
    assert "fashion-mnist" not in printed and "tensorboard" not in printed.lower()
    assert train.main([*REAL, "--loader", "torchvision", "--data", str(tiny_folder), "--batch-size", "4",
                       "--workers", "0", "--steps", "1", "--out", str(tmp_path / "b")]) == 0
    assert f"on {tiny_folder} via the torchvision loader at 8px" in capsys.readouterr().out


@pytest.mark.slow
def test_too_many_workers_is_one_warning_naming_the_option(tmp_path, tiny_folder):
    # A subprocess (pytest would swallow torch's warnings in-process) on a 1-core machine, for train.py and torch.
    one_core = ("import os, sys; os.sched_getaffinity = lambda pid: {0}; import train; "
                "sys.exit(train.main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", one_core, *REAL, "--loader", "torchvision", "--data",
                             str(tiny_folder), "--batch-size", "4", "--workers", "2", "--steps", "1", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("train.py: warning: --workers 2 x 1 training process(es) is more than this "
                               "machine's 1 usable cores") == 1
    assert "This DataLoader will create" not in result.stderr


def test_ddp_wrap_prints_no_deprecation_warning(tmp_path):
    # A one-process gloo group in a subprocess (the group is process-global state); World claims 2 ranks so
    # wrap_online builds the DDP wrapper. -W error turns any FutureWarning into a failing exit.
    script = f"""
import torch, torch.distributed as dist
from config import TrainConfig
from runtime.assembly import build_model
from runtime.distributed import World, wrap_online
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
cfg = TrainConfig(arch="resnet18", width=8, hidden_dim=16, proj_dim=8, res=8).resolved()
for sync_bn in (True, False):
    wrap_online(build_model(cfg, torch.device("cpu")), World(0, 0, 2, torch.device("cpu")), sync_bn)
"""
    result = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", script], capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr
