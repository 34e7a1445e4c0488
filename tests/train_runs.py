"""Small train.py runs on CPU (synthetic loader) and reading what they leave behind: the tiny command
line and a subprocess runner, the deterministic run the resume tests repeat, its last checkpoint,
and a checkpoint flattened to named tensors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from runtime.checkpoint import CheckpointDir, load_checkpoint

# Width 8: 1/64 of the full network's conv weights, so a step and a checkpoint cost little (a test that needs
# the full width, e.g. a stock torchvision state_dict, adds --width 64: the last flag wins).
TINY = ("--loader", "synthetic", "--gpus", "0", "--arch", "resnet18", "--batch-size", "8", "--no-compile",
        "--hidden-dim", "64", "--proj-dim", "32", "--workers", "0", "--width", "8")


def run_train(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True, timeout=timeout)


def run_train_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """train.main(args) in this process, its output read from `capsys`, as `run_train` reports a run: for tests of
    what a run computes and writes, not of the process (signals, exit, memory), saving a process start and the
    ~4.5 s of imports it costs. Output printed before the call is discarded."""
    import train

    capsys.readouterr()
    code = train.main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["train.py", *args], code, captured.out, captured.err)


STEPS = 8
RUN = ("train.py", *TINY, "--res", "8", "--deterministic", "--steps", str(STEPS), "--log-every", "2",
       # Save at every log point, so the interrupted run leaves several checkpoints behind.
       "--checkpoint-minutes", "1e-6")


def final_state(out: Path) -> dict:
    return load_checkpoint(CheckpointDir(out / "checkpoints", keep=3).paths()[0])


def tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}
