"""benchmark/narrow_bn.py: the quickstart step timed with NarrowBatchNorm2d against nn.BatchNorm2d."""

from __future__ import annotations

import json

import torch
import torch.nn as nn

from benchmark.narrow_bn import main, quickstart_step, use_batch_norm
from models.backbones import NarrowBatchNorm2d


def test_both_variants_run_the_same_step_on_the_same_weights():
    step, v1, v2 = quickstart_step("fp32")
    norms = [m for m in step.byol.modules() if isinstance(m, nn.BatchNorm2d)]
    state = {k: v.clone() for k, v in step.byol.state_dict().items()}
    losses = {}
    for variant in ("plain", "narrow"):
        step.byol.load_state_dict(state)
        use_batch_norm(step.byol, variant)
        assert all(isinstance(m, NarrowBatchNorm2d) == (variant == "narrow") for m in norms)
        with torch.no_grad():
            losses[variant] = step.byol(v1, v2)
    torch.testing.assert_close(losses["narrow"], losses["plain"])


def test_a_smoke_run_writes_both_precisions_ratio(tmp_path, capsys):
    out = tmp_path / "narrow.json"
    assert main(["--steps", "1", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["environment"]["git_commit"] and result["load_average_after"]
    for figures in result["precisions"].values():
        rates = figures["steps_per_s"]
        assert figures["narrow_over_plain"] == rates["narrow"]["median"] / rates["plain"]["median"] > 0
    assert "steps/s" in capsys.readouterr().out
