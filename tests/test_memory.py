"""runtime/memory.py: a step's memory estimated before anything is allocated, checked against the peak resident
memory of real CPU training runs; a run that cannot fit is refused in one line naming a batch size that fits."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from train_runs import TINY, run_train_here

import runtime.memory as memory
from config import parse_config
from runtime import preflight

CPU = torch.device("cpu")
# train.main in a fresh process: the resident memory once everything is imported, then the peak after the run.
MEASURE = """
import sys
import train
def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
before = kib("VmRSS")
code = train.main(sys.argv[1:])
print("PEAK", code, (kib("VmHWM") - before) * 1024)
"""


def measured_peak(*flags: str) -> int:
    """Bytes a train.py run's resident memory grew by at its peak (VmHWM, read by the kernel)."""
    # One intra-op thread: each thread's scratch buffers and malloc arena move the peak by ~20 MB with the
    # machine's load (seen under pytest-xdist), as much as 64 images' worth of activations at this size.
    result = subprocess.run([sys.executable, "-c", MEASURE, *flags], capture_output=True, text=True, timeout=300,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    found = re.search(r"^PEAK 0 (\d+)$", result.stdout, re.MULTILINE)
    assert found, result.stdout + result.stderr
    return int(found[1])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_estimate_matches_the_measured_peak_of_cpu_runs_at_two_batch_sizes(tmp_path):
    peaks, estimates = [], []
    for batch in (64, 192):
        flags = (*TINY, "--width", "16", "--res", "32", "--batch-size", str(batch), "--steps", "2",
                 "--out", str(tmp_path / str(batch)))
        peaks.append(measured_peak(*flags))
        estimates.append(memory.estimate(parse_config(list(flags)).resolved(), batch, CPU).total)
    for estimated, peak in zip(estimates, peaks, strict=True):
        assert 0.8 <= estimated / peak <= 1.25, (estimates, peaks)
    # The part that grows with the batch: 128 more images, estimated against measured.
    assert 0.75 <= (estimates[1] - estimates[0]) / (peaks[1] - peaks[0]) <= 1.33, (estimates, peaks)


def test_a_run_that_does_not_fit_is_refused_with_a_batch_size_that_does(monkeypatch):
    budget = 10**9
    monkeypatch.setattr(memory, "cpu_memory_available", lambda: budget)
    cfg = parse_config([*TINY, "--width", "32", "--res", "64", "--batch-size", "4096"]).resolved()
    with pytest.raises(ValueError) as raised:
        preflight.check(cfg)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("--batch-size 4096 at 64 px (resnet18, width 32) needs about ")
    assert "but this machine has 1.0 GB available" in message
    fits = int(re.search(r"use --batch-size (\d+) \(or lower --res or --width\)$", message)[1])
    assert memory.estimate(cfg, fits, CPU).total <= budget < memory.estimate(cfg, fits + 1, CPU).total
    preflight.check(cfg.__class__(**{**cfg.to_dict(), "batch_size": fits}))  # the named batch passes


def test_several_cpu_processes_share_the_memory_and_gpus_are_counted_one_by_one(monkeypatch):
    monkeypatch.setattr(memory, "cpu_memory_available", lambda: 8 * 10**9)
    cfg = parse_config(list(TINY)).resolved()
    assert memory.device_memory(cfg, 2, use_cuda=False) == (4 * 10**9, "this machine has 8.0 GB available "
                                                                         "shared by 2 processes")
    sizes = {0: 80 * 10**9, 1: 40 * 10**9}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=sizes[i]))
    assert memory.device_memory(cfg, 2, use_cuda=True) == (40 * 10**9, "each GPU has 40.0 GB")


def test_the_bare_command_of_the_old_defaults_is_refused_in_one_line(tmp_path, capsys):
    # ResNet-50 at 224 px, batch 256: ~23 GB resident within 30 s on a 24 GB machine before the kernel killed it.
    # Refused before anything is built, so it runs in this process (train.main, as the script calls it).
    result = run_train_here(capsys, "--gpus", "0", "--arch", "resnet50", "--res", "224", "--batch-size", "4096",
                            "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert re.match(r"train\.py: error: --batch-size 4096 at 224 px \(resnet50, width 64\) needs about \d+\.\d GB "
                    r"per process .*; use --batch-size \d+ \(or lower --res or --width\)$", result.stderr)
    assert not (tmp_path / "out").exists(), "a refused run claims no --out"
