"""Process-wide kernel settings: fast by default, reproducible (and CUDA-safe) with --deterministic; no
CUDA-runtime warning from a CPU compile."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.backends import CUBLAS_DETERMINISTIC_WORKSPACE, configure_backends

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_backends(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.fp32_precision,
             torch.backends.cudnn.conv.fp32_precision)
    yield
    torch.set_flush_denormal(False)
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1], saved[2]
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved[3], saved[4]


def test_deterministic_sets_the_cublas_workspace_before_cuda_starts(restore_backends):
    configure_backends(deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC_WORKSPACE
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic


def test_default_picks_the_fast_kernels(restore_backends):
    configure_backends(deterministic=False)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark
    assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "tf32"
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"  # CPU numerics untouched


def test_subnormal_floats_are_flushed_on_cpu(restore_backends):
    smallest_normal = torch.finfo(torch.float32).tiny
    configure_backends(deterministic=False)
    assert (torch.tensor([smallest_normal]) * 0.5).item() == 0.0
    assert (torch.tensor([smallest_normal]) * 2.0).item() == 2 * smallest_normal


def test_user_workspace_setting_is_kept(restore_backends, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    configure_backends(deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.mark.gpu
def test_deterministic_matmul_runs_on_cuda(restore_backends):
    configure_backends(deterministic=True)
    a = torch.randn(64, 64, device="cuda")
    torch.testing.assert_close(a @ a, a @ a, rtol=0, atol=0)


def test_cpu_compile_does_not_warn_about_a_missing_cuda_runtime() -> None:
    """torch.utils.cpp_extension (imported by torch.compile's C++ backend) warned on every CPU run."""
    script = ("from runtime.backends import configure_backends\n"
              "configure_backends(deterministic=False)\n"
              "import torch.utils.cpp_extension\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "No CUDA runtime" not in proc.stderr
