"""CPU side-by-side: DALI-CPU two-view loader vs the torchvision baseline, images/s (an image = two views).

    python -m benchmark.make_corpus --out /tmp/corpus2k --images 1000 --classes 10
    python -m benchmark.loaders_cpu --data /tmp/corpus2k [--cores 2 --res 224 --batch 64]

Both loaders run the full recipe on the same corpus and core budget, one after the other. Warm-up
batches are excluded; the figure is the median over repetitions. Writes a table to stdout and JSON to
benchmark/results/cpu-<date>-loaders.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import sys
from pathlib import Path

import torch

from benchmark import timing
from benchmark.report import write_json
from benchmark.timing import cpu_model, endless, git_commit, versions
from pipelines.base import LoaderConfig, TwoViewLoader
from pipelines.registry import build_loader
from pipelines.views import BYOL_VIEWS

RESULTS = Path(__file__).parent / "results"


def measure_loader(loader: TwoViewLoader, warmup_batches: int, batches: int, repeats: int) -> dict:
    """Images/s over `repeats` timed runs of `batches` batches each, after `warmup_batches` untimed ones.

    The stream continues across runs (no restart), so every run sees a warm pipeline.
    """
    rate = timing.measure_loader(endless(loader), warmup_batches, batches, repeats, torch.device("cpu"))
    return {"images_per_s": rate.median, "runs_images_per_s": list(rate.runs),
            "warmup_batches": warmup_batches, "batches_per_run": batches, "repeats": repeats}


def pin_cores(count: int) -> list[int]:
    """Pin this process to its first `count` cores (inherited by loader threads and DataLoader
    workers) and give torch as many threads; return the cores."""
    cores = sorted(os.sched_getaffinity(0))[:count]
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    return cores


def save_cpu_report(kind: str, cores: list[int], load_before: float, setup: dict, figures: dict,
                    out: Path | None) -> Path:
    """Write date, commit, versions and the CPU used, then `setup` and `figures`, to `out` (default
    benchmark/results/cpu-<date>-<kind>.json)."""
    now = dt.datetime.now(dt.UTC)
    report = {
        "date": now.isoformat(timespec="seconds"), "git_commit": git_commit(), "versions": versions(),
        "device": {"kind": "cpu", "model": cpu_model(), "cores_used": len(cores),
                   "cores_available": os.cpu_count(),
                   # Other processes on the machine skew the figures; the 1-minute load shows how much.
                   "loadavg_1min_before_after": [load_before, os.getloadavg()[0]]},
        "setup": setup,
        **figures,
    }
    out = out or RESULTS / f"cpu-{now:%Y%m%d}-{kind}.json"
    write_json(report, out)
    print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="ImageFolder root (see benchmark.make_corpus)")
    parser.add_argument("--loaders", nargs="+", default=["dali", "torchvision"])
    parser.add_argument("--cores", type=int, default=2, help="pin the run (and its workers) to this many cores")
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches per loader")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmark/results/cpu-<date>-loaders.json)")
    args = parser.parse_args(argv)

    cores = pin_cores(args.cores)
    recipe = BYOL_VIEWS.with_overrides(res=args.res)
    load_before = os.getloadavg()[0]
    results = {}
    for name in args.loaders:
        cfg = LoaderConfig(data=args.data, batch_size=args.batch, recipe=recipe, workers=len(cores))
        loader = build_loader(name, cfg)
        results[name] = measure_loader(loader, args.warmup, args.batches, args.repeats)
        del loader  # stop its threads/workers before the next loader runs
        gc.collect()

    baseline = results.get("torchvision", {}).get("images_per_s")
    print(f"{'loader':<14}{'images/s':>10}{'x torchvision':>15}   runs")
    for name, result in results.items():
        speedup = f"{result['images_per_s'] / baseline:.2f}" if baseline else "-"
        runs = ", ".join(f"{rate:.0f}" for rate in result["runs_images_per_s"])
        print(f"{name:<14}{result['images_per_s']:>10.1f}{speedup:>15}   {runs}")

    save_cpu_report("loaders", cores, load_before,
                    {"data": str(Path(args.data).resolve()), "res": args.res, "batch_size": args.batch,
                     "recipe": "BYOL_VIEWS (full)", "image": "one decode, two views"},
                    {"results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
