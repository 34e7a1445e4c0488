"""`python -m benchmark.quickstart` shortened to a smoke run, as a user starts it (a separate process), once per
test session (tests/conftest.py's `quickstart_smoke`): test_quickstart.py checks its JSON and evaluates its
backbone, and test_quickstart_configs.py's FFCV case checks its train.py run, which is that test's command for
the config's own loader (FFCV) on the same flags, so the same run is not trained twice."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT = 200  # --eval-limit: the probe and kNN on 200 / 200 images
# The flags test_quickstart_configs.py gives train.py --config configs/fashion-mnist.toml for every loader.
SHORT_RUN = ("--steps", "3", "--batch-size", "16", "--log-every", "1", "--eval-limit", str(LIMIT), "--workers", "1")


@dataclass(frozen=True)
class QuickstartRun:
    proc: subprocess.CompletedProcess  # stdout: train.py's (the child inherits it), then the quickstart's own line
    run: Path  # the train.py run's --out
    result: Path  # the JSON the command writes (and its .png beside it)


def quickstart_smoke(tmp: Path) -> QuickstartRun:
    run, result = tmp / "run", tmp / "results" / "cpu-quickstart.json"
    proc = subprocess.run([sys.executable, "-m", "benchmark.quickstart", "--json", str(result), "--out", str(run),
                           "--", *SHORT_RUN], capture_output=True, text=True, timeout=580, cwd=REPO)
    return QuickstartRun(proc, run, result)
