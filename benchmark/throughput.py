"""Throughput of every loader and baseline, of the BYOL step, and of both together, on this machine (CPU or GPU).

    python benchmark/throughput.py                     # full run for this machine's device
    python benchmark/throughput.py --quick             # seconds-long smoke run (what the tests use)
    python benchmark/throughput.py --loaders dali solo-learn --sections loader --res 224 --batch-size 64
    python benchmark/throughput.py --budget 240        # every figure cut to fit four minutes

An image is one dataset image delivered as BOTH augmented views on the training device (ffcv
includes its on-device augmentation). Sections:
- decode:        PIL (libjpeg-turbo) decode of the corpus JPEGs in a process pool over all cores, nothing
                 else: the physical limit of any CPU loader (run by default on CPU only).
- loader:        loader-only images/s of each installed loader (dali, ffcv, torchvision) and of the
                 solo-learn baseline (benchmark/baselines.py). Every speed-up is quoted against the
                 faster of the baselines (torchvision, solo-learn): `baseline` in the JSON.
- step:          step-only images/s from synthetic device views (made once on the device and replayed,
                 so they cost nothing: the synthetic loader is the step's feeder, not a loader figure):
                 eager/compiled x fused LARS (`lars`) / the same formula one parameter at a time
                 (`lars-loop`, the reference: the ratio isolates the fusion, `lars_agreement` checks the
                 two give the same weights) / torch-optimizer's LARS (`torch-optimizer-lars`, the
                 LARC formula a user would otherwise pick). The compute ceiling.
- end_to_end:    each loader feeding the real step (the ceiling's configuration).
- ffcv_variants: FFCV decode-once vs stock FFCV (two decoders), crops only and with the augmentation
                 (benchmark/ffcv_variants.py), and the decode/crop cost model `ffcv_costs`.
Order: the step section first (each compile mode built and compiled once, timing every optimizer by
swapping the optimizer: the compiled graph does not contain it), then each loader once, loader-only and
then end-to-end on the ceiling's step from the same stream (DALI builds, ffcv compiles its numba pipeline
once), then the ffcv variants. The JSON is rewritten (atomically) after every figure, so a run that is
killed leaves a valid file of what it finished (`complete` false), and a line at least every 15 s says
what is running. With `--budget SECONDS` each figure's timed runs are cut to its share of what is left
after the set-up costs still to come (compilation, pipeline builds), and a figure that cannot fit is not
started: it is listed under `skipped` with a reason starting "budget:".
Warm-up (pipeline build, compilation, the first pass through the OS cache) is never timed: every
corpus file is read once first, then `--warmup` batches/steps run untimed. Each figure is the median
of `--repeats` runs; a run lasts at least `--batches` batches (`--steps` steps) AND `--seconds`
(`--step-seconds`), so slow steps are timed long enough to be stable. The loaders keep streaming
across runs and epochs.

Defaults follow the device (`PRESETS`). On CUDA: ResNet-50, batch 256, bf16 views and autocast,
channels_last, eager and compiled; DALI decodes with device="mixed" (nvJPEG, partly the hardware
decoder) and augments on the GPU, ffcv decodes and crops on the CPU and runs gpu_augment on the GPU.
On CPU: ResNet-18, batch 32, eager, each step/end-to-end run at least 30 s. All device choices are
made in `Bench`.

JSON (benchmark/results/<device>-<date>.json; runs/benchmark/<device>-<date>-quick.json with --quick;
stable keys, schema_version 2):
    complete:    true once every planned figure was measured or skipped; false in a run that was killed
    environment: date, device ("cpu"|"cuda"), device_name, cpu_model, cpu_cores_used, cpu_count,
                 torch_threads, load_average [1, 5, 15 min] at the start, load_average_end, hostname,
                 versions {python, torch, ...}, git_commit
    setup:       corpus, corpus_images, beton, res, batch_size, arch, small_images, width, hidden_dim,
                 precision, view_dtype, workers, repeats, loader_batches, loader_seconds, loader_warmup,
                 steps, step_seconds, step_warmup, compile_modes, optimizers, loaders, sections, quick,
                 budget_s (--budget or null), notes [str]
    sections:    {decode: {pil: R}, loader: {<loader>: R}, step: {<compile>-<optimizer>: R},
                  end_to_end: {<loader>: R}, ffcv_variants: {<variant>: R}}, a section not run is {};
                  R = {images_per_s (median), min, max, spread_pct ((max-min)/median), runs [images/s],
                  seconds [s per run], units [batches/steps per run], warmup, warmup_seconds (untimed
                  warm-up incl. compilation), per_run (minimum units), min_seconds, unit}
    ceiling:     key of sections.step that end_to_end runs and verdicts compare with, or null
    verdict:     {<loader>: {bound ("loader"|"compute"), loader_images_per_s, step_images_per_s,
                  loader_over_step, end_to_end_images_per_s, end_to_end_pct_of_step, above_ceiling,
                  loader_pct_of_decode}} for loaders with both a loader-only figure and a ceiling;
                  bound is "loader" exactly when loader_images_per_s < step_images_per_s;
                  above_ceiling is true when end-to-end came out above the step it runs, which it
                  cannot be: that excess is measurement noise (null without end-to-end); the
                  end_to_end and decode fields are null when that section did not run
    baseline:    the strongest baseline (the faster of torchvision and solo-learn loader-only), or null
    speedup_vs_baseline: {<loader>: loader-only images/s / the baseline's}, {} without a baseline
    best_loader: the fastest fastbyol loader (dali, ffcv) by loader-only images/s, or null
    lars_agreement: {steps, max_abs_diff, max_abs_param} of the online weights after the same `steps`
                 eager steps with `lars` and with `lars-loop` from the same start, or null
    ffcv_costs:  {images, decode_ms, crop_ms, once_vs_twice_model} (ffcv_variants section) or null
    skipped:     {<loader or section>: reason}
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as dt
import gc
import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from benchmark.baselines import BASELINES, build_baseline, strongest_baseline
from benchmark.ffcv_variants import VARIANTS, build_variant, decode_crop_costs
from benchmark.make_corpus import CORPUS_VERSION, make_corpus
from benchmark.progress import Budget, Heartbeat
from benchmark.report import plot, print_report, write_json
from benchmark.timing import (
    REPO,
    Rate,
    endless,
    environment,
    measure_loader,
    measure_stream,
    rate_of,
    time_runs,
    warm_os_cache,
)
from config import TrainConfig
from datasources.ffcv_convert import DEFAULT_JPEG_QUALITY
from datasources.imagefolder import scan_image_folder
from models.backbones import ARCHS, DEFAULT_WIDTH
from models.step import ByolStep, step_precision, view_dtype
from optim.factory import OPTIMIZERS, build_optimizer
from optim.schedules import scaled_lr
from pipelines.base import Batch, LoaderConfig, LoaderUnavailable, TwoViewLoader
from pipelines.registry import LOADER_MODULES, build_loader, is_available
from pipelines.views import BYOL_VIEWS
from runtime.assembly import build_model, build_step
from runtime.backends import configure_backends

SECTIONS = ("decode", "loader", "step", "end_to_end", "ffcv_variants")
COMPILE_MODES = ("eager", "compiled")
# The LARS implementations side by side: the fused one, its per-tensor reference, torch-optimizer's.
LARS_OPTIMIZERS = tuple(name for name in OPTIMIZERS if "lars" in name)
SCHEMA_VERSION = 2
# The synthetic loader replays views made once on the device: the step section's feeder, not a loader.
FEEDER = "synthetic"
FASTBYOL_LOADERS = tuple(name for name in LOADER_MODULES if name not in (FEEDER, *BASELINES))
LOADERS = (*FASTBYOL_LOADERS, *BASELINES)
LARS_AGREEMENT_STEPS = 3
# Untimed set-up a budget must leave room for, measured: the ResNet-50 step compiles in 81 s on an H200's
# 16 cores (2026-12-04), the quickstart's in 115 s on 2 CPU cores; a DALI pipeline builds in seconds, an
# ffcv Loader compiles its numba pipeline in 10-30 s. A timed run is at least MIN_RUN_S long.
COMPILE_S = {"cuda": 100.0, "cpu": 150.0}
LOADER_SETUP_S = {"dali": 10.0, "ffcv": 20.0}
MIN_RUN_S = 1.0


@dataclass(frozen=True)
class Sizes:
    """Run sizes; every CLI flag left unset takes its value from the preset for the device."""

    res: int
    batch_size: int
    arch: str
    hidden_dim: int
    images: int  # corpus size when --corpus is not given
    repeats: int
    batches: int  # loader batches per timed run, at least
    seconds: float  # loader seconds per timed run, at least
    warmup: int  # untimed loader batches
    steps: int  # steps per timed run (step and end-to-end), at least
    step_seconds: float  # step and end-to-end seconds per timed run, at least
    step_warmup: int
    compile_modes: tuple[str, ...]
    sections: tuple[str, ...]
    small_images: bool | None = None  # None: the trainer's rule (CIFAR stem at <= SMALL_IMAGE_MAX_RES px)
    width: int = DEFAULT_WIDTH


PRESETS = {
    "cuda": Sizes(res=224, batch_size=256, arch="resnet50", hidden_dim=4096, images=5000, repeats=5, batches=30,
                  seconds=5.0, warmup=10, steps=20, step_seconds=5.0, step_warmup=5, compile_modes=COMPILE_MODES,
                  sections=("loader", "step", "end_to_end", "ffcv_variants")),
    # A ResNet-18 BYOL step of 32 images at 224 px takes seconds on 2 cores: 30 s per run keeps the
    # step and end-to-end spread small enough to compare the two.
    "cpu": Sizes(res=224, batch_size=32, arch="resnet18", hidden_dim=4096, images=1000, repeats=3, batches=10,
                 seconds=10.0, warmup=3, steps=2, step_seconds=30.0, step_warmup=3, compile_modes=("eager",),
                 sections=SECTIONS),
    # The ImageNet stem at 32 px: the CIFAR stem would make the smoke run's step 16x as costly; width 8 (1/64
    # of the conv weights) keeps the steps' share of the smoke run small.
    "quick": Sizes(res=32, batch_size=8, arch="resnet18", hidden_dim=256, images=48, repeats=2, batches=2,
                   seconds=0.0, warmup=1, steps=2, step_seconds=0.0, step_warmup=1, compile_modes=("eager",),
                   sections=SECTIONS, small_images=False, width=8),
}


@dataclass
class Bench:
    """Everything a section needs: the device (the one place device choices are made), sizes, data."""

    device: torch.device
    sizes: Sizes
    cores: int
    # Loader workers, always equal to torch's intra-op threads: FFCV's Loader sets torch's thread
    # count to its worker count at every epoch, so any other pairing would not hold.
    workers: int
    corpus: str
    paths: list[str]  # the corpus images every loader reads (datasources.imagefolder's sample list)
    beton: str | None
    quick: bool

    @property
    def train_config(self) -> TrainConfig:
        s = self.sizes
        return TrainConfig(arch=s.arch, res=s.res, batch_size=s.batch_size, hidden_dim=s.hidden_dim,
                           small_images=s.small_images, width=s.width).resolved()

    @property
    def precision(self) -> str:
        return step_precision(self.train_config.precision, self.device)

    @property
    def dtype(self) -> torch.dtype:
        return view_dtype(self.train_config.precision, self.device)

    def loader_config(self, name: str) -> LoaderConfig:
        reads_beton = name == "ffcv" or name in VARIANTS
        return LoaderConfig(data=self.beton if reads_beton else self.corpus, batch_size=self.sizes.batch_size,
                            recipe=BYOL_VIEWS.with_overrides(res=self.sizes.res), device=self.device,
                            dtype=self.dtype, workers=self.workers,
                            compile="compiled" in self.sizes.compile_modes)

    def build_step(self, compile_mode: str, optimizer: str) -> ByolStep:
        cfg = replace(self.train_config, optimizer=optimizer, compile=compile_mode == "compiled")
        torch.manual_seed(cfg.seed)  # every step starts from the same weights
        return build_step(cfg, build_model(cfg, self.device), self.device)


def loader_module(name: str) -> str:
    """The registry loader a benchmark loader needs: the baselines run on the torchvision loader."""
    return "torchvision" if name in BASELINES else name


def is_installed(name: str) -> bool:
    return is_available(loader_module(name))


def build_any(name: str, cfg: LoaderConfig) -> TwoViewLoader:
    """A fastbyol loader, a baseline or an ffcv variant by name."""
    if name in BASELINES:
        return build_baseline(name, cfg)
    if name in VARIANTS:
        return build_variant(name, cfg)
    return build_loader(name, cfg)


@contextlib.contextmanager
def batch_stream(name: str, cfg: LoaderConfig) -> Iterator[Iterator[Batch]]:
    """An endless batch stream of the named loader, shut down (threads, workers) on exit."""
    stream = endless(build_any(name, cfg))
    try:
        yield stream
    finally:
        stream.close()
        gc.collect()


def _decode(paths: list[str]) -> int:
    for path in paths:
        with Image.open(path) as img:
            img.convert("RGB")  # a no-op copy for RGB JPEGs, a real conversion for the odd ones, as loaders do
    return len(paths)


def measure_decode(paths: list[str], workers: int, repeats: int) -> Rate:
    """Decode-only images/s of the corpus JPEGs over `workers` processes (one untimed pass first)."""
    chunks = [paths[i::workers * 4] for i in range(workers * 4)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode, chunks))  # starts the workers and imports PIL there

        def run() -> tuple[int, int]:
            files = sum(pool.map(_decode, chunks))
            return files, files

        return rate_of(time_runs(run, repeats, torch.device("cpu")), warmup=1, per_run=len(paths), unit="files")


def swap_optimizer(bench: Bench, step: ByolStep, optimizer: str, initial: dict) -> None:
    """Give `step` a fresh `optimizer` and the initial weights: the compiled forward and EMA do not contain
    the optimizer, so the same compiled graph times every optimizer without compiling again."""
    step.byol.load_state_dict(initial)
    cfg = bench.train_config
    step.optimizer = build_optimizer(optimizer, step.byol.online.parameters(), scaled_lr(cfg.base_lr, cfg.batch_size),
                                     cfg.weight_decay, cfg.momentum, cfg.eta, bench.device, cfg.lr_1d_scale)


def measure_step(bench: Bench, step: ByolStep, stream: Iterator[Batch], run_s: RunSeconds) -> Rate:
    """Step images/s over `stream`: the synthetic feeder gives the step-only ceiling, a real loader gives
    end-to-end."""
    s, cfg = bench.sizes, bench.train_config
    lr, tau = scaled_lr(cfg.base_lr, s.batch_size), cfg.tau_base

    def consume(batch: Batch) -> None:
        step(batch[0], batch[1], lr, tau)

    return measure_stream(stream, consume, s.step_warmup, s.steps, s.repeats, bench.device, "steps",
                          run_s.least, run_s.most)


def measure_loader_only(bench: Bench, stream: Iterator[Batch], run_s: RunSeconds) -> Rate:
    s = bench.sizes
    return measure_loader(stream, s.warmup, s.batches, s.repeats, bench.device, run_s.least, run_s.most)


def lars_agreement(bench: Bench, steps: int = LARS_AGREEMENT_STEPS) -> dict:
    """The fused `lars` and the per-parameter `lars-loop` from the same weights on the same batches:
    the largest difference of any online weight after `steps` eager steps."""
    cfg = bench.train_config
    lr, tau = scaled_lr(cfg.base_lr, bench.sizes.batch_size), cfg.tau_base
    fused, loop = (bench.build_step("eager", name) for name in ("lars", "lars-loop"))
    with batch_stream(FEEDER, bench.loader_config(FEEDER)) as stream:
        for _ in range(steps):
            view1, view2, _ = next(stream)
            fused(view1, view2, lr, tau)
            loop(view1, view2, lr, tau)
    pairs = [(a.detach(), b.detach()) for a, b in zip(fused.byol.online.parameters(), loop.byol.online.parameters(),
                                                       strict=True)]
    return {"steps": steps,
            "max_abs_diff": max(float((a - b).abs().max()) for a, b in pairs),
            "max_abs_param": max(float(a.abs().max()) for a, _ in pairs)}


def ceiling_key(compile_modes: tuple[str, ...]) -> str:
    """The step end-to-end runs: the trainer's default (compiled, fused LARS) unless compile is off."""
    return f"{'compiled' if 'compiled' in compile_modes else 'eager'}-lars"


def verdicts(sections: dict, ceiling: str | None) -> dict:
    step = sections["step"].get(ceiling) if ceiling else None
    if step is None:
        return {}
    out = {}
    decode = sections["decode"].get("pil", {}).get("images_per_s")
    for name, rate in sections["loader"].items():
        loader_ips, step_ips = rate["images_per_s"], step["images_per_s"]
        e2e = sections["end_to_end"].get(name, {}).get("images_per_s")
        out[name] = {
            "bound": "loader" if loader_ips < step_ips else "compute",
            "loader_images_per_s": loader_ips, "step_images_per_s": step_ips,
            "loader_over_step": loader_ips / step_ips,
            "end_to_end_images_per_s": e2e,
            "end_to_end_pct_of_step": None if e2e is None else 100.0 * e2e / step_ips,
            "above_ceiling": None if e2e is None else e2e > step_ips,
            "loader_pct_of_decode": None if decode is None else 100.0 * loader_ips / decode,
        }
    return out


LOADER_ERRORS = (LoaderUnavailable, ValueError, RuntimeError)


@dataclass(frozen=True)
class RunSeconds:
    """How long each timed run of a figure lasts: at least `least`, and past `most` it ends after the
    unit it is in (a budgeted run must not overrun); `most` None: no cap."""

    least: float
    most: float | None = None


@dataclass(frozen=True)
class Figure:
    """One planned figure: where it goes in the JSON and the untimed seconds it costs before its runs
    (pipeline build, compilation), which the budget must have room for."""

    section: str
    name: str
    setup_s: float = 0.0
    least_s: float = 0.0  # each timed run lasts at least this long (the preset's --seconds / --step-seconds)


class Recorder:
    """The result being measured. Each figure lands in it, derived keys are refreshed and the JSON is
    rewritten at once (atomically), so a run killed at any moment leaves a valid JSON of what finished.
    With a budget, each figure's runs get an equal share of what is left after the planned set-up costs,
    and a figure whose own set-up and shortest runs no longer fit is skipped, with the reason under
    `skipped`: the figures planned first are the ones kept."""

    def __init__(self, result: dict, path: Path, plan: list[Figure], budget: Budget, beat: Heartbeat,
                 repeats: int):
        self.result, self.path, self.plan, self.budget, self.beat = result, path, list(plan), budget, beat
        self.repeats = repeats
        self.save()

    def save(self) -> None:
        refresh_derived(self.result)
        write_json(self.result, self.path)

    def skip(self, name: str, reason: str) -> None:
        self.result["skipped"][name] = reason
        self.save()

    def run_seconds(self, figure: Figure) -> RunSeconds | None:
        """This figure's per-run seconds, or None when the budget cannot hold it (it is then skipped)."""
        if not self.budget.limited:
            return RunSeconds(figure.least_s)
        # Earlier figures come first: one starts when its own set-up and shortest runs fit in what is left,
        # and its runs get an equal share of what the set-ups still to come leave over.
        allowed = self.budget.allow(figure.setup_s + MIN_RUN_S * self.repeats)
        if allowed is None:
            return None
        share = (self.budget.left() - sum(f.setup_s for f in self.plan)) / len(self.plan)
        per_run = max(MIN_RUN_S, min(share, allowed - figure.setup_s) / self.repeats)
        return RunSeconds(min(figure.least_s, per_run), per_run)

    def drop(self, figure: Figure) -> None:
        """Take `figure` out of the plan: the budget cannot hold it."""
        self.plan.remove(figure)
        self.skip(f"{figure.section} {figure.name}", f"budget: needs about "
                  f"{figure.setup_s + MIN_RUN_S * self.repeats:.0f} s, {self.budget.left():.0f} s left")

    def measure(self, figure: Figure, measure: Callable[[RunSeconds], Rate | dict]) -> dict | None:
        """Time `figure` with `measure(run_seconds)` unless the budget cannot hold it; a loader that fails
        is reported under `skipped` and the run goes on."""
        run_s = self.run_seconds(figure)
        if run_s is None:
            self.drop(figure)
            return None
        self.plan.remove(figure)
        label = f"{figure.section} {figure.name}"
        self.beat.phase(f"{label}: set-up and {self.repeats} timed runs"
                        + (f" of {run_s.least:.0f}-{run_s.most:.0f} s" if run_s.most else ""))
        try:
            measured = measure(run_s)
        except LOADER_ERRORS as err:
            self.skip(figure.name, f"{type(err).__name__}: {err}")
            return None
        rate = measured.to_dict() if isinstance(measured, Rate) else measured
        self.result["sections"][figure.section][figure.name] = rate
        self.save()
        return rate


def refresh_derived(result: dict) -> None:
    """The keys that follow from the measured sections (verdicts, baseline, speed-ups, best loader)."""
    sections = result["sections"]
    measured = {n: r["images_per_s"] for n, r in sections["loader"].items()}
    baseline = strongest_baseline(measured)
    ours = {n: ips for n, ips in measured.items() if n in FASTBYOL_LOADERS}
    ceiling = result["ceiling"]
    result.update(
        verdict=verdicts(sections, ceiling), baseline=baseline,
        speedup_vs_baseline={n: ips / measured[baseline] for n, ips in measured.items()} if baseline else {},
        best_loader=max(ours, key=ours.get) if ours else None)


def plan_figures(bench: Bench, loaders: list[str], sections: tuple[str, ...], optimizers: tuple[str, ...],
                 ceiling: str | None) -> tuple[list[Figure], list[str]]:
    """Every figure in the order it is measured, and the step configurations (compile-optimizer) to time.

    The step section first, on a machine no loader has touched yet; each compile mode is built once and
    times every optimizer (`swap_optimizer`). Then each loader once: loader-only, then end-to-end on the
    ceiling's step from the same stream, so a pipeline is built (DALI) or compiled (ffcv's numba) once.
    The ffcv variants last."""
    s, cuda = bench.sizes, bench.device.type == "cuda"
    configs = [f"{c}-{o}" for c in s.compile_modes for o in optimizers] if "step" in sections else []
    if "end_to_end" in sections and ceiling not in configs:
        configs.insert(0, ceiling)
    plan = [Figure("decode", "pil")] if "decode" in sections else []
    seen_modes: set[str] = set()
    for key in configs:
        mode = key.split("-", 1)[0]
        compiles = mode == "compiled" and mode not in seen_modes
        seen_modes.add(mode)
        plan.append(Figure("step", key, COMPILE_S["cuda" if cuda else "cpu"] if compiles else 0.0, s.step_seconds))
    for name in loaders:
        setup = LOADER_SETUP_S.get(name, 0.0)
        if "loader" in sections:
            plan.append(Figure("loader", name, setup, s.seconds))
        if "end_to_end" in sections:
            plan.append(Figure("end_to_end", name, 0.0 if "loader" in sections else setup, s.step_seconds))
    if "ffcv_variants" in sections and "ffcv" in loaders:
        plan += [Figure("ffcv_variants", name, LOADER_SETUP_S["ffcv"], s.seconds) for name in VARIANTS]
    return plan, configs


def run_sections(bench: Bench, recorder: Recorder, loaders: list[str], sections: tuple[str, ...],
                 optimizers: tuple[str, ...], configs: list[str]) -> None:
    """Measure the planned figures into `recorder` (see `plan_figures` for the order)."""
    result, beat = recorder.result, recorder.beat
    figures = {(f.section, f.name): f for f in recorder.plan}
    if "decode" in sections:
        recorder.measure(figures["decode", "pil"],
                         lambda run_s: measure_decode(bench.paths, bench.cores, bench.sizes.repeats))
    ceiling, ceiling_step = result["ceiling"], None
    by_mode: dict[str, list[str]] = {}
    for key in configs:
        by_mode.setdefault(key.split("-", 1)[0], []).append(key.split("-", 1)[1])
    for mode, names in by_mode.items():
        beat.phase(f"step {mode}: building the model")
        step = bench.build_step(mode, names[0])
        initial = copy.deepcopy(step.byol.state_dict())
        for i, name in enumerate(names):
            if i:
                swap_optimizer(bench, step, name, initial)
            with batch_stream(FEEDER, bench.loader_config(FEEDER)) as stream:
                recorder.measure(figures["step", f"{mode}-{name}"],
                                 lambda run_s, stream=stream, step=step: measure_step(bench, step, stream, run_s))
        if f"{mode}-lars" == ceiling:
            if names[-1] != "lars":
                swap_optimizer(bench, step, "lars", initial)
            ceiling_step = step
        else:
            del step
            gc.collect()
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
    if "step" in sections and {"lars", "lars-loop"} <= set(optimizers):
        beat.phase("lars vs lars-loop: the same steps from the same weights")
        result["lars_agreement"] = lars_agreement(bench)
        recorder.save()
    for name in loaders:
        planned = [figures[key] for key in (("loader", name), ("end_to_end", name)) if key in figures]
        if all(recorder.run_seconds(f) is None for f in planned):
            for figure in planned:
                recorder.drop(figure)
            continue
        beat.phase(f"{name}: building the loader")
        try:
            with batch_stream(name, bench.loader_config(name)) as stream:
                if ("loader", name) in figures:
                    recorder.measure(figures["loader", name],
                                     lambda run_s, stream=stream: measure_loader_only(bench, stream, run_s))
                if ("end_to_end", name) in figures and ceiling_step is not None:
                    recorder.measure(figures["end_to_end", name], lambda run_s, stream=stream: measure_step(
                        bench, ceiling_step, stream, run_s))
        except LOADER_ERRORS as err:
            recorder.plan = [f for f in recorder.plan if f not in planned]
            recorder.skip(name, f"{type(err).__name__}: {err}")
    for name in VARIANTS if ("ffcv_variants", VARIANTS[0]) in figures else ():
        def variant(run_s: RunSeconds, name: str = name) -> Rate:
            with batch_stream(name, bench.loader_config(name)) as stream:
                return measure_loader_only(bench, stream, run_s)

        recorder.measure(figures["ffcv_variants", name], variant)
    if ("ffcv_variants", VARIANTS[0]) in figures and result["sections"]["ffcv_variants"]:
        beat.phase("ffcv: decode and crop costs")
        result["ffcv_costs"] = decode_crop_costs(bench.paths, bench.sizes.res, DEFAULT_JPEG_QUALITY)
        recorder.save()


def prepare_corpus(corpus: str | None, cache: Path, images: int) -> str:
    if corpus is not None:
        if not Path(corpus).is_dir():
            raise ValueError(f"--corpus {corpus} is not a folder; build one with "
                             f"python -m benchmark.make_corpus --out {corpus} --images 2000")
        return corpus
    path = cache / f"corpus-v{CORPUS_VERSION}-{images}"
    if not path.is_dir():
        print(f"building a {images}-image corpus of real photos in {path}", file=sys.stderr)
        make_corpus(path, images=images, classes=10, seed=0)
    return str(path)


def prepare_beton(corpus: str, cache: Path, workers: int) -> str:
    """The corpus as a .beton in the cache, converted once; the name hashes the corpus path and its
    mtime, so a rebuilt corpus gets a fresh file."""
    from datasources.ffcv_convert import main as ffcv_convert

    root = Path(corpus).resolve()
    key = hashlib.sha1(f"{root}:{root.stat().st_mtime_ns}".encode()).hexdigest()[:10]
    out = cache / f"{root.name}-{key}.beton"
    if not out.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        if ffcv_convert(["--src", corpus, "--out", str(out), "--workers", str(workers)]) != 0:
            raise RuntimeError(f"could not convert {corpus} to {out} (see the converter's message above)")
    return str(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmark/throughput.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=list(LOADERS),
                        help="fastbyol loaders and baselines to measure (default: all)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, help="default: all (decode on CPU only)")
    parser.add_argument("--corpus", help="ImageFolder root of JPEGs (default: build one in --cache)")
    parser.add_argument("--images", type=int, help="size of the corpus built when --corpus is not given")
    parser.add_argument("--res", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--arch", choices=list(ARCHS))
    parser.add_argument("--width", type=int, help=f"backbone width (default {DEFAULT_WIDTH}, torchvision's)")
    parser.add_argument("--hidden-dim", type=int, help="projector/predictor hidden width")
    parser.add_argument("--repeats", type=int, help="timed runs per figure (median reported)")
    parser.add_argument("--batches", type=int, help="loader batches per timed run, at least")
    parser.add_argument("--seconds", type=float, help="loader seconds per timed run, at least")
    parser.add_argument("--warmup", type=int, help="untimed loader batches before timing")
    parser.add_argument("--steps", type=int, help="steps per timed run (step and end-to-end), at least")
    parser.add_argument("--step-seconds", type=float, help="seconds per step and end-to-end run, at least")
    parser.add_argument("--step-warmup", type=int, help="untimed steps (compilation happens here)")
    parser.add_argument("--compile-modes", nargs="+", choices=COMPILE_MODES)
    parser.add_argument("--optimizers", nargs="+", choices=LARS_OPTIMIZERS, default=list(LARS_OPTIMIZERS))
    parser.add_argument("--cores", type=int, help="pin the run and its workers to this many cores (default: all)")
    parser.add_argument("--cache", type=Path, default=REPO / "data" / "bench", help="corpus and .beton cache")
    parser.add_argument("--out", type=Path, help="output path without suffix (default: "
                        "benchmark/results/<device>-<date>; runs/benchmark/<device>-<date>-quick with --quick)")
    parser.add_argument("--budget", type=float, help="seconds for the whole command: each figure's runs are cut to "
                        "its share of what is left, and a figure that cannot fit is skipped (listed under skipped)")
    parser.add_argument("--quick", action="store_true",
                        help="seconds-long smoke run: tiny corpus, res 32, small resnet18, 2 batches, no compile")
    return parser.parse_args(argv)


def resolve_sizes(args: argparse.Namespace, device: torch.device) -> Sizes:
    preset = PRESETS["quick" if args.quick else device.type]
    sections = tuple(args.sections) if args.sections else tuple(
        s for s in preset.sections if s != "decode" or device.type == "cpu" or args.quick)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)
                 if f.name != "sections" and getattr(args, f.name, None) is not None}
    if "compile_modes" in overrides:
        overrides["compile_modes"] = tuple(overrides["compile_modes"])
    sizes = dataclasses.replace(preset, sections=sections, **overrides)
    for name in ("res", "batch_size", "width", "hidden_dim", "images", "repeats", "batches", "steps"):
        if getattr(sizes, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(sizes, name)}")
    for name in ("warmup", "step_warmup", "seconds", "step_seconds"):
        if getattr(sizes, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(sizes, name)}")
    return sizes


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    return torch.device(name)


def chosen_cores(cores: int | None) -> list[int]:
    available = sorted(os.sched_getaffinity(0))
    if cores is not None and not 1 <= cores <= len(available):
        raise ValueError(f"--cores must be between 1 and {len(available)}, got {cores}")
    return available[:cores]


def pin_cores(cores: list[int], quick: bool) -> int:
    """Pin the run to `cores`; returns the thread count for torch and for each loader's workers."""
    os.sched_setaffinity(0, cores)  # inherited by loader workers and DALI threads
    # Two intra-op threads on a busy machine wait on each other at every op (a tiny step gets ~40x
    # slower); a smoke run must not depend on the machine being idle.
    threads = 1 if quick else len(cores)
    torch.set_num_threads(threads)
    return threads


def notes(bench: Bench, sections: tuple[str, ...]) -> list[str]:
    found = [f"the {FEEDER} loader feeds the step section (views made once on the device, replayed at no "
             "cost); it has no loader figure"]
    if bench.device.type == "cpu" and "end_to_end" in sections:
        found.append("CPU end-to-end: loader workers and the step share the same cores")
    if bench.beton:
        found.append(f"ffcv reads a .beton of the corpus re-encoded as JPEG quality {DEFAULT_JPEG_QUALITY}")
    if bench.quick:
        found.append("--quick smoke run: tiny sizes, the figures say nothing about speed")
    return found


def output_path(args: argparse.Namespace, device: torch.device) -> Path:
    date = dt.date.today().isoformat()
    return args.out or (REPO / "runs" / "benchmark" / f"{device.type}-{date}-quick" if args.quick
                        else REPO / "benchmark" / "results" / f"{device.type}-{date}")


def run(args: argparse.Namespace, beat: Heartbeat) -> tuple[dict, Path]:
    """Measure everything asked for; the JSON at the returned path is rewritten after every figure."""
    budget = Budget(args.budget)
    device = resolve_device(args.device)
    sizes = resolve_sizes(args, device)
    core_ids = chosen_cores(args.cores)
    out = output_path(args, device)
    cache = args.cache
    beat.phase("preparing the corpus")
    corpus = prepare_corpus(args.corpus, cache / ("quick" if args.quick else ""), sizes.images)
    cores, workers = len(core_ids), pin_cores(core_ids, args.quick)
    # The trainer's kernel settings (cuDNN autotuning, TF32, subnormals flushed), or the step timed is
    # not the step that trains.
    configure_backends(deterministic=False)
    env = environment(device)
    skipped: dict[str, str] = {}
    loaders = []
    for name in args.loaders:
        if is_installed(name):
            loaders.append(name)
        else:
            skipped[name] = f"not installed (see {LOADER_MODULES[loader_module(name)]})"
    if "ffcv_variants" in sizes.sections and "ffcv" not in loaders:
        skipped["ffcv_variants"] = "needs the ffcv loader (not installed or not in --loaders)"
    reads_beton = {"loader", "end_to_end", "ffcv_variants"} & set(sizes.sections)
    beton = None
    if "ffcv" in loaders and reads_beton:
        beat.phase("converting the corpus to a .beton (once per corpus, cached)")
        beton = prepare_beton(corpus, cache, cores)
    paths = [path for path, _ in scan_image_folder(corpus).samples]
    bench = Bench(device, sizes, cores, workers, corpus, paths, beton, args.quick)
    beat.phase("reading the corpus once (OS cache)")
    warm_os_cache(paths + ([beton] if beton else []))
    cfg = bench.train_config
    optimizers = tuple(args.optimizers)
    ceiling = ceiling_key(sizes.compile_modes) if {"step", "end_to_end"} & set(sizes.sections) else None
    plan, configs = plan_figures(bench, loaders, sizes.sections, optimizers, ceiling)
    result = {
        "schema_version": SCHEMA_VERSION,
        "complete": False,
        "environment": env,
        "setup": {
            "corpus": str(Path(corpus).resolve()), "corpus_images": len(paths), "beton": beton,
            "res": sizes.res, "batch_size": sizes.batch_size, "arch": sizes.arch, "small_images": cfg.small_images,
            "width": sizes.width, "hidden_dim": sizes.hidden_dim, "precision": bench.precision,
            "view_dtype": str(bench.dtype),
            "workers": workers, "repeats": sizes.repeats, "loader_batches": sizes.batches,
            "loader_seconds": sizes.seconds, "loader_warmup": sizes.warmup, "steps": sizes.steps,
            "step_seconds": sizes.step_seconds, "step_warmup": sizes.step_warmup,
            "compile_modes": list(sizes.compile_modes), "optimizers": list(optimizers), "loaders": loaders,
            "sections": list(sizes.sections), "quick": args.quick, "budget_s": args.budget,
            "notes": notes(bench, sizes.sections),
        },
        "sections": {section: {} for section in SECTIONS},
        "ceiling": ceiling,
        "verdict": {}, "baseline": None, "speedup_vs_baseline": {}, "best_loader": None,
        "lars_agreement": None,
        "ffcv_costs": None,
        "skipped": skipped,
    }
    recorder = Recorder(result, out.with_suffix(".json"), plan, budget, beat, sizes.repeats)
    run_sections(bench, recorder, loaders, sizes.sections, optimizers, configs)
    env["load_average_end"] = list(os.getloadavg())
    result["complete"] = True
    recorder.save()
    return result, out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with Heartbeat("throughput") as beat:
            result, out = run(args, beat)
    except (ValueError, LoaderUnavailable) as err:
        print(f"throughput: error: {err}", file=sys.stderr)
        return 2
    print_report(result)
    written = [out.with_suffix(".json")] + ([out.with_suffix(".png")] if plot(result, out.with_suffix(".png")) else [])
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
