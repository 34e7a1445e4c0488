"""The checks `python -m benchmark.acceptance` runs, each given the seconds it may take. Every check runs
its work as subprocesses (`run_logged`: its own log, a process group killed at its timeout, the log's last
line shown by the heartbeat) and returns a `CheckResult`; what a check measures is the product's own
command (throughput.py, pytest, train.py), so the acceptance proves what a user runs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmark.environment_probe import environment_headline, judge_environment
from benchmark.make_corpus import CORPUS_VERSION
from benchmark.progress import Heartbeat
from datasources.fashion_mnist import FASHION_MNIST_DIR
from datasources.imagefolder import scan_image_folder

# Not benchmark.timing's REPO: that module imports torch (1.7 s), which the acceptance runner never needs.
REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST_CONFIG = REPO / "configs" / "fashion-mnist-gpu.toml"  # the built-in GPU configuration
# The README's goal for that configuration; missing it is a note, not a failure: it judges the recipe, not
# the machine (and a run cut to the budget's minutes rarely reaches it).
GOAL_LINEAR_TOP1, GOAL_OVER_RANDOM_INIT = 0.91, 0.05
# Metric files of a training run worth keeping; checkpoints and backbone.pt are hundreds of MB.
RUN_FILES = ("metrics.jsonl", "metrics.csv", "metrics.png", "eval.json")
KILL_GRACE_S = 15  # SIGTERM lets train.py save and DALI/ffcv shut down before SIGKILL
TAIL_LINES = 20
POLL_S = 0.2
COMMON_TRAIN = ("--checkpoint-every", "0", "--checkpoint-minutes", "0")
SIGTERM_EXIT = 128 + signal.SIGTERM


@dataclass(frozen=True)
class Mode:
    """The sizes of one mode. `train`: the dali-train run's flags; `stop_after`: the step after which it
    gets its SIGTERM; `fashion_mnist`: flags added to the GPU configuration; `eval_reserve_s`: the seconds
    the Fashion-MNIST run keeps for start-up and its final evaluation when its training is cut to time."""

    name: str
    corpus_images: int
    train: tuple[str, ...]
    train_steps: int
    stop_after: int
    fashion_mnist: tuple[str, ...]
    eval_reserve_s: float
    throughput: tuple[str, ...]
    train_env: dict[str, str] = field(default_factory=dict)


MODES = {
    # The ImageNet stem at 32 px keeps a CPU step short (the CIFAR stem would cost 16x as much).
    "quick": Mode(
        name="quick", corpus_images=48,
        # Width 8 (1/64 of the conv weights): the runs prove the plumbing, not the network.
        train=("--arch", "resnet18", "--width", "8", "--res", "32", "--no-small-images", "--batch-size", "8",
               "--hidden-dim", "256", "--proj-dim", "64", "--log-every", "1", "--workers", "1", "--no-compile",
               "--warmup-epochs", "0"),
        # 12 steps of 8 images: two process starts and a few seconds of training.
        train_steps=12, stop_after=3,
        fashion_mnist=("--steps", "3", "--batch-size", "16", "--width", "8", "--log-every", "1", "--eval-limit",
                       "200", "--workers", "1", "--no-compile"),
        eval_reserve_s=30.0,
        throughput=("--quick",),
        # As throughput.py --quick does: two intra-op threads on a busy 2-core machine wait on each other at
        # every op (measured: 2.5x the CPU time of one thread for the quick Fashion-MNIST run).
        train_env={"OMP_NUM_THREADS": "1"},
    ),
    # The recipe's ImageNet sizes on one GPU, eager (compiling costs 80 s per process; throughput times the
    # compiled step, the Fashion-MNIST configuration trains compiled).
    "full": Mode(
        name="full", corpus_images=640,
        train=("--arch", "resnet50", "--res", "224", "--batch-size", "256", "--log-every", "5",
               "--workers", str(min(8, os.cpu_count() or 1)), "--warmup-epochs", "0", "--gpus", "1", "--no-compile"),
        train_steps=40, stop_after=10,
        fashion_mnist=(),
        eval_reserve_s=45.0,
        throughput=("--sections", "step", "loader", "end_to_end", "--loaders", "dali", "ffcv", "solo-learn",
                    "--optimizers", "lars", "torch-optimizer-lars", "--repeats", "3"),
    ),
}


@dataclass
class CheckResult:
    name: str
    verdict: str  # "pass" | "fail" | "skipped"
    reason: str = ""
    headline: str = ""  # the key numbers in a few words, for the table
    numbers: dict = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # user + system of its processes: comparable on a busy machine, unlike seconds
    command: list[str] | None = None
    log: str | None = None
    log_tail: list[str] = field(default_factory=list)
    date: str = ""
    mode: str = ""


@dataclass
class Outcome:
    """How one subprocess ended."""

    command: list[str]
    returncode: int | None  # None: killed after its timeout
    seconds: float
    tail: list[str]

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def failure(self) -> str:
        if self.returncode is None:
            return f"timed out after {self.seconds:.0f} s"
        last = next((line for line in reversed(self.tail) if line.strip()), "no output")
        return f"exit code {self.returncode}: {last.strip()}"


@dataclass
class Context:
    """What every check needs: mode, folders, data paths, the environment's facts and the heartbeat."""

    mode: Mode
    results: Path
    cache: Path
    corpus: str | None
    beton: str | None
    facts: dict = field(default_factory=dict)  # the environment probe's; {} if it failed
    beat: Heartbeat | None = None
    photos: bool = True  # /usr/share/backgrounds has the photos make_corpus (and tests/conftest.py) need
    budgeted: bool = True  # the acceptance runs under a --budget (checks size their work to their seconds)
    data_failed: str | None = None

    @property
    def logs(self) -> Path:
        return self.results / "logs"

    @property
    def cuda(self) -> bool:
        return bool(self.facts.get("torch", {}).get("cuda_available"))


def tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _last_line(path: Path) -> str:
    """The log's last non-empty line (read from its end: logs grow to megabytes)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    return lines[-1][:160] if lines else ""


def kill_group(proc: subprocess.Popen) -> None:
    """Stop the child and everything it started (DDP ranks, loader worker processes): SIGTERM first, so
    train.py can stop cleanly, then SIGKILL for whatever is left in the group, the leader gone or not."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(KILL_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_logged(command: list[str], log: Path, timeout: float, env: dict[str, str] | None = None,
               append: bool = False, beat: Heartbeat | None = None,
               signal_when: Callable[[], bool] | None = None) -> Outcome:
    """Run `command` in the repository root with stdout+stderr appended to `log`, killed after `timeout`.

    `beat`: shows the log's last line at each heartbeat. `signal_when`: polled while the command runs;
    the first time it is true the process group gets SIGTERM (as a scheduler's preemption would) and the
    command is left to stop on its own within the timeout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "a" if append else "w") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        # Its own session, so a timeout can kill the whole process group and nothing is left on the GPU.
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        returncode: int | None = None
        try:
            while (returncode := proc.poll()) is None:
                if time.monotonic() - start > timeout:
                    kill_group(proc)
                    returncode = None
                    break
                if beat is not None:
                    beat.status(f"{log.stem}: {_last_line(log) or 'starting'}")
                if signal_when is not None and signal_when():
                    signal_when = None
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)
                time.sleep(POLL_S)
        except BaseException:
            kill_group(proc)
            raise
    return Outcome(command, returncode, time.monotonic() - start, tail(log))


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def failed(name: str, command: list[str], outcome: Outcome) -> CheckResult:
    return CheckResult(name, "fail", outcome.failure(), command=command, log_tail=outcome.tail)


# ---------------------------------------------------------------------------------------------------------
# environment (the facts are gathered before any check: they choose the mode and the results folder)
# ---------------------------------------------------------------------------------------------------------

def gather_facts(log: Path, timeout: float) -> tuple[dict | None, Outcome]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "environment.json"
        code = f"from benchmark.environment_probe import probe_environment; probe_environment({str(out)!r})"
        outcome = run_logged(python("-c", code), log, timeout)
        facts = json.loads(out.read_text()) if outcome.ok and out.is_file() else None
    return facts, outcome


def check_environment(ctx: Context, outcome: Outcome) -> CheckResult:
    if not ctx.facts:
        return CheckResult("environment", "fail", f"the probe failed: {outcome.failure()}", command=outcome.command)
    problems, notes = judge_environment(ctx.facts, ctx.mode.name == "quick")
    numbers = {key: ctx.facts[key] for key in ("torch", "driver", "dali", "ffcv", "loaders", "nvjpeg_hw_decoder",
                                                "dali_mixed_decode") if key in ctx.facts}
    return CheckResult("environment", "fail" if problems else "pass", "; ".join(problems + notes),
                       environment_headline(ctx.facts), numbers | {"notes": notes, "problems": problems},
                       command=outcome.command)


# ---------------------------------------------------------------------------------------------------------
# data: the real-photo corpus and its .beton, built once into --cache unless given
# ---------------------------------------------------------------------------------------------------------

def default_corpus(cache: Path, mode: Mode) -> Path:
    """The corpus throughput.py itself would build (same name and place), so either reuses the other's."""
    return cache / ("quick" if mode.name == "quick" else "") / f"corpus-v{CORPUS_VERSION}-{mode.corpus_images}"


def count_images(corpus: str) -> int:
    return len(scan_image_folder(corpus, validate=False).samples)


def check_data(ctx: Context, timeout: float) -> CheckResult:
    log = ctx.logs / "data.log"
    numbers: dict = {"corpus_given": ctx.corpus is not None, "beton_given": ctx.beton is not None}
    log.write_text("")
    deadline = time.monotonic() + timeout
    if ctx.corpus is None:
        corpus = default_corpus(ctx.cache, ctx.mode)
        if not corpus.is_dir():
            built = run_logged(python("-m", "benchmark.make_corpus", "--out", str(corpus), "--images",
                                      str(ctx.mode.corpus_images), "--classes", "10"), log, timeout, append=True,
                               beat=ctx.beat)
            if not built.ok:
                return CheckResult("data", "fail", f"make_corpus: {built.failure()}", log_tail=built.tail)
            numbers["corpus_built_s"] = round(built.seconds, 1)
        ctx.corpus = str(corpus)
    numbers.update(corpus=ctx.corpus, corpus_images=count_images(ctx.corpus),
                   corpus_mb=round(sum(p.stat().st_size for p in Path(ctx.corpus).rglob("*") if p.is_file()) / 2**20,
                                   1))
    if ctx.beton is None:
        beton, outcome = _convert(ctx, log, max(1.0, deadline - time.monotonic()))
        if beton is None:
            return CheckResult("data", "fail", f"ffcv conversion: {outcome.failure()}", numbers=numbers,
                               log_tail=outcome.tail)
        ctx.beton = beton
    numbers.update(beton=ctx.beton, beton_mb=round(Path(ctx.beton).stat().st_size / 2**20, 1))
    headline = f"{numbers['corpus_images']} photos ({numbers['corpus_mb']} MB), .beton {numbers['beton_mb']} MB"
    return CheckResult("data", "pass", headline=headline, numbers=numbers)


def _convert(ctx: Context, log: Path, timeout: float) -> tuple[str | None, Outcome]:
    """The corpus as a .beton via throughput.py's own prepare_beton (python -m datasources.ffcv_convert
    underneath): the same file name, so the throughput check reuses it instead of converting again."""
    marker = "BETON="
    code = ("import sys; from pathlib import Path; from benchmark.throughput import prepare_beton; "
            f"print({marker!r} + prepare_beton({ctx.corpus!r}, Path({str(ctx.cache)!r}), {os.cpu_count() or 1}))")
    outcome = run_logged(python("-c", code), log, timeout, append=True, beat=ctx.beat)
    found = [line[len(marker):] for line in outcome.tail if line.startswith(marker)]
    return (found[-1] if outcome.ok and found else None), outcome


# ---------------------------------------------------------------------------------------------------------
# throughput: benchmark/throughput.py with the check's seconds as its --budget
# ---------------------------------------------------------------------------------------------------------

THROUGHPUT_MARGIN_S = 15.0  # the benchmark's own start-up and report, on top of its --budget


def check_throughput(ctx: Context, timeout: float) -> CheckResult:
    """Step (eager and compiled), each loader alone and end to end, within the check's seconds. The
    benchmark rewrites its JSON after every figure, so a run cut short still reports what it finished."""
    out = ctx.results / "throughput"
    # Without an acceptance budget the benchmark measures everything (the check's time is only a kill).
    budget = ("--budget", f"{max(10.0, timeout - THROUGHPUT_MARGIN_S):.0f}") if ctx.budgeted else ()
    command = python("benchmark/throughput.py", *ctx.mode.throughput, *budget,
                     "--corpus", str(ctx.corpus), "--cache", str(ctx.cache), "--out", str(out))
    outcome = run_logged(command, ctx.logs / "throughput.log", timeout, beat=ctx.beat)
    json_path = out.with_suffix(".json")
    if not json_path.is_file():
        return failed("throughput", command, outcome)
    result = json.loads(json_path.read_text())
    sections = result["sections"]
    numbers = {
        "loader_images_per_s": {n: r["images_per_s"] for n, r in sections["loader"].items()},
        "end_to_end_images_per_s": {n: r["images_per_s"] for n, r in sections["end_to_end"].items()},
        "step_images_per_s": {n: r["images_per_s"] for n, r in sections["step"].items()},
        "compile_warmup_s": {n: r["warmup_seconds"] for n, r in sections["step"].items()},
        "ceiling": result["ceiling"], "best_loader": result["best_loader"], "baseline": result["baseline"],
        "speedup_vs_baseline": result["speedup_vs_baseline"], "complete": result["complete"],
        "bound": {n: v["bound"] for n, v in result["verdict"].items()}, "skipped": result["skipped"],
        "files": [p.name for p in (json_path, out.with_suffix(".png")) if p.is_file()]}
    loaders = ", ".join(f"{n} {ips:,.0f}" for n, ips in numbers["loader_images_per_s"].items())
    steps = ", ".join(f"{n} {ips:,.0f}" for n, ips in numbers["step_images_per_s"].items())
    e2e = ", ".join(f"{n} {ips:,.0f}" for n, ips in numbers["end_to_end_images_per_s"].items())
    headline = "; ".join(part for part in (f"step {steps}" if steps else "", f"loaders {loaders}" if loaders else "",
                                           f"end to end {e2e}" if e2e else "") if part) + " img/s"
    # Every loader is installed on an accepted machine: one the benchmark could not run is a failure; a
    # figure the budget left out is said, not failed.
    broken = {n: why for n, why in result["skipped"].items() if not why.startswith("budget:")}
    cut = [n for n, why in result["skipped"].items() if why.startswith("budget:")]
    reasons = [f"{n}: {why}" for n, why in broken.items()]
    if cut:
        reasons.append(f"not measured for time: {', '.join(cut)}")
    if not outcome.ok:
        reasons.insert(0, f"the benchmark stopped early ({outcome.failure()}); its figures up to then are kept")
    verdict = "fail" if broken or (not outcome.ok and not result["complete"] and not cut) else "pass"
    return CheckResult("throughput", verdict, "; ".join(reasons), headline, numbers, command=command,
                       log_tail=[] if verdict == "pass" else outcome.tail)


# ---------------------------------------------------------------------------------------------------------
# gpu-tests: every CUDA path first (`gpu and not slow`), the slow ones only while time is left
# ---------------------------------------------------------------------------------------------------------

def one_process_pytest(pyproject: Path = REPO / "pyproject.toml") -> tuple[str, ...]:
    """pytest options for one process whether or not pytest-xdist is installed (the GPU machine's kit has no
    xdist): xdist blocked and pyproject's addopts without its `-n N`. One process, not two workers: each would
    collect everything again on a CPU, and on a GPU they would share one device and its timings."""
    words = tomllib.loads(pyproject.read_text())["tool"]["pytest"]["ini_options"]["addopts"].split()
    kept = [w for i, w in enumerate(words) if w != "-n" and (i == 0 or words[i - 1] != "-n")]
    return "-p", "no:xdist", "-o", "addopts=" + " ".join(kept)


SLOW_GPU_TESTS_S = 60.0  # two processes on one GPU and the like: started only with this much left


def junit_counts(path: Path) -> dict[str, int]:
    """tests / passed / failed / errors / skipped from pytest's JUnit XML."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def check_gpu_tests(ctx: Context, timeout: float) -> CheckResult:
    deadline = time.monotonic() + timeout
    # Without CUDA every gpu test skips: one pytest run collects them all (their modules import) and skips them.
    selections = ["gpu and not slow", "gpu and slow"] if ctx.cuda else ["gpu"]
    one_process = one_process_pytest()
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "passed": 0}
    commands, problems, notes = [], [], []
    log = ctx.logs / "gpu-tests.log"
    log.write_text("")
    for i, selection in enumerate(selections):
        left = deadline - time.monotonic()
        if i and left < SLOW_GPU_TESTS_S:
            notes.append(f"the slow gpu tests were not started ({left:.0f} s left)")
            break
        xml = ctx.logs / f"gpu-tests-{i}.xml"
        xml.unlink(missing_ok=True)
        command = python("-m", "pytest", "-m", selection, *one_process, "-p", "no:cacheprovider",
                         f"--junitxml={xml}", "tests")
        commands.append(command)
        outcome = run_logged(command, log, left, append=True, beat=ctx.beat)
        if not xml.is_file():
            problems.append(f"{selection}: {outcome.failure()}")
            break
        for key, value in junit_counts(xml).items():
            counts[key] += value
        if outcome.returncode not in (0, 5):  # 5: nothing selected
            problems.append(f"{selection}: {outcome.failure()}")
    headline = f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
    result = CheckResult("gpu-tests", "pass", "", headline, counts, command=commands[0] if commands else None)
    if problems:
        result.verdict, result.log_tail = "fail", tail(log)
    elif not ctx.cuda:
        # pytest still ran: the gpu tests were collected (their modules import) and skipped by conftest.
        result.verdict = "skipped"
        notes.insert(0, f"no CUDA device: the {counts['tests']} gpu tests were collected and skipped")
    elif counts["passed"] == 0:
        result.verdict = "fail"
        problems.append("no gpu test ran on this CUDA machine")
    if not ctx.photos:
        notes.append("tests/conftest.py's photo_corpus fixture needs the photos in /usr/share/backgrounds")
    result.reason = "; ".join(problems + notes)
    return result


# ---------------------------------------------------------------------------------------------------------
# training runs: train.py as a user runs it, into a scratch folder under --cache
# ---------------------------------------------------------------------------------------------------------

def metric_records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def run_metrics(out: Path) -> dict:
    """Steps, loss, images/s (median after the first log window, which holds compilation and warm-up) and
    loader wait of a train.py run, plus its final evaluation if it wrote one."""
    records = metric_records(out)
    if not records:
        return {"steps": 0}
    timed = records[1:] or records
    numbers = {"steps": records[-1]["step"], "epoch": records[-1]["epoch"], "loss_first": records[0]["loss"],
               "loss_last": records[-1]["loss"],
               "images_per_s": statistics.median(r["images_per_s"] for r in timed),
               "loader_wait": statistics.median(r["loader_wait"] for r in timed),
               "elapsed_s": records[-1]["elapsed_s"]}
    if (out / "eval.json").is_file():
        numbers.update(json.loads((out / "eval.json").read_text()))
    return numbers


def train_headline(numbers: dict) -> str:
    text = (f"{numbers['steps']} steps, {numbers['images_per_s']:,.0f} img/s, loss "
            f"{numbers['loss_first']:.2f}->{numbers['loss_last']:.2f}, wait {numbers['loader_wait']:.0%}")
    if "knn_top1" in numbers:
        text += f", kNN {numbers['knn_top1']:.1%}"
        if "random_init_knn_top1" in numbers:
            text += f" (init {numbers['random_init_knn_top1']:.1%})"
        text += f", linear {numbers['linear_top1']:.1%}"
        baselines = [f"{label} {numbers[key]:.1%}" for label, key in
                     (("init", "random_init_linear_top1"), ("pixels", "pixels_linear_top1")) if key in numbers]
        if baselines:
            text += f" ({', '.join(baselines)})"
    return text


def keep_run_files(ctx: Context, name: str, work: Path) -> None:
    kept = ctx.results / name
    shutil.rmtree(kept, ignore_errors=True)
    for file in RUN_FILES:
        if (work / file).is_file():
            kept.mkdir(parents=True, exist_ok=True)
            shutil.copy2(work / file, kept / file)


def scratch(ctx: Context, name: str) -> Path:
    """A fresh run folder: train.py refuses an --out that holds checkpoints without --resume."""
    work = ctx.cache / "acceptance-runs" / name
    shutil.rmtree(work, ignore_errors=True)
    return work


def check_dali_train(ctx: Context, timeout: float) -> CheckResult:
    """train.py --loader dali on the photo corpus: SIGTERM after `stop_after` steps (it must save and exit
    143), then --resume to the last step; images/s, loss and the step it resumed at."""
    name, mode = "dali-train", ctx.mode
    work = scratch(ctx, name)
    deadline = time.monotonic() + timeout
    args = ("train.py", "--loader", "dali", "--data", str(ctx.corpus), *mode.train, "--steps", str(mode.train_steps),
            *COMMON_TRAIN, "--out", str(work))
    log = ctx.logs / f"{name}.log"

    def reached_stop() -> bool:
        records = metric_records(work)
        return bool(records) and records[-1]["step"] >= mode.stop_after

    first = run_logged(python(*args), log, timeout, env=mode.train_env, beat=ctx.beat, signal_when=reached_stop)
    stopped = metric_records(work)
    stopped_at = stopped[-1]["step"] if stopped else 0
    numbers: dict = {"stop_exit_code": first.returncode, "stopped_at": stopped_at}
    if first.returncode != SIGTERM_EXIT:
        keep_run_files(ctx, name, work)
        why = ("it finished before the signal landed" if first.ok else first.failure())
        return CheckResult(name, "fail", f"SIGTERM after step {mode.stop_after}: expected exit {SIGTERM_EXIT}, {why}",
                           numbers=numbers, command=python(*args), log_tail=first.tail)
    resumed = run_logged(python(*args, "--resume"), log, max(1.0, deadline - time.monotonic()), env=mode.train_env,
                         append=True, beat=ctx.beat)
    keep_run_files(ctx, name, work)
    if not resumed.ok:
        return failed(name, python(*args, "--resume"), resumed)
    found = re.search(r"resumed from .* at step (\d+)", log.read_text())
    numbers |= run_metrics(work) | {"resumed_at": int(found.group(1)) if found else None}
    problems = []
    if numbers["resumed_at"] != stopped_at:
        problems.append(f"resumed at step {numbers['resumed_at']}, the signal's checkpoint was at {stopped_at}")
    problems += _run_problems(work, numbers, mode.train_steps)
    headline = (f"SIGTERM at step {stopped_at} -> exit {SIGTERM_EXIT}, resumed to {numbers['steps']}; "
                + train_headline(numbers))
    return CheckResult(name, "fail" if problems else "pass", "; ".join(problems), headline, numbers,
                       command=python(*args))


def _run_problems(work: Path, numbers: dict, steps: int | None) -> list[str]:
    problems = []
    if steps is not None and numbers["steps"] != steps:
        problems.append(f"stopped at step {numbers['steps']} of {steps}")
    if numbers["steps"] and not math.isfinite(numbers["loss_last"]):
        problems.append(f"the loss is {numbers['loss_last']}")
    if not (work / "backbone.pt").is_file():
        problems.append("no backbone.pt was written")
    return problems


def check_fashion_mnist(ctx: Context, timeout: float) -> CheckResult:
    """The built-in GPU configuration with its training cut to the check's seconds (`--time-limit`): the
    epochs it reached, images/s, and kNN / linear top-1 beside random init and raw pixels."""
    name, mode = "fashion-mnist", ctx.mode
    if not FASHION_MNIST_DIR.is_dir():
        return CheckResult(name, "skipped", f"Fashion-MNIST files not installed in {FASHION_MNIST_DIR} "
                           "(scripts/setup.sh installs them; or set FASHION_MNIST_DIR)")
    work = scratch(ctx, name)
    minutes = max(0.1, (timeout - mode.eval_reserve_s) / 60) if math.isfinite(timeout) else 0.0  # 0: no limit
    command = python("train.py", "--config", str(FASHION_MNIST_CONFIG), *mode.fashion_mnist, *COMMON_TRAIN,
                     "--no-resume", "--time-limit", f"{minutes:.2f}", "--out", str(work))
    outcome = run_logged(command, ctx.logs / f"{name}.log", timeout, env=mode.train_env, beat=ctx.beat)
    keep_run_files(ctx, name, work)
    if not outcome.ok:
        return failed(name, command, outcome)
    numbers = run_metrics(work)
    numbers["time_limit_min"] = round(minutes, 2)
    problems = _run_problems(work, numbers, None)
    if "linear_top1" not in numbers:
        problems.append("no eval.json (kNN / linear probe) was written")
    reached = f"epoch {numbers.get('epoch', 0) + 1} reached; " if numbers["steps"] else ""
    headline = reached + train_headline(numbers) if numbers["steps"] else ""
    notes = goal_notes(numbers) if mode.name == "full" else []
    return CheckResult(name, "fail" if problems else "pass", "; ".join(problems + notes), headline, numbers,
                       command=command)


def goal_notes(numbers: dict) -> list[str]:
    """Where the Fashion-MNIST GPU run falls short of the README's goal."""
    notes = []
    linear = numbers.get("linear_top1")
    if linear is not None and linear < GOAL_LINEAR_TOP1:
        notes.append(f"note: linear top-1 {linear:.1%} is below the {GOAL_LINEAR_TOP1:.0%} goal")
    init = numbers.get("random_init_linear_top1")
    if linear is not None and init is not None and linear < init + GOAL_OVER_RANDOM_INIT:
        notes.append(f"note: linear top-1 {linear:.1%} is not {GOAL_OVER_RANDOM_INIT:.0%} above random init "
                     f"({init:.1%})")
    return notes
