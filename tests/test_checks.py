"""benchmark/checks.py: the subprocess runner every check uses (a crash reported with its last line, a
hung child and its children killed at the timeout, a SIGTERM sent when a condition holds, the heartbeat
fed with the log's last line), the readers of pytest's and train.py's files, and the goal notes. The
checks themselves run in test_acceptance.py's quick runs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import benchmark.checks as checks
from benchmark.checks import goal_notes, junit_counts, run_logged, run_metrics
from benchmark.progress import Heartbeat


def test_junit_counts_and_run_metrics(tmp_path) -> None:
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/></testsuites>')
    assert junit_counts(xml) == {"tests": 5, "failures": 1, "errors": 0, "skipped": 2, "passed": 2}
    records = [{"step": s, "epoch": 0, "loss": 4.0 - s, "images_per_s": ips, "loader_wait": 0.1, "elapsed_s": s}
               for s, ips in ((1, 1.0), (2, 100.0), (3, 300.0), (4, 200.0))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "eval.json").write_text(json.dumps({"knn_top1": 0.5, "linear_top1": 0.6}))
    numbers = run_metrics(tmp_path)
    # The first window holds compilation and warm-up: left out of the median.
    assert numbers["images_per_s"] == 200.0 and numbers["steps"] == 4 and numbers["loss_last"] == 0.0
    assert numbers["linear_top1"] == 0.6
    assert run_metrics(tmp_path / "nothing") == {"steps": 0}


def test_run_logged_reports_a_crash_and_kills_a_hung_check(tmp_path) -> None:
    log = tmp_path / "check.log"
    crashed = run_logged([sys.executable, "-c", "print('working'); raise SystemExit('boom: the reason')"], log, 60)
    assert crashed.returncode == 1 and crashed.failure() == "exit code 1: boom: the reason"
    assert "working" in log.read_text()
    # The child starts a grandchild in its process group; a timeout must take both down.
    hang = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('grandchild', p.pid, flush=True); time.sleep(60)")
    hung = run_logged([sys.executable, "-c", hang], log, 1.5)  # a bare python starts both in well under 1 s
    assert hung.returncode is None and hung.failure().startswith("timed out after") and hung.seconds < 30
    grandchild = int(log.read_text().split("grandchild ")[1].split()[0])
    assert not _alive(grandchild)


def test_run_logged_sends_sigterm_once_its_condition_holds_and_shows_the_log(tmp_path) -> None:
    """As dali-train preempts train.py: the child counts, the condition watches its output, SIGTERM lands
    and the child's own handler decides the exit code (143, like train.py's)."""
    log = tmp_path / "dali-train.log"
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: (print('stopping', flush=True), sys.exit(143)))\n"
             "for i in range(600):\n    print('step', i, flush=True); time.sleep(0.05)\n")
    beat_out = io.StringIO()
    with Heartbeat("acceptance", interval=0.2, stream=beat_out) as beat:
        outcome = run_logged([sys.executable, "-c", child], log, 60, beat=beat,
                             signal_when=lambda: "step 5" in log.read_text())
    assert outcome.returncode == 143 and outcome.seconds < 20
    text = log.read_text()
    assert "stopping" in text and "step 599" not in text
    assert "acceptance: dali-train: step" in beat_out.getvalue()


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for init to reap it counts as gone)."""
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state == "Z":
            return False
        time.sleep(0.1)
    return True


def test_goal_notes_judge_the_recipe_not_the_machine() -> None:
    assert goal_notes({"linear_top1": 0.92, "random_init_linear_top1": 0.85}) == []
    below = goal_notes({"linear_top1": 0.88, "random_init_linear_top1": 0.85})
    assert len(below) == 2 and "below the 91% goal" in below[0] and "above random init" in below[1]


def test_the_gpu_tests_check_runs_pytest_in_one_process_with_or_without_xdist(tmp_path) -> None:
    options = checks.one_process_pytest()
    assert options[:2] == ("-p", "no:xdist") and options[2] == "-o" and "-n" not in options[3].split()
    assert "--strict-markers" in options[3]  # the rest of pyproject's addopts is kept
    (tmp_path / "pyproject.toml").write_text('[tool.pytest.ini_options]\naddopts = "-ra -n 4 --strict-markers"\n')
    assert checks.one_process_pytest(tmp_path / "pyproject.toml")[3] == "addopts=-ra --strict-markers"
    # xdist blocked as on a machine without it: pyproject's `-n 2` alone is a usage error, these options run.
    blocked = [sys.executable, "-m", "pytest", "-p", "no:xdist", "-q", "tests/test_checks.py", "-k", "junit_counts"]
    assert subprocess.run(blocked, cwd=checks.REPO, capture_output=True).returncode == 4
    result = subprocess.run([*blocked[:3], *options, *blocked[5:]], cwd=checks.REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr
