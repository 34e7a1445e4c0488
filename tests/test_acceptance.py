"""benchmark/acceptance.py: the runner on fake checks and a fake clock (a check the budget cannot hold is
never started, the summary is rewritten before each check and after a SIGTERM, a failing check does not
stop the next), the quick mode run as a user runs it (a separate process), the budgeted quick run that
must end within its time, and bad arguments."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from acceptance_runs import QuickRun, accept
from rich.console import Console

import benchmark.acceptance as acceptance
from benchmark import checks
from benchmark.acceptance import CHECKS, Check, main, parse_args
from benchmark.checks import CheckResult, Outcome
from benchmark.progress import Heartbeat
from benchmark.throughput import LOADERS, is_installed

CPU_FACTS = {"torch": {"cuda_available": False, "version": torch.__version__, "cuda": None}, "device": "cpu",
             "device_name": "test cpu", "git_commit": "abc", "versions": {}, "driver": {},
             "dali": {"wheels": {"nvidia-dali-cuda130": 13}, "matches_torch": None},
             "ffcv": {"importable": True}, "loaders": {"dali": True}, "nvjpeg_hw_decoder": {"present": None}}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fake_plan(monkeypatch, tmp_path, *plan: Check, budget: float | None, clock=None) -> tuple[int, dict, str]:
    """Run the acceptance runner in this process on `plan`, with canned environment facts."""
    monkeypatch.setattr(checks, "gather_facts", lambda log, timeout: (
        log.write_text("probe\n") and CPU_FACTS, Outcome(["probe"], 0, 0.1, [])))
    monkeypatch.setattr(acceptance, "photos_available", lambda: True)
    results = tmp_path / "results"
    args = parse_args(["--quick", "--results", str(results), "--cache", str(tmp_path)]
                      + ([] if budget is None else ["--budget", str(budget)]))
    console = Console(file=open(tmp_path / "console.txt", "w"), width=200)  # noqa: SIM115
    with acceptance.stop_on_signals(), Heartbeat("acceptance", stream=open(os.devnull, "w")) as beat:  # noqa: SIM115
        code = acceptance.run_plan(args, plan, console, beat, clock or time.monotonic)
    console.file.close()
    return code, json.loads((results / "summary.json").read_text()), (tmp_path / "console.txt").read_text()


def _check(name: str, run, needs: float = 1.0, takes: float = 100.0) -> Check:
    return Check(name, run, {"quick": needs, "full": needs}, {"quick": takes, "full": takes})


def test_a_check_the_budget_cannot_hold_is_not_started(monkeypatch, tmp_path) -> None:
    clock, started = FakeClock(), []

    def slow(ctx, seconds) -> CheckResult:
        started.append(("data", seconds))
        clock.now += 50  # took 50 of the 60 s
        return CheckResult("data", "pass")

    def never(ctx, seconds) -> CheckResult:
        started.append(("throughput", seconds))
        return CheckResult("throughput", "pass")

    def last(ctx, seconds) -> CheckResult:
        started.append(("fashion-mnist", seconds))
        return CheckResult("fashion-mnist", "pass")

    plan = (_check("data", slow, takes=200), _check("throughput", never, needs=20),
            _check("fashion-mnist", last, needs=5, takes=math.inf))
    code, summary, console = _fake_plan(monkeypatch, tmp_path, *plan, budget=60, clock=clock)
    # data may take what is left after keeping throughput's 20 s and fashion-mnist's 5 s of the 60.
    assert started[0][0] == "data" and started[0][1] == pytest.approx(35.0, abs=0.5)  # the probe's time counts
    assert [name for name, _ in started] == ["data", "fashion-mnist"] and started[1][1] == pytest.approx(10.0, abs=0.5)
    skipped = summary["checks"]["throughput"]
    assert skipped["verdict"] == "skipped"
    assert skipped["reason"].startswith("not started for time: needs 20 s, 10 s left")
    assert code == 0 and summary["passed"] is True and "skipped for time: throughput" in console


def test_summary_is_written_before_each_check_and_a_failure_does_not_stop_the_next(monkeypatch, tmp_path) -> None:
    seen = {}

    def boom(ctx, seconds) -> CheckResult:
        seen["data"] = list(json.loads((ctx.results / "summary.json").read_text())["checks"])
        raise RuntimeError("a bug in the check")

    def fine(ctx, seconds) -> CheckResult:
        seen["gpu-tests"] = json.loads((ctx.results / "summary.json").read_text())["checks"]
        return CheckResult("gpu-tests", "pass", headline="ok")

    code, summary, _ = _fake_plan(monkeypatch, tmp_path, _check("data", boom), _check("gpu-tests", fine), budget=None)
    assert seen["data"] == ["environment"]
    assert seen["gpu-tests"]["data"]["verdict"] == "fail"  # written before the next check started
    assert summary["checks"]["data"]["reason"] == "RuntimeError: a bug in the check"
    assert summary["checks"]["gpu-tests"]["verdict"] == "pass" and code == 1 and summary["passed"] is False
    table = (tmp_path / "results" / "summary.md").read_text()
    assert "| data | fail |" in table and "| gpu-tests | pass |" in table


def test_sigterm_during_a_check_keeps_the_finished_ones_in_the_summary(monkeypatch, tmp_path) -> None:
    ran = []

    def finished(ctx, seconds) -> CheckResult:
        return CheckResult("data", "pass", headline="48 photos")

    def terminated(ctx, seconds) -> CheckResult:
        os.kill(os.getpid(), signal.SIGTERM)  # a job's time limit
        time.sleep(5)
        return CheckResult("throughput", "pass")

    def after(ctx, seconds) -> CheckResult:
        ran.append("dali-train")
        return CheckResult("dali-train", "pass")

    code, summary, _ = _fake_plan(monkeypatch, tmp_path, _check("data", finished), _check("throughput", terminated),
                                  _check("dali-train", after), budget=None)
    assert list(summary["checks"]) == ["environment", "data", "throughput"] and not ran
    assert summary["checks"]["data"]["headline"] == "48 photos"
    assert summary["checks"]["throughput"]["verdict"] == "fail" and "interrupted" in summary["checks"]["throughput"][
        "reason"]
    assert code == 1


@pytest.fixture(scope="module")
def quick(acceptance_quick: QuickRun) -> tuple[subprocess.CompletedProcess, Path, dict, Path]:
    """Every check in quick mode, no budget, on the session's 64-photo corpus (converted by the data check):
    the session's one run (tests/acceptance_runs.py)."""
    run = acceptance_quick
    return run.proc, run.results, run.summary, run.cache


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_run_passes_every_check_and_writes_the_summary(quick) -> None:
    proc, results, summary, _ = quick
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert list(summary["checks"]) == list(CHECKS)
    assert summary["mode"] == "quick" and summary["passed"] is True
    for name, check in summary["checks"].items():
        assert check["verdict"] in ("pass", "skipped"), (name, check["reason"], check["log_tail"])
        assert check["seconds"] > 0 and check["mode"] == "quick", name
        assert (results / check["log"]).is_file(), name
        assert name in proc.stdout  # the verdict line and the table row
    gpu = summary["checks"]["gpu-tests"]
    if not torch.cuda.is_available():
        assert gpu["verdict"] == "skipped" and "no CUDA device" in gpu["reason"]
        assert gpu["numbers"]["tests"] == gpu["numbers"]["skipped"] > 0
    table = (results / "summary.md").read_text()
    for name, check in summary["checks"].items():
        assert f"| {name} | {check['verdict']} |" in table
    env = summary["checks"]["environment"]["numbers"]
    assert env["torch"]["version"] == torch.__version__ == summary["versions"]["torch"]
    assert summary["git_commit"] and summary["git_commit"] != "unknown"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_numbers_and_files(quick) -> None:
    _, results, summary, _ = quick
    throughput = summary["checks"]["throughput"]["numbers"]
    written = json.loads((results / "throughput.json").read_text())
    assert written["complete"] is True and throughput["complete"] is True
    for name in LOADERS:  # every loader and baseline the benchmark times (the synthetic feeder has no figure)
        if is_installed(name):
            assert throughput["loader_images_per_s"][name] == written["sections"]["loader"][name]["images_per_s"] > 0
    dali = summary["checks"]["dali-train"]["numbers"]
    # Preempted after step 3 (or a step or two later: the signal lands between steps), saved, exit 143,
    # then resumed from exactly that checkpoint to the last step.
    assert dali["stop_exit_code"] == 143 and 3 <= dali["stopped_at"] < checks.MODES["quick"].train_steps
    assert dali["resumed_at"] == dali["stopped_at"] and dali["steps"] == checks.MODES["quick"].train_steps
    assert math.isfinite(dali["loss_last"]) and (results / "dali-train" / "metrics.jsonl").is_file()
    assert summary["checks"]["data"]["numbers"]["beton"].endswith(".beton")
    fmnist = summary["checks"]["fashion-mnist"]
    if fmnist["verdict"] == "pass":
        assert fmnist["numbers"]["steps"] == 3 and (results / "fashion-mnist" / "eval.json").is_file()
        assert 0 < fmnist["numbers"]["knn_top1"] <= 1 and 0 < fmnist["numbers"]["linear_top1"] <= 1
        assert "random_init_linear_top1" in fmnist["numbers"]  # the baseline measured in the same run
        assert "--time-limit" in fmnist["command"] and "fashion-mnist-gpu.toml" in " ".join(fmnist["command"])
    # Checkpoints and backbones stay in the scratch folder: the results folder is small enough to commit.
    assert not list(results.rglob("*.pt"))


BUDGET_S = 60
# The quick checks' `needs` add up to more than the budget, so the run must skip some for time (the data check
# at least: its own needs plus every later check's are above 60 s) and run the last one with what is left.
assert sum(check.needs["quick"] for check in acceptance.PLAN) > BUDGET_S > acceptance.PLAN[-1].needs["quick"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_run_with_a_60_s_budget_ends_within_90_s_and_names_what_it_skipped(quick, photo_corpus,
                                                                                    tmp_path) -> None:
    _, _, _, cache = quick  # the corpus's .beton is converted already, as on a second run
    results = tmp_path / "results"
    start = time.monotonic()
    proc = accept("--budget", str(BUDGET_S), "--corpus", photo_corpus, "--cache", str(cache), "--results",
                  str(results), timeout=300)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert seconds <= BUDGET_S + 30, seconds
    summary = json.loads((results / "summary.json").read_text())
    assert list(summary["checks"]) == list(CHECKS) and summary["runs"][-1]["budget_s"] == BUDGET_S
    skipped = [n for n, c in summary["checks"].items() if c["reason"].startswith("not started for time")]
    for name, check in summary["checks"].items():
        assert check["verdict"] in ("pass", "skipped"), (name, check["reason"])
    assert "data" in skipped and "fashion-mnist" not in skipped, skipped  # the last check runs in what is left
    assert "skipped for time: " + ", ".join(skipped) in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--corpus", "/nonexistent/corpus"], "--corpus /nonexistent/corpus:"),
    (["--checks", "dali-train,warp-drive"], "unknown check(s) warp-drive"),
    (["--checks", "dali-train", "--beton", "/nonexistent.beton", "--corpus", "TINY"], "--beton /nonexistent.beton"),
    (["--budget", "0"], "--budget must be above 0"),
])
def test_bad_arguments_give_one_line_before_any_check(args, message, tmp_path, capsys) -> None:
    args = [str(_tiny_corpus(tmp_path / "corpus")) if a == "TINY" else a for a in args]
    assert main(["--quick", "--cache", str(tmp_path), "--results", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def _tiny_corpus(root: Path) -> Path:
    from PIL import Image

    (root / "class_000").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "class_000" / "a.JPEG")
    return root


def test_no_photos_and_no_corpus_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(acceptance, "photos_available", lambda: False)
    monkeypatch.delenv(acceptance.CORPUS_ENV, raising=False)
    assert main(["--quick", "--checks", "dali-train", "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no corpus: give --corpus" in err and len(err.splitlines()) == 1, err
