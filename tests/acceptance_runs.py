"""`python -m benchmark.acceptance --quick` as a user runs it (a separate process), and its one unbudgeted run
per test session (tests/conftest.py's `acceptance_quick`): test_acceptance.py checks its summary, and on a
machine without CUDA test_benchmark.py reads its throughput check's files, which are exactly those of
`benchmark/throughput.py --quick` on the same corpus (the check runs that command), instead of timing
everything a second time."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def accept(*args: str, timeout: float = 840) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmark.acceptance", "--quick", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@dataclass(frozen=True)
class QuickRun:
    proc: subprocess.CompletedProcess
    results: Path  # summary.json, summary.md, throughput.json / .png, logs/, each training run's files
    summary: dict  # {} if the run wrote none
    cache: Path  # the corpus's .beton (converted by the data check) and the training runs' scratch folders


def quick_run(corpus: str, tmp: Path) -> QuickRun:
    """Every check in quick mode, no budget, on `corpus`."""
    results = tmp / "results"
    proc = accept("--corpus", corpus, "--cache", str(tmp / "cache"), "--results", str(results))
    summary = json.loads((results / "summary.json").read_text()) if (results / "summary.json").is_file() else {}
    return QuickRun(proc, results, summary, tmp / "cache")
