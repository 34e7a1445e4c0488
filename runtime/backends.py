"""Process-wide numeric and kernel-selection settings for the training step, set once per process
before its first CUDA kernel."""

from __future__ import annotations

import logging
import os

import torch

# cuBLAS is deterministic only with a fixed workspace; without it, deterministic mode raises at the
# first matmul on CUDA. Read when the first cuBLAS handle is created, so it must be set before that.
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


def configure_backends(deterministic: bool) -> None:
    """Fastest kernels by default (cuDNN autotuning, TF32 for the few fp32 matmuls and convolutions
    left outside bf16 autocast); with `deterministic`, bitwise-reproducible ones instead."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)
    # Autotuning picks kernels by timing them, which may differ between runs.
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    # Subnormal floats (|x| < 1.2e-38) appear in the first steps of a small-image run and make every
    # CPU op that touches them several times slower (the width-16 quickstart step: 28 instead of 210
    # images/s until they wash out). Flushing them to zero changes no result above float32's range.
    torch.set_flush_denormal(True)
    # CUDA only: the CPU (mkldnn) fp32 precision is left alone.
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    quiet_cpu_compile()


def quiet_cpu_compile() -> None:
    """torch.compile on a machine without CUDA imports torch.utils.cpp_extension, which warns "No CUDA
    runtime is found, using CUDA_HOME=..." although nothing CUDA is built: noise on every CPU run."""
    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def cpu_compiler() -> str | None:
    """The C++ compiler torch.compile would build CPU kernels with (inductor's search: `torch._inductor.config.cpp.cxx`,
    $CXX first, then g++ / clang++), or None when none runs: compiling a CPU step would fail at its first call."""
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return None
