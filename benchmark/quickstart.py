"""Re-measure the README's main command: the quickstart table's JSON, in one command.

    .venv/bin/python -m benchmark.quickstart        # ~9 minutes on 2 CPU cores

runs `train.py --config configs/fashion-mnist.toml` into a fresh --out with an empty dataset cache (so the
.beton build is timed too, as a new user meets it) and writes benchmark/results/<device>-<date>-quickstart.json
(wall time, training time, images/s, kNN per epoch, the run's eval.json, load average before and after,
commit, machine; the previous measurement's headline beside it) and the run's metrics.png as the .png.
Flags after `--` go to train.py (e.g. `-- --steps 3 --eval-limit 200` for a smoke run; its JSON says so).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from foundation.atomic_files import atomic_write
from models.step import cpu_has_native_bf16

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/fashion-mnist.toml"
RESULTS = REPO / "benchmark" / "results"
# The throughput after the first log points: warm-up (first batches, the .beton's page cache) is left out.
STEADY_AFTER_STEP = 20


def git_commit() -> str:
    """The short commit, '+changes' when tracked files differ from it (the figures are then not the commit's)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + ("+changes" if dirty else "")


def machine() -> tuple[str, str]:
    """(the device name used in file names, a description of the machine)."""
    cores = len(os.sched_getaffinity(0))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return name.split()[-1].lower(), f"{name}, {cores} cores, {memory:.0f} GiB"
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    bf16 = "native bf16: the step runs bf16" if cpu_has_native_bf16() else "no native bf16: the step runs fp32"
    return "cpu", f"{cores} cores of {model} ({bf16}), {memory:.0f} GiB, no GPU"


def previous(json_path: Path) -> dict[str, Any] | None:
    """The headline of the newest other quickstart measurement in the results folder."""
    others = sorted((p for p in json_path.parent.glob("*-quickstart.json") if p != json_path),
                    key=lambda p: json.loads(p.read_text()).get("date", ""))
    if not others:
        return None
    last = json.loads(others[-1].read_text())
    return {"file": others[-1].name, "date": last.get("date"), "commit": last.get("commit"),
            "wall_s": last.get("wall_s"), "knn_top1": last.get("eval", {}).get("knn_top1"),
            "linear_top1": last.get("eval", {}).get("linear_top1")}


def summarize(out: Path) -> dict[str, Any]:
    """What the run left in `out`: its training time, steady images/s, kNN per epoch and eval.json."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r["images_per_s"] for r in records if r["step"] > STEADY_AFTER_STEP] or \
        [r["images_per_s"] for r in records]
    return {"training_elapsed_s": round(records[-1]["elapsed_s"], 1),
            f"median_images_per_s_after_step_{STEADY_AFTER_STEP}": round(statistics.median(steady), 1),
            "knn_top1_per_epoch": [r["knn_top1"] for r in records if "knn_top1" in r],
            "eval": json.loads((out / "eval.json").read_text())}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m benchmark.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="where the result goes (default: "
                        "benchmark/results/<device>-<date>-quickstart.json)")
    parser.add_argument("--out", type=Path, help="keep the run's folder here (default: a temporary one, removed)")
    parser.add_argument("--cache", type=Path, help="the dataset cache to use (default: a new empty one, so the "
                        "first run's .beton build is timed)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    return parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv), extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    device, description = machine()
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    json_path = args.json or RESULTS / f"{device}-{date}-quickstart.json"
    work = Path(tempfile.mkdtemp(prefix="fastbyol-quickstart-"))
    out, cache = args.out or work / "run", args.cache or work / "cache"
    command = [sys.executable, "train.py", "--config", CONFIG, "--out", str(out), *extra]
    shown = " ".join(["FASTBYOL_CACHE=<empty folder>" if args.cache is None else f"FASTBYOL_CACHE={cache}",
                      ".venv/bin/python train.py --config", CONFIG, *extra])
    load_before, commit = os.getloadavg(), git_commit()
    start = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "FASTBYOL_CACHE": str(cache)})
    wall = time.monotonic() - start
    if result.returncode != 0:
        print(f"benchmark.quickstart: error: the run exited with {result.returncode}; its files are in {out}",
              file=sys.stderr)
        return 1
    report = {"what": "README main command (configs/fashion-mnist.toml) from an empty dataset cache, the .beton "
                      "build included" + (f"; with {' '.join(extra)} (not the README's figure)" if extra else ""),
              "command": shown, "machine": description, "date": date, "commit": commit,
              "wall_s": round(wall, 1), **summarize(out),
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()],
              "previous_measurement": previous(json_path)}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(json_path, (json.dumps(report, indent=1) + "\n").encode())
    if (out / "metrics.png").exists():
        shutil.copyfile(out / "metrics.png", json_path.with_suffix(".png"))
    shutil.rmtree(work)
    print(f"wrote {json_path}: {wall / 60:.1f} minutes wall, kNN {100 * report['eval']['knn_top1']:.1f}%, "
          f"linear {100 * report['eval']['linear_top1']:.1f}% (commit {commit})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
