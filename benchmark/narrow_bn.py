"""The quickstart's step with `models.backbones.NarrowBatchNorm2d` against plain nn.BatchNorm2d, in one run.

    python -m benchmark.narrow_bn                 # both precisions this CPU runs, ~2 minutes on 2 cores
    python -m benchmark.narrow_bn --steps 10 --repeats 1 --out /tmp/x.json    # a smoke run

The quickstart's model and step (configs/fashion-mnist.toml, built as train.py builds them) run on
synthetic channels_last views; the two batch norms alternate run by run (the same weights and
optimizer: only the layers' class differs), so machine noise falls on both. Prints and saves the median
steps/s of each and their ratio, with the machine, load average and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from benchmark.quickstart import CONFIG, RESULTS
from benchmark.timing import environment
from config import parse_config
from foundation.atomic_files import atomic_write
from models.backbones import NarrowBatchNorm2d
from models.step import ByolStep, step_precision, view_dtype
from runtime.assembly import build_model, build_step, seed_all

VARIANTS = {"narrow": NarrowBatchNorm2d, "plain": nn.BatchNorm2d}


def quickstart_step(precision: str) -> tuple[ByolStep, torch.Tensor, torch.Tensor]:
    """The quickstart's step in `precision` and one batch of synthetic views to replay."""
    cfg = parse_config(["--config", CONFIG, "--precision", precision]).resolved()
    cpu = torch.device("cpu")
    seed_all(cfg.seed)
    step = build_step(cfg, build_model(cfg, cpu), cpu)
    views = [torch.randn(cfg.batch_size, 3, cfg.res, cfg.res).to(view_dtype(precision, cpu),
                                                                  memory_format=torch.channels_last)
             for _ in range(2)]
    return step, *views


def use_batch_norm(model: nn.Module, variant: str) -> None:
    """Make every encoder batch norm of `model` the given class (the same parameters and buffers)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.__class__ = VARIANTS[variant]


def measure(precision: str, steps: int, repeats: int) -> dict:
    step, v1, v2 = quickstart_step(precision)
    runs: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for variant in VARIANTS:  # warm-up: first calls allocate and pick kernels
        use_batch_norm(step.byol, variant)
        for _ in range(3):
            step(v1, v2, 0.1, 0.99)
    for _ in range(repeats):
        for variant in VARIANTS:
            use_batch_norm(step.byol, variant)
            start = time.perf_counter()
            for _ in range(steps):
                step(v1, v2, 0.1, 0.99)
            runs[variant].append(steps / (time.perf_counter() - start))
    medians = {variant: statistics.median(rates) for variant, rates in runs.items()}
    return {"batch_size": v1.shape[0], "steps_per_run": steps,
            "steps_per_s": {variant: {"median": medians[variant], "runs": runs[variant]} for variant in VARIANTS},
            "narrow_over_plain": medians["narrow"] / medians["plain"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each batch norm, alternating")
    parser.add_argument("--out", type=Path, help="the JSON (default: benchmark/results/cpu-<date>-narrow-bn.json)")
    args = parser.parse_args(argv)
    cpu = torch.device("cpu")
    env = environment(cpu)
    precisions = sorted({step_precision(p, cpu) for p in ("bf16", "fp32")})
    result = {"what": "quickstart step (configs/fashion-mnist.toml) on synthetic views: NarrowBatchNorm2d "
                      "against nn.BatchNorm2d, alternating runs", "environment": env,
              "precisions": {p: measure(p, args.steps, args.repeats) for p in precisions}}
    result["load_average_after"] = list(os.getloadavg())
    for precision, figures in result["precisions"].items():
        rates = figures["steps_per_s"]
        print(f"{precision}: narrow {rates['narrow']['median']:.2f} steps/s, plain {rates['plain']['median']:.2f} "
              f"steps/s (medians of {args.repeats} x {args.steps}): x{figures['narrow_over_plain']:.3f}")
    out = args.out or RESULTS / f"cpu-{env['date'][:10]}-narrow-bn.json"
    atomic_write(out, (json.dumps(result, indent=1) + "\n").encode())
    print(f"load average {env['load_average']} before, {result['load_average_after']} after; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
