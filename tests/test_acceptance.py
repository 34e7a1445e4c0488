"""benchmark/acceptance.py: the quick mode run as a user runs it (a separate process) on this machine,
a failing check that does not stop the next one (into the same results folder: part 2 after part 1),
bad arguments, and the verdict rules for facts only a GPU machine has."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch

import benchmark.acceptance as acceptance
from benchmark.acceptance import CHECKS, goal_notes, judge_environment, junit_counts, main, run_logged, run_metrics
from benchmark.throughput import LOADERS, is_installed
from pipelines.registry import LOADER_MODULES, is_available

REPO = Path(__file__).resolve().parents[1]


def _accept(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmark.acceptance", "--quick", *args],
                          capture_output=True, text=True, timeout=840, cwd=REPO)


@pytest.fixture(scope="module")
def quick(photo_corpus: str, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, dict]:
    """Every check in quick mode on the session's 64-photo corpus; the .beton is converted by the data check."""
    tmp = tmp_path_factory.mktemp("acceptance")
    results = tmp / "results"
    proc = _accept("--corpus", photo_corpus, "--cache", str(tmp / "cache"), "--results", str(results))
    summary = json.loads((results / "summary.json").read_text()) if (results / "summary.json").is_file() else {}
    return proc, results, summary


def _check(summary: dict, name: str) -> dict:
    return summary["checks"][name]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_run_passes_every_check_and_writes_the_summary(quick) -> None:
    proc, results, summary = quick
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert list(summary["checks"]) == list(CHECKS)
    assert summary["mode"] == "quick" and summary["passed"] is True
    for name, check in summary["checks"].items():
        assert check["verdict"] in ("pass", "skipped"), (name, check["reason"], check["log_tail"])
        assert check["seconds"] > 0 and check["mode"] == "quick", name
        assert (results / check["log"]).is_file(), name
        assert name in proc.stdout  # the verdict line and the table row
    gpu = _check(summary, "gpu-tests")
    if not torch.cuda.is_available():
        assert gpu["verdict"] == "skipped" and "no CUDA device" in gpu["reason"]
        assert gpu["numbers"]["tests"] == gpu["numbers"]["skipped"] > 0
    table = (results / "summary.md").read_text()
    for name, check in summary["checks"].items():
        assert f"| {name} | {check['verdict']} |" in table


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_environment_facts_are_this_machines(quick) -> None:
    _, _, summary = quick
    env = _check(summary, "environment")["numbers"]
    assert env["torch"]["version"] == torch.__version__ == summary["versions"]["torch"]
    assert env["torch"]["cuda"] == torch.version.cuda
    assert env["torch"]["cuda_available"] == torch.cuda.is_available()
    assert summary["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    wheels = {d.metadata["Name"].lower() for d in metadata.distributions()
              if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")}
    assert set(env["dali"]["wheels"]) == wheels
    if wheels and torch.version.cuda:
        assert env["dali"]["matches_torch"] == all(f"cuda{torch.version.cuda.split('.')[0]}" in w for w in wheels)
    if is_available("dali"):
        import nvidia.dali

        assert env["dali"]["version"] == nvidia.dali.__version__
    assert env["loaders"] == {name: is_available(name) for name in LOADER_MODULES}
    assert env["ffcv"]["importable"] == is_available("ffcv")
    assert summary["git_commit"] and summary["git_commit"] != "unknown"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_numbers_and_files(quick) -> None:
    _, results, summary = quick
    throughput = _check(summary, "throughput")["numbers"]
    written = json.loads((results / "throughput.json").read_text())
    assert (results / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in LOADERS:  # every loader and baseline the benchmark times (the synthetic feeder has no figure)
        if is_installed(name):
            assert throughput["loader_images_per_s"][name] == written["sections"]["loader"][name]["images_per_s"] > 0
    for name in ("dali-train", "ffcv-train"):
        numbers = _check(summary, name)["numbers"]
        assert numbers["steps"] == acceptance.MODES["quick"].train_steps and numbers["images_per_s"] > 0, name
        assert math.isfinite(numbers["loss_last"]) and (results / name / "metrics.jsonl").is_file(), name
    assert _check(summary, "data")["numbers"]["beton"].endswith(".beton")
    fmnist = _check(summary, "fashion-mnist")
    if fmnist["verdict"] == "pass":
        assert fmnist["numbers"]["steps"] == 3 and (results / "fashion-mnist" / "eval.json").is_file()
        assert 0 < fmnist["numbers"]["knn_top1"] <= 1 and 0 < fmnist["numbers"]["linear_top1"] <= 1
        assert "random_init_linear_top1" in fmnist["numbers"]  # the baseline measured in the same run
        assert "--config" in fmnist["command"] and "fashion-mnist-gpu.toml" in " ".join(fmnist["command"])
    # Checkpoints and backbones stay in the scratch folder: the results folder is small enough to commit.
    assert not list(results.rglob("*.pt"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_failing_check_is_reported_and_the_next_check_still_runs(quick, photo_corpus, tmp_path) -> None:
    """A .beton that exists but is not one: ffcv-train fails with train.py's own message, dali-train
    (the check after it) still runs, and the first run's checks stay in the folder's summary."""
    _, first, _ = quick
    results = tmp_path / "results"
    shutil.copytree(first, results)
    bad = tmp_path / "bad.beton"
    bad.write_bytes(b"not a beton" * 1000)
    proc = _accept("--checks", "dali-train,ffcv-train", "--corpus", photo_corpus, "--beton", str(bad),
                   "--cache", str(tmp_path / "cache"), "--results", str(results))
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((results / "summary.json").read_text())
    failed = _check(summary, "ffcv-train")
    assert failed["verdict"] == "fail" and "exit code 2" in failed["reason"] and str(bad) in failed["reason"]
    assert failed["log_tail"] and str(bad) in (results / failed["log"]).read_text()
    assert _check(summary, "dali-train")["verdict"] == "pass"
    assert summary["runs"][-1]["checks"] == ["environment", "data", "ffcv-train", "dali-train"]
    assert len(summary["runs"]) == 2 and summary["passed"] is False
    assert _check(summary, "throughput")["verdict"] == "pass"  # kept from the first run
    assert "(earlier)" in proc.stdout


def _tiny_corpus(root: Path) -> Path:
    from PIL import Image

    (root / "class_000").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "class_000" / "a.JPEG")
    return root


@pytest.mark.parametrize(("args", "message"), [
    (["--corpus", "/nonexistent/corpus"], "--corpus /nonexistent/corpus:"),
    (["--checks", "ffcv-train,warp-drive"], "unknown check(s) warp-drive"),
    (["--checks", "ffcv-train", "--beton", "/nonexistent.beton", "--corpus", "TINY"], "--beton /nonexistent.beton"),
])
def test_bad_arguments_give_one_line_before_any_check(args, message, tmp_path, capsys) -> None:
    args = [str(_tiny_corpus(tmp_path / "corpus")) if a == "TINY" else a for a in args]
    assert main(["--quick", "--cache", str(tmp_path), "--results", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_no_photos_and_no_corpus_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    def no_photos():
        raise SystemExit("make_corpus: no photographs under /usr/share/backgrounds")

    monkeypatch.setattr(acceptance, "find_photos", no_photos)
    assert main(["--quick", "--checks", "dali-train", "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no corpus: give --corpus" in err and len(err.splitlines()) == 1, err


def _facts(**changes) -> dict:
    facts = {
        "torch": {"version": "2.9.0+cu130", "cuda": "13.0", "cuda_available": True},
        "driver": {"cuda_driver_api": "13.0"},
        "dali": {"wheels": {"nvidia-dali-cuda130": 13}, "version": "2.4.0", "matches_torch": True},
        "ffcv": {"importable": True, "version": "1.0.2"},
        "loaders": {"dali": True, "ffcv": True, "torchvision": True, "synthetic": True},
        "nvjpeg_hw_decoder": {"present": True},
        "dali_mixed_decode": {"ok": True},
    }
    for key, value in changes.items():
        facts[key] = {**facts[key], **value}
    return facts


@pytest.mark.parametrize(("changes", "quick", "problem", "note"), [
    ({}, False, None, None),
    ({"nvjpeg_hw_decoder": {"present": False}}, False, None, "no nvJPEG hardware decoder"),
    ({"dali": {"wheels": {"nvidia-dali-cuda120": 12}, "matches_torch": False}}, False, "does not match", None),
    ({"dali": {"wheels": {"nvidia-dali-cuda120": 12, "nvidia-dali-cuda130": 13}}}, False, "several DALI", None),
    ({"driver": {"cuda_driver_api": "12.8"}}, False, "the driver supports CUDA 12.8", None),
    ({"ffcv": {"importable": False, "error": "ImportError: x"}}, False, "ffcv is not importable", None),
    ({"dali_mixed_decode": {"ok": False, "error": "boom"}}, False, "mixed (nvJPEG) decode failed", None),
    ({"torch": {"cuda_available": False}}, False, "no CUDA device", None),
    ({"torch": {"cuda_available": False}}, True, None, "no CUDA device"),
])
def test_environment_verdict_rules(changes, quick, problem, note) -> None:
    problems, notes = judge_environment(_facts(**changes), quick)
    assert (problem is None and not problems) or any(problem in p for p in problems), problems
    assert note is None or any(note in n for n in notes), notes


def test_junit_counts_and_run_metrics(tmp_path) -> None:
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/></testsuites>')
    assert junit_counts(xml) == {"tests": 5, "failures": 1, "errors": 0, "skipped": 2, "passed": 2}
    records = [{"step": s, "loss": 4.0 - s, "images_per_s": ips, "loader_wait": 0.1, "elapsed_s": s}
               for s, ips in ((1, 1.0), (2, 100.0), (3, 300.0), (4, 200.0))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "eval.json").write_text(json.dumps({"knn_top1": 0.5, "linear_top1": 0.6}))
    numbers = run_metrics(tmp_path)
    # The first window holds compilation and warm-up: left out of the median.
    assert numbers["images_per_s"] == 200.0 and numbers["steps"] == 4 and numbers["loss_last"] == 0.0
    assert numbers["linear_top1"] == 0.6


def test_run_logged_reports_a_crash_and_kills_a_hung_check(tmp_path) -> None:
    log = tmp_path / "check.log"
    crashed = run_logged([sys.executable, "-c", "print('working'); raise SystemExit('boom: the reason')"], log, 60)
    assert crashed.returncode == 1 and crashed.failure() == "exit code 1: boom: the reason"
    assert "working" in log.read_text()
    # The child starts a grandchild in its process group; a timeout must take both down.
    hang = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('grandchild', p.pid, flush=True); time.sleep(60)")
    hung = run_logged([sys.executable, "-c", hang], log, 3)
    assert hung.returncode is None and hung.failure().startswith("timed out after") and hung.seconds < 30
    grandchild = int(log.read_text().split("grandchild ")[1].split()[0])
    assert not _alive(grandchild)


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
