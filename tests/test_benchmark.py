"""benchmark/throughput.py: the --quick run's JSON (keys, positive numbers, verdicts that follow from
the numbers), the timing helpers against hand counts, and bad input."""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import benchmark.throughput as throughput
from benchmark.ffcv_variants import VARIANTS
from benchmark.throughput import LOADERS, SECTIONS, is_installed, main, verdicts
from benchmark.timing import Rate, measure_stream
from pipelines.registry import is_available

REPO = Path(__file__).resolve().parents[1]
TOP_KEYS = {"schema_version", "complete", "environment", "setup", "sections", "ceiling", "verdict", "baseline",
            "speedup_vs_baseline", "best_loader", "lars_agreement", "ffcv_costs", "skipped"}
RATE_KEYS = {"images_per_s", "min", "max", "spread_pct", "runs", "seconds", "units", "warmup", "warmup_seconds",
             "per_run", "min_seconds", "unit"}
ENV_KEYS = {"date", "device", "device_name", "cpu_model", "cpu_cores_used", "cpu_count", "torch_threads",
            "load_average", "load_average_end", "hostname", "versions", "git_commit"}
VERDICT_KEYS = {"bound", "loader_images_per_s", "step_images_per_s", "loader_over_step", "end_to_end_images_per_s",
                "end_to_end_pct_of_step", "above_ceiling", "loader_pct_of_decode"}


@pytest.fixture(scope="module")
def quick(photo_corpus: str, tmp_path_factory, request) -> tuple[dict, Path]:
    """One `python benchmark/throughput.py --quick` run, as a user starts it (a separate process). Without CUDA
    it is the session's acceptance run's throughput check, which runs that very command on the same corpus
    (tests/acceptance_runs.py); a check that did not pass cleanly is run again here, to show its error."""
    if not torch.cuda.is_available():
        run = request.getfixturevalue("acceptance_quick")
        check = run.summary.get("checks", {}).get("throughput", {})
        out = run.results / "throughput"
        if check.get("verdict") == "pass" and not check.get("reason") and out.with_suffix(".json").is_file():
            assert "benchmark/throughput.py --quick --corpus " + photo_corpus in " ".join(check["command"])
            return json.loads(out.with_suffix(".json").read_text()), out
    tmp = tmp_path_factory.mktemp("throughput")
    out = tmp / "result"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmark" / "throughput.py"), "--quick", "--device", "cpu",
         "--corpus", photo_corpus, "--cache", str(tmp / "cache"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.with_suffix(".json").read_text()), out


def _rates(result: dict):
    for section in SECTIONS:
        for name, rate in result["sections"][section].items():
            yield section, name, rate


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_quick_json_has_the_documented_keys(quick) -> None:
    result, _ = quick
    assert set(result) == TOP_KEYS
    assert set(result["environment"]) == ENV_KEYS
    assert set(result["sections"]) == set(SECTIONS)
    assert result["setup"]["quick"] is True and result["setup"]["res"] == 32
    assert result["complete"] is True and result["setup"]["budget_s"] is None
    assert result["environment"]["device"] == "cpu" and len(result["environment"]["load_average"]) == 3
    assert result["environment"]["versions"]["python"] == platform.python_version()
    assert torch.__version__.startswith(result["environment"]["versions"]["torch"])
    for key in TOP_KEYS | set(result["setup"]) | ENV_KEYS | RATE_KEYS | VERDICT_KEYS:
        assert key in throughput.__doc__, f"JSON key {key!r} is not documented in the module docstring"


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_quick_numbers_are_positive_and_self_consistent(quick) -> None:
    result, _ = quick
    repeats = result["setup"]["repeats"]
    assert {s for s, _, _ in _rates(result)} == set(SECTIONS)
    for section, name, rate in _rates(result):
        where = f"{section}/{name}"
        assert set(rate) == RATE_KEYS, where
        assert len(rate["runs"]) == repeats and all(r > 0 and math.isfinite(r) for r in rate["runs"]), where
        assert len(rate["seconds"]) == len(rate["units"]) == repeats, where
        assert all(units >= rate["per_run"] for units in rate["units"]), where
        assert rate["min"] == min(rate["runs"]) and rate["max"] == max(rate["runs"]), where
        assert rate["min"] <= rate["images_per_s"] <= rate["max"], where
        assert rate["spread_pct"] == pytest.approx(100 * (rate["max"] - rate["min"]) / rate["images_per_s"])
    # The decode-only figure counts every corpus file once per run.
    assert result["sections"]["decode"]["pil"]["per_run"] == result["setup"]["corpus_images"] == 64


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_quick_measures_every_installed_loader(quick) -> None:
    result, _ = quick
    for name in LOADERS:
        if is_installed(name):
            assert name in result["sections"]["loader"], result["skipped"].get(name)
            assert name in result["sections"]["end_to_end"]
        else:
            assert name in result["skipped"]
    # The synthetic feeder replays views made once: it is the step's input, never a loader figure.
    assert "synthetic" not in result["sections"]["loader"] and "synthetic" not in result["sections"]["end_to_end"]
    assert set(result["sections"]["step"]) == {"eager-lars", "eager-lars-loop", "eager-torch-optimizer-lars"}
    assert result["ceiling"] == "eager-lars"
    # The fused optimizer and its per-parameter loop reach the same weights (eager, fp32, CPU).
    agreement = result["lars_agreement"]
    assert agreement["steps"] == 3 and agreement["max_abs_diff"] <= 1e-5 * agreement["max_abs_param"]


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_quick_verdicts_follow_from_the_numbers(quick) -> None:
    result, _ = quick
    sections, ceiling = result["sections"], result["sections"]["step"][result["ceiling"]]["images_per_s"]
    decode = sections["decode"]["pil"]["images_per_s"]
    assert set(result["verdict"]) == set(sections["loader"])
    for name, verdict in result["verdict"].items():
        loader = sections["loader"][name]["images_per_s"]
        e2e = sections["end_to_end"][name]["images_per_s"]
        assert set(verdict) == VERDICT_KEYS
        assert verdict["bound"] == ("loader" if loader < ceiling else "compute"), name
        assert verdict["step_images_per_s"] == ceiling and verdict["loader_images_per_s"] == loader
        assert verdict["loader_over_step"] == pytest.approx(loader / ceiling)
        assert verdict["end_to_end_pct_of_step"] == pytest.approx(100 * e2e / ceiling)
        assert verdict["above_ceiling"] == (e2e > ceiling)
        assert verdict["loader_pct_of_decode"] == pytest.approx(100 * loader / decode)
    loaders = {n: r["images_per_s"] for n, r in sections["loader"].items()}
    ours = {n: ips for n, ips in loaders.items() if n in ("dali", "ffcv")}
    assert result["best_loader"] == max(ours, key=ours.get)
    baselines = {n: ips for n, ips in loaders.items() if n in ("torchvision", "solo-learn")}
    assert result["baseline"] == max(baselines, key=baselines.get)
    for name, speedup in result["speedup_vs_baseline"].items():
        assert speedup == pytest.approx(loaders[name] / loaders[result["baseline"]])


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_quick_writes_a_png_chart(quick) -> None:
    _, out = quick
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _rate(ips: float) -> dict:
    return Rate((ips,), warmup=0, per_run=1, unit="batches").to_dict()


def test_verdicts_by_hand() -> None:
    sections = {
        "decode": {}, "step": {"eager-lars": _rate(100.0)},
        "loader": {"slow": _rate(40.0), "fast": _rate(400.0), "no_e2e": _rate(100.0)},
        "end_to_end": {"slow": _rate(35.0), "fast": _rate(90.0)},
    }
    out = verdicts(sections, "eager-lars")
    assert out["slow"]["bound"] == "loader" and out["slow"]["end_to_end_pct_of_step"] == pytest.approx(35.0)
    assert out["slow"]["loader_pct_of_decode"] is None
    assert verdicts({**sections, "decode": {"pil": _rate(80.0)}}, "eager-lars")["slow"]["loader_pct_of_decode"] == 50.0
    assert out["fast"]["bound"] == "compute" and out["fast"]["loader_over_step"] == pytest.approx(4.0)
    # A loader exactly as fast as the step does not hold it back.
    assert out["no_e2e"]["bound"] == "compute" and out["no_e2e"]["end_to_end_pct_of_step"] is None
    assert out["no_e2e"]["above_ceiling"] is None
    assert verdicts(sections, None) == {}


def test_end_to_end_above_its_ceiling_is_flagged_as_noise() -> None:
    sections = {"decode": {}, "step": {"eager-lars": _rate(100.0)}, "loader": {"a": _rate(400.0), "b": _rate(400.0)},
                "end_to_end": {"a": _rate(104.0), "b": _rate(99.0)}}
    out = verdicts(sections, "eager-lars")
    assert out["a"]["above_ceiling"] is True and out["a"]["end_to_end_pct_of_step"] == pytest.approx(104.0)
    assert out["b"]["above_ceiling"] is False


def test_rate_median_and_spread() -> None:
    rate = Rate((10.0, 30.0, 20.0, 12.0), warmup=2, per_run=5, unit="steps")
    assert rate.median == 16.0  # mean of the middle two
    assert rate.spread_pct == pytest.approx(100 * 20 / 16)
    assert rate.to_dict()["runs"] == [10.0, 30.0, 20.0, 12.0]


def test_measure_stream_excludes_warmup_and_counts_images() -> None:
    batch_sizes = iter([3] * 2 + [4, 5, 6, 7, 8, 9])  # two warm-up batches, then 3 runs x 2 batches
    stream = ((torch.zeros(b, 1), torch.zeros(b, 1), torch.zeros(b)) for b in batch_sizes)
    seen = []
    rate = measure_stream(stream, lambda batch: seen.append(batch[0].shape[0]), warmup=2, per_run=2, repeats=3,
                          device=torch.device("cpu"), unit="batches")
    assert seen == [3, 3, 4, 5, 6, 7, 8, 9]
    assert len(rate.runs) == 3 and all(r > 0 for r in rate.runs)
    assert rate.units == (2, 2, 2)
    assert rate.runs == pytest.approx(tuple(i / s for i, s in zip((9, 13, 17), rate.seconds, strict=True)))


def test_measure_stream_runs_by_time_not_only_by_count() -> None:
    """A run of at least 2 batches and 0.05 s over batches that take 10 ms each: ~5 batches, not 2."""
    def slow(batch) -> None:
        time.sleep(0.01)

    stream = ((torch.zeros(4, 1), torch.zeros(4, 1), torch.zeros(4)) for _ in range(1000))
    rate = measure_stream(stream, slow, warmup=3, per_run=2, repeats=2, device=torch.device("cpu"),
                          unit="steps", min_seconds=0.05)
    assert all(units >= 5 for units in rate.units) and all(s >= 0.05 for s in rate.seconds)
    assert rate.warmup_seconds >= 0.03
    assert rate.min_seconds == 0.05


@pytest.mark.parametrize(("args", "message"), [
    (["--corpus", "/nonexistent/corpus"], "is not a folder"),
    (["--res", "0"], "--res must be at least 1"),
    (["--cores", "999"], "--cores must be between"),
    (["--step-seconds", "-1"], "--step-seconds must be at least 0"),
])
def test_bad_input_gives_one_clear_line(args, message, tmp_path, capsys) -> None:
    assert main(["--quick", "--device", "cpu", "--cache", str(tmp_path), "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
@pytest.mark.timeout(660)
@pytest.mark.skipif(not is_available("ffcv"), reason="ffcv is not installed")
def test_quick_compares_ffcv_decode_once_with_stock(quick) -> None:
    """The ffcv_variants section: all four variants timed, and the decode/crop model follows from the
    recorded per-image costs."""
    result, _ = quick
    assert set(result["sections"]["ffcv_variants"]) == set(VARIANTS)
    costs = result["ffcv_costs"]
    assert costs["images"] == 64 and costs["decode_ms"] > 0 and costs["crop_ms"] > 0
    decode, crop = costs["decode_ms"], costs["crop_ms"]
    assert costs["once_vs_twice_model"] == pytest.approx((2 * decode + 2 * crop) / (decode + 2 * crop))


def test_runs_with_the_trainers_kernel_settings(photo_corpus: str, tmp_path: Path, monkeypatch) -> None:
    """The benchmark times the step the trainer runs: the same configure_backends (cuDNN autotuning,
    TF32, subnormals flushed: without the flush a CPU step ran 25% slower in the first configuration)."""
    calls = []
    monkeypatch.setattr(throughput, "configure_backends", lambda deterministic: calls.append(deterministic))
    assert main(["--quick", "--device", "cpu", "--corpus", photo_corpus, "--sections", "decode",
                 "--cache", str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    assert calls == [False]


def _throughput(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "benchmark" / "throughput.py"), "--quick", "--device", "cpu",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_run_leaves_a_valid_json_of_the_figures_it_finished(photo_corpus, tmp_path) -> None:
    """SIGKILL (no chance to clean up) as soon as the first step figure is in the file: the JSON parses,
    holds that figure whole and says the run is not complete."""
    out = tmp_path / "killed"
    proc = _throughput("--corpus", photo_corpus, "--cache", str(tmp_path / "cache"), "--out", str(out),
                       "--sections", "step", "loader", cwd=tmp_path)
    path, deadline = out.with_suffix(".json"), time.monotonic() + 240
    result = {}
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file():
            result = json.loads(path.read_text())  # never a half-written file: written by rename
            if result["sections"]["step"]:
                break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert result["sections"]["step"], "no figure was written within 240 s"
    kept = json.loads(path.read_text())
    assert kept["complete"] is False and set(kept) == TOP_KEYS
    for name, rate in kept["sections"]["step"].items():
        assert set(rate) == RATE_KEYS and len(rate["runs"]) == kept["setup"]["repeats"], name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_budget_skips_what_it_cannot_hold_and_says_what_runs(photo_corpus, tmp_path) -> None:
    """--budget 20 on the quick sizes: the figures that fit are measured with runs capped to their share,
    the others are listed as budget skips, the JSON is complete, and the command ends in its time."""
    out = tmp_path / "budget"
    start = time.monotonic()
    proc = _throughput("--corpus", photo_corpus, "--cache", str(tmp_path / "cache"), "--out", str(out),
                       "--budget", "20", "--sections", "step", "loader", "end_to_end", cwd=tmp_path)
    output, _ = proc.communicate(timeout=280)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, output[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["complete"] is True and result["setup"]["budget_s"] == 20
    cut = {name: why for name, why in result["skipped"].items() if why.startswith("budget:")}
    measured = [(s, n) for s in ("step", "loader", "end_to_end") for n in result["sections"][s]]
    assert measured and cut, (measured, result["skipped"])  # some figures fit and some did not
    for name in cut:
        section, figure = name.split(" ", 1)
        assert figure not in result["sections"][section]
    # The set-up (corpus, .beton, imports) comes on top of the budget; the figures must not overrun it much.
    assert seconds < 20 + 60, seconds
    assert "throughput: step eager-lars: set-up and 2 timed runs of " in output  # capped runs, said
