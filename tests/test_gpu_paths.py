"""Every CUDA path, on a CUDA device (all `gpu`-marked: skipped without one).

The CPU suite proves the same behaviour on CPU (tests/test_host_sync.py for syncs, the loader
contract for views); these tests run it where it matters: DALI `mixed` decode, FFCV -> CUDA with
`gpu_augment`, the compiled and eager bf16 channels_last step under `set_sync_debug_mode("error")`,
LARS on CUDA against the float64 loop, `--resume` on CUDA, and DDP on one GPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ddp_trajectory import trajectory
from lars_reference import make_grads, make_params, reference_lars_step
from loader_contract import FfcvContract, LoaderContract
from step_inputs import fixed_views, make_step
from train_runs import RUN, final_state, tensors

from optim.lars import LARS
from runtime.distributed import RENDEZVOUS_FILE, World, launch

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def no_host_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


class TestDaliMixedLoaderContract(LoaderContract):
    module = "pipelines.dali_loader"
    device = "cuda"


class TestFfcvToCudaLoaderContract(FfcvContract):
    device = "cuda"


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_bf16_channels_last_step_is_sync_free(compile):
    v1, v2 = (v.to(torch.bfloat16) for v in fixed_views(device="cuda"))
    step = make_step(compile=compile, device="cuda", precision="bf16")
    losses = [step(v1, v2, lr=0.5, tau=0.99) for _ in range(3)]  # warm-up: compilation, optimizer state
    with no_host_sync():
        losses.append(step(v1, v2, lr=0.5, tau=0.99))
    values = torch.stack(losses).tolist()
    assert all(map(math.isfinite, values)) and values[-1] < values[0], values


def test_lars_on_cuda_matches_the_float64_loop():
    lr, momentum, weight_decay, eta = 0.7, 0.9, 1e-2, 1e-3
    ref_params = make_params()
    ref_buffers = [torch.zeros_like(p) for p in ref_params]
    params = [p.cuda().requires_grad_() for p in make_params()]
    opt = LARS(params, lr=torch.tensor(lr, device="cuda", dtype=torch.float64), momentum=momentum,
               weight_decay=weight_decay, eta=eta)
    adapt = [p.ndim > 1 for p in ref_params]
    for step in range(3):
        grads = make_grads(ref_params, step)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.cuda()
        with no_host_sync():
            opt.step()
        reference_lars_step(ref_params, grads, ref_buffers, lr, momentum, weight_decay, eta, adapt)
    for p, ref in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.detach().cpu(), ref, rtol=1e-12, atol=1e-12)


def _train_on_gpu(out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = list(RUN)
    argv[argv.index("--gpus") + 1] = "1"
    result = subprocess.run([sys.executable, *argv, "--out", str(out), *extra], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.timeout(900)
def test_resume_on_cuda_matches_an_uninterrupted_run(tmp_path):
    _train_on_gpu(tmp_path / "straight")
    _train_on_gpu(tmp_path / "resumed", "--steps", "4")
    resumed = _train_on_gpu(tmp_path / "resumed", "--resume")
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    a, b = (tensors({k: final_state(tmp_path / run)[k] for k in ("online", "target", "optimizer")})
            for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def _gloo_rank_on_the_gpu(out: str) -> int:
    """One of two ranks sharing GPU 0 over gloo (NCCL refuses two ranks on one device)."""
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method=f"file://{os.environ[RENDEZVOUS_FILE]}", rank=rank, world_size=2)
    try:
        losses, state = trajectory(World(rank, 0, 2, torch.device("cuda", 0)))
    finally:
        dist.destroy_process_group()
    torch.save({"losses": losses, "state": state}, Path(out) / f"rank{rank}.pt")
    return 0


@pytest.mark.slow  # the acceptance's gpu-tests check starts it only while time is left
@pytest.mark.timeout(600)
def test_two_processes_on_one_gpu_follow_one_process(tmp_path):
    assert launch(_gloo_rank_on_the_gpu, str(tmp_path), world_size=2) == 0
    single_losses, single_state = trajectory(World(0, 0, 1, torch.device("cuda", 0)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["losses"] == ranks[1]["losses"] == pytest.approx(single_losses, rel=1e-4)
    for rank in ranks:
        for name, tensor in single_state.items():
            torch.testing.assert_close(rank["state"][name].cpu(), tensor.cpu(), rtol=1e-3, atol=1e-5, msg=name)
