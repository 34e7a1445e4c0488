"""Accept a machine: one command that checks the environment, runs the GPU tests, the throughput
benchmark, short DALI and FFCV training runs on a real-photo corpus and the built-in Fashion-MNIST GPU
configuration (configs/fashion-mnist-gpu.toml) with its evaluation, and writes everything to one
results folder.

    python -m benchmark.acceptance                                  # every check (full on CUDA, quick on CPU)
    python -m benchmark.acceptance --part 1 --corpus DIR --results R   # environment, data, gpu-tests, throughput
    python -m benchmark.acceptance --part 2 --corpus DIR --beton F --results R   # data, training runs
    python -m benchmark.acceptance --quick --checks dali-train,fashion-mnist

Every check runs as a subprocess with a timeout; its output goes to `<results>/logs/<check>.log`, and it
ends with a verdict: pass, fail (with the last lines of its log) or skipped (with the reason). A check
that fails, crashes or times out never stops the others. The process exits 0 when every check it ran
passed or was skipped for a stated reason, 1 otherwise, 2 on bad arguments (one line, nothing run).

Results (`--results`, default benchmark/results/acceptance-<device>-<date>/):
    summary.json  every check: verdict, reason, numbers, seconds, command, log; plus device, versions,
                  git commit, date and one entry per invocation under `runs`. A second invocation into
                  the same folder (part 2 after part 1) replaces the checks it reruns and keeps the others.
    summary.md    the same as a table
    logs/         one log per check; gpu-tests.xml (JUnit)
    throughput.json, throughput.png          benchmark/throughput.py's result and chart
    <check>/metrics.{jsonl,csv,png}, eval.json  the training runs' metric files (checkpoints and
                  backbones stay in the scratch folder under --cache)

--quick (the default without CUDA) runs the same checks with tiny sizes (res 32, batch 8, a few steps;
throughput.py --quick; the GPU configuration cut to 3 eager steps), so the whole command is proven on a
CPU before any GPU exists. It says nothing about speed. The full mode (the default with CUDA) uses the
sizes a GPU is accepted with (`MODES`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from benchmark.make_corpus import CORPUS_VERSION, find_photos
from benchmark.report import write_json
from benchmark.timing import REPO
from datasources.fashion_mnist import FASHION_MNIST_DIR
from datasources.imagefolder import scan_image_folder

SCHEMA_VERSION = 1
CHECKS = ("environment", "data", "gpu-tests", "throughput", "ffcv-train", "dali-train", "fashion-mnist")
# Two runs of under 10 minutes each on one H100: the benchmark alone, then the training runs.
PARTS = {
    "1": ("environment", "data", "gpu-tests", "throughput"),
    "2": ("environment", "data", "ffcv-train", "dali-train", "fashion-mnist"),
    "all": CHECKS,
}
PART_BUDGET_S = 570  # of the 600 s a part may take: leaves time to write the summary
NEEDS_CORPUS = ("throughput", "ffcv-train", "dali-train")
FASHION_MNIST_CONFIG = REPO / "configs" / "fashion-mnist-gpu.toml"  # the built-in GPU configuration
# The README's goal for that configuration; missing it is a note, not a failure: it judges the recipe
# (not yet measured on a GPU), not the machine.
GOAL_LINEAR_TOP1, GOAL_OVER_RANDOM_INIT = 0.91, 0.05
# Metric files of a training run worth keeping; checkpoints and backbone.pt are hundreds of MB.
RUN_FILES = ("metrics.jsonl", "metrics.csv", "metrics.png", "eval.json")
KILL_GRACE_S = 15  # SIGTERM lets train.py save and DALI/ffcv shut down before SIGKILL
MIN_CHECK_S = 20  # a check with less time left than this is not started
TAIL_LINES = 20


@dataclass(frozen=True)
class Mode:
    """The sizes of one mode; `train` are train.py flags shared by the DALI and FFCV runs."""

    name: str
    corpus_images: int
    train: tuple[str, ...]
    train_steps: int
    fashion_mnist: tuple[str, ...]
    throughput: tuple[str, ...]
    timeouts: dict[str, int]
    train_env: dict[str, str] = field(default_factory=dict)


COMMON_TRAIN = ("--checkpoint-every", "0", "--checkpoint-minutes", "0", "--no-resume")
MODES = {
    # The ImageNet stem at 32 px keeps a CPU step short (the CIFAR stem would cost 16x as much).
    "quick": Mode(
        name="quick", corpus_images=48,
        train=("--arch", "resnet18", "--res", "32", "--no-small-images", "--batch-size", "8", "--hidden-dim", "256",
               "--proj-dim", "64", "--steps", "4", "--log-every", "1", "--workers", "1", "--no-compile",
               "--warmup-epochs", "0"),
        train_steps=4,
        fashion_mnist=("--steps", "3", "--batch-size", "16", "--log-every", "1", "--eval-limit", "200",
                       "--workers", "1", "--no-compile"),
        throughput=("--quick",),
        timeouts={"environment": 120, "data": 180, "gpu-tests": 180, "throughput": 300, "dali-train": 180,
                  "ffcv-train": 180, "fashion-mnist": 240},
        # As throughput.py --quick does: two intra-op threads on a busy 2-core machine wait on each other at
        # every op (measured: 2.5x the CPU time of one thread for the quick Fashion-MNIST run).
        train_env={"OMP_NUM_THREADS": "1"},
    ),
    # The recipe's ImageNet sizes on one GPU (so images/s compare with throughput.py's single device), eager:
    # the compiled step is timed by throughput and trained by the Fashion-MNIST GPU configuration, which
    # runs unchanged and needs most of part 2's ten minutes.
    "full": Mode(
        name="full", corpus_images=5000,
        train=("--arch", "resnet50", "--res", "224", "--batch-size", "256", "--steps", "100", "--log-every", "10",
               "--workers", str(min(8, os.cpu_count() or 1)), "--warmup-epochs", "1", "--gpus", "1",
               "--no-compile"),
        train_steps=100,
        fashion_mnist=(),
        throughput=(),
        timeouts={"environment": 120, "data": 240, "gpu-tests": 300, "throughput": 480, "dali-train": 180,
                  "ffcv-train": 180, "fashion-mnist": 540},
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
    """What every check needs: mode, folders, data paths, and the time left."""

    mode: Mode
    results: Path
    cache: Path
    corpus: str | None
    beton: str | None
    deadline: float | None
    facts: dict = field(default_factory=dict)  # the environment probe's; {} if it failed
    photos: bool = True  # /usr/share/backgrounds has the photos make_corpus (and tests/conftest.py) need
    data_failed: str | None = None

    @property
    def logs(self) -> Path:
        return self.results / "logs"

    @property
    def cuda(self) -> bool:
        return bool(self.facts.get("torch", {}).get("cuda_available"))

    def timeout(self, check: str) -> float | None:
        """The check's own limit, cut to what is left of --time-budget; None: no time left to start."""
        limit = float(self.mode.timeouts[check])
        if self.deadline is None:
            return limit
        left = self.deadline - time.monotonic()
        return None if left < MIN_CHECK_S else min(limit, left)


class Interrupted(Exception):
    """SIGTERM/SIGINT reached the acceptance run; the running check is stopped and reported."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _kill_group(proc: subprocess.Popen) -> None:
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
               append: bool = False) -> Outcome:
    """Run `command` in the repository root with stdout+stderr appended to `log`, killed after `timeout`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "a" if append else "w") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        # Its own session, so a timeout can kill the whole process group and nothing is left on the GPU.
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        try:
            returncode: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            returncode = None
        except BaseException:
            _kill_group(proc)
            raise
    return Outcome(command, returncode, time.monotonic() - start, _tail(log))


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


# ---------------------------------------------------------------------------------------------------------
# environment: gathered in a subprocess (`probe_environment`), judged here (`judge_environment`)
# ---------------------------------------------------------------------------------------------------------

NVJPEG_BACKEND_HARDWARE = 3
# NVJPEG_STATUS_ARCH_MISMATCH / _IMPLEMENTATION_NOT_SUPPORTED: the GPU has no JPEG engine nvJPEG can use.
NVJPEG_NO_HARDWARE = (7, 9)


def _cuda_major(version: str | None) -> int | None:
    return int(version.split(".")[0]) if version else None


def dali_wheels() -> dict[str, int | None]:
    """Installed DALI distributions -> the CUDA major their name is built for (nvidia-dali-cuda130 -> 13)."""
    from importlib import metadata

    found = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            match = re.search(r"cuda(\d+)", name)
            found[name] = int(match.group(1)) // 10 if match else None
    return found


def _dali_facts(torch_cuda: str | None) -> dict:
    wheels = dali_wheels()
    facts: dict = {"wheels": wheels, "torch_cuda_major": _cuda_major(torch_cuda)}
    try:
        import nvidia.dali

        facts["version"] = nvidia.dali.__version__
    except Exception as err:  # a broken DALI install must not stop the other facts
        facts["import_error"] = f"{type(err).__name__}: {err}"
    majors = {m for m in wheels.values() if m is not None}
    facts["matches_torch"] = None if not torch_cuda or not majors else majors == {_cuda_major(torch_cuda)}
    return facts


def find_libnvjpeg(cuda_major: int | None) -> str | None:
    """The libnvjpeg DALI loads: the nvidia-* wheel's copy for torch's CUDA major, else the system one."""
    import ctypes.util

    candidates = []
    with contextlib.suppress(ImportError):
        import nvidia

        for base in nvidia.__path__:  # nvidia/cu13/lib (CUDA 13 wheels), nvidia/nvjpeg/lib (CUDA 12)
            candidates += [p for p in Path(base).glob("*/lib/libnvjpeg.so.*")
                           if re.fullmatch(r"libnvjpeg\.so\.\d+", p.name)]
    candidates.sort(key=lambda p: p.name != f"libnvjpeg.so.{cuda_major}")
    if candidates:
        return str(candidates[0])
    return ctypes.util.find_library("nvjpeg")


def _nvjpeg_hardware(cuda_major: int | None) -> dict:
    """Ask nvJPEG itself for its hardware backend: nvjpegCreateEx(NVJPEG_BACKEND_HARDWARE) succeeds exactly
    where a JPEG engine exists (A100, H100, ...), which is the test DALI makes before using hw_decoder_load.
    More honest than a list of GPU names, which goes stale."""
    import ctypes

    lib = find_libnvjpeg(cuda_major)
    if lib is None:
        return {"present": None, "detail": "libnvjpeg not found"}
    nvjpeg = ctypes.CDLL(lib)
    nvjpeg.nvjpegCreateEx.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint,
                                      ctypes.POINTER(ctypes.c_void_p)]
    handle = ctypes.c_void_p()
    status = nvjpeg.nvjpegCreateEx(NVJPEG_BACKEND_HARDWARE, None, None, 0, ctypes.byref(handle))
    if status == 0:
        nvjpeg.nvjpegDestroy(handle)
        return {"present": True, "library": lib}
    present = False if status in NVJPEG_NO_HARDWARE else None
    return {"present": present, "library": lib, "detail": f"nvjpegCreateEx(HARDWARE) returned status {status}"}


def _dali_mixed_decode() -> dict:
    """Decode two JPEGs with the production settings (device="mixed", the loader's hw_decoder_load)."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def
    from PIL import Image

    from pipelines.dali_loader import HW_DECODER_LOAD

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(2):
            path = Path(tmp) / f"{i}.jpg"
            pixels = np.random.default_rng(i).integers(0, 255, (96, 128, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
            files.append(str(path))

        @pipeline_def(batch_size=2, num_threads=1, device_id=0)
        def decode():
            jpegs, _ = fn.readers.file(files=files)
            return fn.decoders.image(jpegs, device="mixed", hw_decoder_load=HW_DECODER_LOAD)

        pipe = decode()
        pipe.build()
        (images,) = pipe.run()
        shapes = [list(images.as_cpu().at(i).shape) for i in range(2)]
    return {"ok": shapes == [[96, 128, 3]] * 2, "shapes": shapes, "hw_decoder_load": HW_DECODER_LOAD}


def _driver_facts() -> dict:
    """The driver's version (nvidia-smi) and the newest CUDA it supports (libcuda's cuDriverGetVersion)."""
    import ctypes

    facts: dict = {}
    if shutil.which("nvidia-smi"):
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        facts["nvidia_smi"] = proc.stdout.strip().splitlines() if proc.returncode == 0 else proc.stderr.strip()
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            facts["cuda_driver_api"] = f"{version.value // 1000}.{version.value % 1000 // 10}"
    except OSError:
        facts["cuda_driver_api"] = None  # no NVIDIA driver on this machine
    return facts


def _torch_facts() -> dict:
    import torch

    facts = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if facts["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        facts.update(device_count=torch.cuda.device_count(), device_name=props.name,
                     capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                     bf16=torch.cuda.is_bf16_supported())
    return facts


def _guarded(gather: Callable[[], dict]) -> dict:
    try:
        return gather()
    except Exception as err:  # one fact that cannot be read is reported, the others still are
        return {"error": f"{type(err).__name__}: {err}"}


def probe_environment(out: str) -> None:
    """Runs in the environment check's subprocess: every fact, as JSON, to `out`."""
    from importlib import metadata

    import torch

    from benchmark.timing import environment
    from pipelines.registry import LOADER_MODULES, is_available

    torch_facts = _torch_facts()
    device = torch.device("cuda" if torch_facts["cuda_available"] else "cpu")
    facts = environment(device)
    facts["torch"] = torch_facts
    facts["driver"] = _guarded(_driver_facts)
    facts["dali"] = _guarded(lambda: _dali_facts(torch.version.cuda))
    facts["loaders"] = {name: is_available(name) for name in LOADER_MODULES}
    try:
        import ffcv  # noqa: F401

        facts["ffcv"] = {"importable": True, "version": metadata.version("ffcv")}
    except Exception as err:
        facts["ffcv"] = {"importable": False, "error": f"{type(err).__name__}: {err}"}
    if device.type == "cuda":
        facts["nvjpeg_hw_decoder"] = _guarded(lambda: _nvjpeg_hardware(_cuda_major(torch.version.cuda)))
        facts["dali_mixed_decode"] = _guarded(_dali_mixed_decode)
    else:
        facts["nvjpeg_hw_decoder"] = {"present": None, "detail": "no CUDA device"}
    Path(out).write_text(json.dumps(facts, indent=1, default=str))


def judge_environment(facts: dict, quick: bool) -> tuple[list[str], list[str]]:
    """(problems, notes): a problem fails the check, a note is worth knowing but does not."""
    problems, notes = [], []
    torch_facts, dali, driver = facts["torch"], facts["dali"], facts["driver"]
    if not torch_facts["cuda_available"]:
        (notes if quick else problems).append("no CUDA device visible to torch")
    if torch_facts["cuda"] is None:
        notes.append("torch is a CPU build")
    driver_cuda = driver.get("cuda_driver_api")
    if torch_facts["cuda"] and driver_cuda and _cuda_major(driver_cuda) < _cuda_major(torch_facts["cuda"]):
        problems.append(f"the driver supports CUDA {driver_cuda}, torch needs CUDA {torch_facts['cuda']}")
    wheels = dali.get("wheels", {})
    if not wheels:
        problems.append("no nvidia-dali wheel installed (scripts/setup.sh installs the one for torch's CUDA)")
    elif len(wheels) > 1:
        problems.append(f"several DALI wheels installed ({', '.join(wheels)}); keep the one for torch's CUDA")
    if dali.get("matches_torch") is False:
        problems.append(f"DALI wheel {', '.join(wheels)} does not match torch's CUDA {torch_facts['cuda']}")
    for key in ("import_error", "error"):
        if key in dali:
            problems.append(f"DALI: {dali[key]}")
    if not facts["ffcv"]["importable"]:
        problems.append(f"ffcv is not importable: {facts['ffcv']['error']}")
    problems += [f"loader {name} is not importable" for name, ok in facts["loaders"].items() if not ok]
    decode = facts.get("dali_mixed_decode")
    if decode is not None and not decode.get("ok"):
        problems.append(f"DALI mixed (nvJPEG) decode failed: {decode.get('error', decode)}")
    hw = facts["nvjpeg_hw_decoder"]
    if torch_facts["cuda_available"] and hw.get("present") is False:
        notes.append("no nvJPEG hardware decoder on this GPU: DALI decodes with CUDA nvJPEG only")
    elif torch_facts["cuda_available"] and hw.get("present") is None:
        notes.append(f"nvJPEG hardware decoder unknown: {hw.get('detail') or hw.get('error')}")
    return problems, notes


def _environment_headline(facts: dict) -> str:
    torch_facts, dali = facts["torch"], facts["dali"]
    hw = {True: "yes", False: "no", None: "n/a"}[facts["nvjpeg_hw_decoder"].get("present")]
    wheels = ", ".join(dali.get("wheels", {})) or "no wheel"
    return (f"torch {torch_facts['version']} (CUDA {torch_facts['cuda']}), DALI {dali.get('version', '-')} "
            f"({wheels}), ffcv {facts['ffcv'].get('version', '-')}, nvJPEG HW {hw}")


def gather_facts(log: Path, timeout: float) -> tuple[dict | None, Outcome]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "environment.json"
        code = f"from benchmark.acceptance import probe_environment; probe_environment({str(out)!r})"
        outcome = run_logged(_python("-c", code), log, timeout)
        facts = json.loads(out.read_text()) if outcome.ok and out.is_file() else None
    return facts, outcome


def check_environment(ctx: Context, outcome: Outcome) -> CheckResult:
    if not ctx.facts:
        return CheckResult("environment", "fail", f"the probe failed: {outcome.failure()}", command=outcome.command)
    problems, notes = judge_environment(ctx.facts, ctx.mode.name == "quick")
    numbers = {key: ctx.facts[key] for key in ("torch", "driver", "dali", "ffcv", "loaders", "nvjpeg_hw_decoder",
                                                "dali_mixed_decode") if key in ctx.facts}
    return CheckResult("environment", "fail" if problems else "pass", "; ".join(problems + notes),
                       _environment_headline(ctx.facts), numbers | {"notes": notes, "problems": problems},
                       command=outcome.command)


# ---------------------------------------------------------------------------------------------------------
# data: the real-photo corpus and its .beton, built once into --cache unless given
# ---------------------------------------------------------------------------------------------------------

def default_corpus(cache: Path, mode: Mode) -> Path:
    """The corpus throughput.py itself would build (same name and place), so either reuses the other's."""
    return cache / ("quick" if mode.name == "quick" else "") / f"corpus-v{CORPUS_VERSION}-{mode.corpus_images}"


def _count_images(corpus: str) -> int:
    return len(scan_image_folder(corpus, validate=False).samples)


def check_data(ctx: Context, checks: tuple[str, ...], timeout: float) -> CheckResult:
    log = ctx.logs / "data.log"
    numbers: dict = {"corpus_given": ctx.corpus is not None, "beton_given": ctx.beton is not None}
    log.write_text("")
    if ctx.corpus is None:
        corpus = default_corpus(ctx.cache, ctx.mode)
        if not corpus.is_dir():
            built = run_logged(_python("-m", "benchmark.make_corpus", "--out", str(corpus), "--images",
                                       str(ctx.mode.corpus_images), "--classes", "10"), log, timeout, append=True)
            if not built.ok:
                return CheckResult("data", "fail", f"make_corpus: {built.failure()}", log_tail=built.tail)
            numbers["corpus_built_s"] = round(built.seconds, 1)
        ctx.corpus = str(corpus)
    numbers.update(corpus=ctx.corpus, corpus_images=_count_images(ctx.corpus))
    if ctx.beton is None and "ffcv-train" in checks:
        beton, outcome = _convert(ctx, log, timeout)
        if beton is None:
            return CheckResult("data", "fail", f"ffcv conversion: {outcome.failure()}", numbers=numbers,
                               log_tail=outcome.tail)
        ctx.beton = beton
    if ctx.beton is not None:
        numbers.update(beton=ctx.beton, beton_mb=round(Path(ctx.beton).stat().st_size / 2**20, 1))
    headline = f"{numbers['corpus_images']} photos" + (f", .beton {numbers['beton_mb']} MB" if ctx.beton else "")
    return CheckResult("data", "pass", headline=headline, numbers=numbers)


def _convert(ctx: Context, log: Path, timeout: float) -> tuple[str | None, Outcome]:
    """The corpus as a .beton via throughput.py's own prepare_beton (python -m datasources.ffcv_convert
    underneath): the same file name, so the throughput check reuses it instead of converting again."""
    marker = "BETON="
    code = ("import sys; from pathlib import Path; from benchmark.throughput import prepare_beton; "
            f"print({marker!r} + prepare_beton({ctx.corpus!r}, Path({str(ctx.cache)!r}), {os.cpu_count() or 1}))")
    outcome = run_logged(_python("-c", code), log, timeout, append=True)
    found = [line[len(marker):] for line in outcome.tail if line.startswith(marker)]
    return (found[-1] if outcome.ok and found else None), outcome


# ---------------------------------------------------------------------------------------------------------
# gpu-tests, throughput, training runs
# ---------------------------------------------------------------------------------------------------------

def junit_counts(path: Path) -> dict[str, int]:
    """tests / passed / failed / errors / skipped from pytest's JUnit XML."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def check_gpu_tests(ctx: Context, timeout: float) -> CheckResult:
    xml = ctx.logs / "gpu-tests.xml"
    xml.unlink(missing_ok=True)
    command = _python("-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}", "tests")
    outcome = run_logged(command, ctx.logs / "gpu-tests.log", timeout)
    if not xml.is_file():
        return _failed("gpu-tests", command, outcome)
    counts = junit_counts(xml)
    headline = f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
    result = CheckResult("gpu-tests", "pass", headline=headline, numbers=counts, command=command)
    if counts["failures"] or counts["errors"] or not outcome.ok:
        result.verdict, result.reason = "fail", outcome.failure()
    elif not ctx.cuda:
        # pytest still ran: the gpu tests were collected (their modules import) and skipped by conftest.
        result.verdict = "skipped"
        result.reason = f"no CUDA device: the {counts['tests']} gpu tests were collected and skipped"
    elif counts["passed"] == 0:
        result.verdict, result.reason = "fail", "no gpu test ran on this CUDA machine"
    if not ctx.photos:
        result.reason += "; tests/conftest.py's photo_corpus fixture needs the photos in /usr/share/backgrounds"
    return result


def check_throughput(ctx: Context, timeout: float) -> CheckResult:
    out = ctx.results / "throughput"
    command = _python("benchmark/throughput.py", *ctx.mode.throughput, "--corpus", str(ctx.corpus),
                      "--cache", str(ctx.cache), "--out", str(out))
    outcome = run_logged(command, ctx.logs / "throughput.log", timeout)
    if not outcome.ok or not out.with_suffix(".json").is_file():
        return _failed("throughput", command, outcome)
    result = json.loads(out.with_suffix(".json").read_text())
    sections = result["sections"]
    numbers = {
        "loader_images_per_s": {n: r["images_per_s"] for n, r in sections["loader"].items()},
        "end_to_end_images_per_s": {n: r["images_per_s"] for n, r in sections["end_to_end"].items()},
        "step_images_per_s": {n: r["images_per_s"] for n, r in sections["step"].items()},
        "ceiling": result["ceiling"], "best_loader": result["best_loader"], "baseline": result["baseline"],
        "speedup_vs_baseline": result["speedup_vs_baseline"],
        "bound": {n: v["bound"] for n, v in result["verdict"].items()}, "skipped": result["skipped"],
        "files": [p.name for p in (out.with_suffix(".json"), out.with_suffix(".png")) if p.is_file()]}
    loaders = ", ".join(f"{n} {ips:,.0f}" for n, ips in numbers["loader_images_per_s"].items())
    ceiling = numbers["step_images_per_s"].get(result["ceiling"] or "")
    headline = f"loaders {loaders} img/s" + (f"; step {ceiling:,.0f} img/s" if ceiling else "")
    # Every loader is installed on an accepted machine: one the benchmark had to skip is a failure.
    skipped = "; ".join(f"{n}: {why}" for n, why in result["skipped"].items())
    return CheckResult("throughput", "fail" if skipped else "pass", skipped, headline, numbers, command=command)


def run_metrics(out: Path) -> dict:
    """Steps, loss, images/s (median after the first log window, which holds compilation and warm-up) and
    loader wait of a train.py run, plus its final evaluation if it wrote one."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not records:
        return {"steps": 0}
    timed = records[1:] or records
    numbers = {"steps": records[-1]["step"], "loss_first": records[0]["loss"], "loss_last": records[-1]["loss"],
               "images_per_s": statistics.median(r["images_per_s"] for r in timed),
               "loader_wait": statistics.median(r["loader_wait"] for r in timed),
               "elapsed_s": records[-1]["elapsed_s"]}
    if (out / "eval.json").is_file():
        numbers.update(json.loads((out / "eval.json").read_text()))
    return numbers


def _train_headline(numbers: dict) -> str:
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


def train_run(ctx: Context, name: str, args: tuple[str, ...], steps: int | None, timeout: float,
              needs_eval: bool = False) -> CheckResult:
    """One train.py run into a scratch folder under --cache; its metric files are copied to the results.
    `steps`: the step it must reach, or None for a run of whole epochs (train.py writes backbone.pt only
    after its last step, so with exit code 0 that file is the proof)."""
    work = ctx.cache / "acceptance-runs" / name
    shutil.rmtree(work, ignore_errors=True)  # a fresh run every time: train.py refuses an --out with checkpoints
    command = _python("train.py", *args, "--out", str(work))
    outcome = run_logged(command, ctx.logs / f"{name}.log", timeout, env=ctx.mode.train_env)
    kept = ctx.results / name
    shutil.rmtree(kept, ignore_errors=True)
    for file in RUN_FILES:
        if (work / file).is_file():
            kept.mkdir(parents=True, exist_ok=True)
            shutil.copy2(work / file, kept / file)
    if not outcome.ok:
        return _failed(name, command, outcome)
    if not (work / "metrics.jsonl").is_file():
        return CheckResult(name, "fail", "train.py wrote no metrics.jsonl", command=command, log_tail=outcome.tail)
    numbers = run_metrics(work)
    problems = []
    if steps is not None and numbers["steps"] != steps:
        problems.append(f"stopped at step {numbers['steps']} of {steps}")
    if numbers["steps"] and not math.isfinite(numbers["loss_last"]):
        problems.append(f"the loss is {numbers['loss_last']}")
    if needs_eval and "linear_top1" not in numbers:
        problems.append("no eval.json (kNN / linear probe) was written")
    if not (work / "backbone.pt").is_file():
        problems.append("no backbone.pt was written")
    headline = _train_headline(numbers) if numbers["steps"] else ""
    notes = goal_notes(numbers) if needs_eval and ctx.mode.name == "full" else []
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


def check_train(ctx: Context, name: str, timeout: float) -> CheckResult:
    loader, data = ("dali", ctx.corpus) if name == "dali-train" else ("ffcv", ctx.beton)
    args = ("--loader", loader, "--data", str(data), *ctx.mode.train, *COMMON_TRAIN)
    return train_run(ctx, name, args, ctx.mode.train_steps, timeout)


def check_fashion_mnist(ctx: Context, timeout: float) -> CheckResult:
    from config import parse_config

    if not FASHION_MNIST_DIR.is_dir():
        return CheckResult("fashion-mnist", "skipped", f"Fashion-MNIST files not installed in {FASHION_MNIST_DIR} "
                           "(scripts/setup.sh installs them; or set FASHION_MNIST_DIR)")
    args = ("--config", str(FASHION_MNIST_CONFIG), *ctx.mode.fashion_mnist, *COMMON_TRAIN)
    steps = parse_config(list(args)).steps
    return train_run(ctx, "fashion-mnist", args, steps, timeout, needs_eval=True)


def _failed(name: str, command: list[str], outcome: Outcome) -> CheckResult:
    return CheckResult(name, "fail", outcome.failure(), command=command, log_tail=outcome.tail)


# ---------------------------------------------------------------------------------------------------------
# running the checks, summary files
# ---------------------------------------------------------------------------------------------------------

def run_check(ctx: Context, name: str, checks: tuple[str, ...]) -> CheckResult:
    """One check (not environment, which runs first), never raising: a bug in a check is its failure."""
    timeout = ctx.timeout(name)
    if timeout is None:
        return CheckResult(name, "fail", "not started: the --time-budget was spent")
    if name in NEEDS_CORPUS and ctx.data_failed:
        return CheckResult(name, "fail", f"not run: the data check failed ({ctx.data_failed})")
    runners: dict[str, Callable[[], CheckResult]] = {
        "data": lambda: check_data(ctx, checks, timeout),
        "gpu-tests": lambda: check_gpu_tests(ctx, timeout),
        "throughput": lambda: check_throughput(ctx, timeout),
        "ffcv-train": lambda: check_train(ctx, name, timeout),
        "dali-train": lambda: check_train(ctx, name, timeout),
        "fashion-mnist": lambda: check_fashion_mnist(ctx, timeout),
    }
    try:
        result = runners[name]()
    except Interrupted:
        raise
    except Exception as err:
        result = CheckResult(name, "fail", f"{type(err).__name__}: {err}")
    if name == "data" and result.verdict == "fail":
        ctx.data_failed = result.reason
    return result


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _finish(result: CheckResult, ctx: Context, started: float, cpu_started: float) -> CheckResult:
    result.seconds = round(time.monotonic() - started, 1)
    result.cpu_seconds = round(children_cpu_seconds() - cpu_started, 1)
    result.date, result.mode = _now(), ctx.mode.name
    log = ctx.logs / f"{result.name}.log"
    if log.is_file():
        result.log = str(log.relative_to(ctx.results))
        if result.verdict == "fail" and not result.log_tail:
            result.log_tail = _tail(log)
    return result


def load_summary(results: Path, mode: str) -> dict:
    """The folder's earlier summary (part 1 when part 2 runs), or a fresh one; a summary of the other
    mode is not merged with this one (quick and full numbers must not share a table)."""
    path = results / "summary.json"
    if path.is_file():
        summary = json.loads(path.read_text())
        if summary.get("mode") == mode and summary.get("schema_version") == SCHEMA_VERSION:
            return summary
        print(f"note: {path} holds a {summary.get('mode')} run; starting a new summary", file=sys.stderr)
    return {"schema_version": SCHEMA_VERSION, "mode": mode, "checks": {}, "runs": []}


def update_summary(summary: dict, ctx: Context, results: list[CheckResult], run: dict) -> dict:
    facts = ctx.facts or {}
    summary["checks"].update({r.name: dataclasses.asdict(r) for r in results})
    summary["checks"] = {name: summary["checks"][name] for name in CHECKS if name in summary["checks"]}
    summary["runs"] = [r for r in summary["runs"] if r["id"] != run["id"]] + [run]
    torch_facts = facts.get("torch", {})
    summary.update(
        date=_now(), device=facts.get("device"), device_name=facts.get("device_name"),
        git_commit=facts.get("git_commit"), hostname=facts.get("hostname"),
        versions={**facts.get("versions", {}), "torch": torch_facts.get("version"),
                  "torch_cuda": torch_facts.get("cuda"), "dali": facts.get("dali", {}).get("version")},
        passed=all(c["verdict"] != "fail" for c in summary["checks"].values()),
    )
    return summary


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary_markdown(summary: dict) -> str:
    versions = summary["versions"]
    verdict = ("**accepted**: every check passed or was skipped for the stated reason" if summary["passed"]
               else "**not accepted**: see the failed checks and their logs in logs/")
    lines = [
        f"# Acceptance: {summary['device_name']} ({summary['mode']} mode)", "",
        f"{summary['date']}, commit {summary['git_commit']}, torch {versions.get('torch')} (CUDA "
        f"{versions.get('torch_cuda')}), DALI {versions.get('dali')}, ffcv {versions.get('ffcv')}", "",
        verdict, "",
        "| check | verdict | seconds | CPU s | numbers | reason |", "|---|---|---:|---:|---|---|",
    ]
    for name, check in summary["checks"].items():
        lines.append(f"| {name} | {check['verdict']} | {check['seconds']:.0f} | {check.get('cpu_seconds', 0):.0f} | "
                     f"{_cell(check['headline'])} | {_cell(check['reason'])} |")
    return "\n".join(lines) + "\n"


def write_summary(summary: dict, results: Path) -> None:
    write_json(summary, results / "summary.json")
    (results / "summary.md").write_text(summary_markdown(summary))


VERDICT_STYLE = {"pass": "green", "fail": "bold red", "skipped": "yellow"}


def print_table(summary: dict, ran: set[str], console: Console) -> None:
    table = Table(title=f"acceptance on {summary['device_name']} ({summary['mode']} mode)")
    for column in ("check", "verdict", "s", "numbers", "reason"):
        table.add_column(column, justify="right" if column == "s" else "left", overflow="fold")
    for name, check in summary["checks"].items():
        style = VERDICT_STYLE[check["verdict"]]
        table.add_row(name + ("" if name in ran else " (earlier)"), f"[{style}]{check['verdict']}[/]",
                      f"{check['seconds']:.0f}", escape(check["headline"]), escape(check["reason"]))
    console.print(table)


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------

class ArgumentError(ValueError):
    """Bad input, found before any check runs: one line, exit code 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmark.acceptance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--part", choices=tuple(PARTS), default="all",
                       help=f"1: {', '.join(PARTS['1'])}; 2: {', '.join(PARTS['2'])}; all (default)")
    which.add_argument("--checks", help=f"comma-separated subset of {','.join(CHECKS)} "
                       "(environment always runs; data is added when a check needs it)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny sizes (default without CUDA)")
    mode.add_argument("--full", action="store_true", help="GPU acceptance sizes (default with CUDA)")
    parser.add_argument("--results", type=Path, help="results folder (default: "
                        "benchmark/results/acceptance-<device>-<date>/); an existing summary there is extended")
    parser.add_argument("--corpus", help="prebuilt ImageFolder of JPEGs (default: build one in --cache)")
    parser.add_argument("--beton", help="prebuilt .beton for ffcv-train (default: convert the corpus into --cache)")
    parser.add_argument("--cache", type=Path, default=REPO / "data" / "bench",
                        help="built corpus and .beton (shared with benchmark/throughput.py), scratch run folders")
    parser.add_argument("--time-budget", type=float, help=f"seconds for this invocation; a check is cut to what is "
                        f"left (default: {PART_BUDGET_S} for --part 1 or 2, none otherwise)")
    return parser.parse_args(argv)


def selected_checks(args: argparse.Namespace) -> tuple[str, ...]:
    if args.checks is None:
        return PARTS[args.part]
    names = {name.strip() for name in args.checks.split(",") if name.strip()}
    if unknown := names - set(CHECKS):
        raise ArgumentError(f"--checks: unknown check(s) {', '.join(sorted(unknown))}; choose from {', '.join(CHECKS)}")
    names |= {"environment"} | ({"data"} if names & set(NEEDS_CORPUS) else set())
    return tuple(name for name in CHECKS if name in names)


def photos_available() -> bool:
    try:
        find_photos()
    except SystemExit:
        return False
    return True


def preflight(args: argparse.Namespace, checks: tuple[str, ...]) -> None:
    """Reject paths that cannot work before minutes are spent on the checks that come first."""
    if args.corpus is not None:
        try:
            _count_images(args.corpus)
        except (ValueError, OSError) as err:
            raise ArgumentError(f"--corpus {args.corpus}: {err}") from None
    if args.beton is not None and "ffcv-train" in checks and not Path(args.beton).is_file():
        raise ArgumentError(f"--beton {args.beton}: no such file (make one with python -m datasources.ffcv_convert "
                            "--src <corpus> --out <file>.beton, or leave --beton out to convert the corpus)")
    needs_photos = args.corpus is None and set(checks) & set(NEEDS_CORPUS)
    if needs_photos and not any(default_corpus(args.cache, MODES[m]).is_dir() for m in MODES) \
            and not photos_available():
        raise ArgumentError("no corpus: give --corpus DIR (an ImageFolder of JPEGs, e.g. one made elsewhere with "
                            "python -m benchmark.make_corpus) or install the photos it is built from "
                            "(apt-get install mate-backgrounds ukui-wallpapers lomiri-wallpapers)")


def default_results(facts: dict | None) -> Path:
    name = "cpu"
    if facts and facts.get("device") == "cuda":
        name = re.sub(r"[^a-z0-9]+", "-", facts["device_name"].lower()).strip("-")
    return REPO / "benchmark" / "results" / f"acceptance-{name}-{dt.date.today().isoformat()}"


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM (a job's time limit) raises Interrupted, so the running check's process group is killed
    and the summary is written; the default would leave the children running on the GPU."""
    def handler(signum, frame):
        raise Interrupted(f"stopped by signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _announce(result: CheckResult, console: Console) -> None:
    style = VERDICT_STYLE[result.verdict]
    detail = " - ".join(part for part in (result.headline, result.reason) if part)
    console.print(f"[{style}]{result.verdict:>7}[/] {result.name} ({result.seconds:.0f} s) {escape(detail)}")


def run(args: argparse.Namespace, console: Console) -> int:
    checks = selected_checks(args)
    preflight(args, checks)
    with stop_on_signals():
        return run_checks(args, checks, console)


def run_checks(args: argparse.Namespace, checks: tuple[str, ...], console: Console) -> int:
    budget = args.time_budget
    if budget is None and args.checks is None and args.part != "all":
        budget = PART_BUDGET_S
    started, cpu_started = time.monotonic(), children_cpu_seconds()
    with tempfile.TemporaryDirectory() as tmp:
        facts, probe = gather_facts(Path(tmp) / "environment.log", MODES["full"].timeouts["environment"])
        cuda = bool(facts and facts["torch"]["cuda_available"])
        if args.full and not cuda:
            raise ArgumentError("--full needs a CUDA device and torch sees none; use --quick")
        mode = MODES["full" if args.full or (cuda and not args.quick) else "quick"]
        results = (args.results or default_results(facts)).resolve()
        (results / "logs").mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "environment.log", results / "logs" / "environment.log")
    ctx = Context(mode, results, args.cache.resolve(), args.corpus, args.beton,
                  None if budget is None else started + budget, facts or {}, photos_available())
    console.print(f"acceptance ({mode.name} mode): {', '.join(checks)} -> {results}")
    summary = load_summary(results, mode.name)
    run_entry = {"id": _now(), "argv": sys.argv[1:], "mode": mode.name, "checks": list(checks)}
    done = [_finish(check_environment(ctx, probe), ctx, started, cpu_started)]
    _announce(done[0], console)
    for name in checks[1:]:
        write_summary(update_summary(summary, ctx, done, run_entry), results)
        check_started, cpu_started = time.monotonic(), children_cpu_seconds()
        try:
            result = run_check(ctx, name, checks)
        except (Interrupted, KeyboardInterrupt) as err:
            result = CheckResult(name, "fail", f"interrupted ({err or 'Ctrl-C'})")
            done.append(_finish(result, ctx, check_started, cpu_started))
            break
        done.append(_finish(result, ctx, check_started, cpu_started))
        _announce(done[-1], console)
    run_entry["seconds"] = round(time.monotonic() - started, 1)
    write_summary(update_summary(summary, ctx, done, run_entry), results)
    print_table(summary, {r.name for r in done}, console)
    console.print(f"wrote {results / 'summary.json'}, {results / 'summary.md'}")
    return 1 if any(r.verdict == "fail" for r in done) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Piped output (CI logs, tee) would otherwise wrap the table at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    try:
        return run(args, console)
    except ArgumentError as err:
        print(f"acceptance: error: {err}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt):
        print("acceptance: interrupted before any check ran", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
