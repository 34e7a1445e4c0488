"""The whole BYOL step (models/step.py): compiled on CPU it learns; compiled and eager agree; no host sync on
CUDA; the precision it runs in on each device."""

from __future__ import annotations

import pytest
import torch
from step_inputs import fixed_views, make_step

import models.step
from models.step import step_precision, view_dtype


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_step_decreases_loss_and_matches_eager():
    v1, v2 = fixed_views()
    compiled, eager = make_step(compile=True), make_step(compile=False)
    losses_c = [compiled(v1, v2, lr=1.0, tau=0.99).item() for _ in range(15)]
    losses_e = [eager(v1, v2, lr=1.0, tau=0.99).item() for _ in range(3)]
    assert losses_c[-1] < 0.7 * losses_c[0], losses_c
    # Same initial weights, same math: the first steps agree to float32 reassociation noise.
    torch.testing.assert_close(torch.tensor(losses_c[:3]), torch.tensor(losses_e), rtol=1e-3, atol=1e-4)


def test_eager_step_updates_online_and_ema_target():
    v1, v2 = fixed_views()
    step = make_step(compile=False)
    target_before = [t.clone() for t in step.byol.target.parameters()]
    online_before = [p.clone() for p in step.byol.online.parameters()]
    loss = step(v1, v2, lr=0.5, tau=0.9)
    assert loss.requires_grad is False and loss.ndim == 0
    assert step.optimizer.param_groups[0]["lr"].item() == pytest.approx(0.5)
    online_after = dict(step.byol.online.named_parameters())
    # target <- 0.9 target + 0.1 online (online already stepped)
    for (name, _), before in zip(step.byol.online.encoder.named_parameters(), target_before, strict=False):
        now = dict(step.byol.target[0].named_parameters())[name]
        torch.testing.assert_close(now, 0.9 * before + 0.1 * online_after["encoder." + name].detach())
    assert any(not torch.equal(a, b) for a, b in zip(online_before, step.byol.online.parameters(), strict=True))


def test_rejects_unknown_precision():
    with pytest.raises(ValueError, match="--precision"):
        make_step(compile=False, precision="int8")


@pytest.mark.gpu
def test_cuda_step_has_no_host_sync():
    v1, v2 = fixed_views(device="cuda")
    step = make_step(compile=False, device="cuda", precision="bf16")
    step(v1, v2, lr=0.1, tau=0.99)  # first step allocates optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(v1, v2, lr=0.1, tau=0.99)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_cpu_precision_follows_native_bf16_support(monkeypatch, native_bf16):
    monkeypatch.setattr(models.step, "cpu_has_native_bf16", lambda: native_bf16)
    cpu = torch.device("cpu")
    for asked in ("bf16", "fp16", "fp32"):
        expected = "bf16" if asked == "bf16" and native_bf16 else "fp32"
        assert step_precision(asked, cpu) == expected
        assert view_dtype(asked, cpu) == (torch.bfloat16 if expected == "bf16" else torch.float32)
    assert step_precision("fp16", torch.device("cuda")) == "fp16"
