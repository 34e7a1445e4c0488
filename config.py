"""The one config object: every hyper-parameter of a run, its default, and its CLI flag.

`build_parser()` derives the command line from the dataclass fields (help and choices live in the
field metadata), so a new option is added in exactly one place. Options left at None take the
recipe's value for the run length (`TrainConfig.resolved`), per docs/recipe.md.
"""

from __future__ import annotations

import argparse
import os
import tomllib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from datasources.builtin import parse_builtin
from datasources.fashion_mnist import IMAGE_SIDE
from models.backbones import ARCHS, DEFAULT_WIDTH, SMALL_IMAGE_MAX_RES
from models.step import AUTOCAST_DTYPES
from optim.factory import OPTIMIZERS
from optim.schedules import MAX_WARMUP_FRACTION
from pipelines.registry import LOADER_MODULES, default_loader
from pipelines.views import BYOL_VIEWS, JITTER_MODES


@dataclass(frozen=True)
class Bound:
    """The values an option accepts, and how its error line names them: "--x must be <meaning>, got v"."""

    accepts: Callable[[Any], bool]
    meaning: str


AT_LEAST_1 = Bound(lambda v: v >= 1, "at least 1")
NOT_NEGATIVE = Bound(lambda v: v >= 0, ">= 0")
ABOVE_0 = Bound(lambda v: v > 0, "above 0")

# What a --resume may do with an option that differs from the checkpoint's: REFUSED for the options that
# shape the saved tensors (the networks, the optimizer state: they cannot load), QUIET for where and how
# fast the run goes and how often it logs; every other change is NOTED in the resume line.
REFUSED, QUIET, NOTED = "refused", "quiet", "noted"
# FIXED: the run's schedule and data (length, batch, optimiser hyper-parameters, views, data, seed). Changing one
# mid-run would stretch or cut a schedule already under way (the lr jumps back up) or continue on other data:
# refused too, with the advice to start a new run in another --out.
FIXED = "fixed"

# The recipe's values by run length (docs/recipe.md): (from this many epochs on, value), longest runs first.
# `resolved` reads them and the --help text is written from them, so the two cannot disagree.
BASE_LR_BY_EPOCHS = ((1000, 0.2), (300, 0.3), (0, 0.45))
WEIGHT_DECAY_BY_EPOCHS = ((1000, 1.5e-6), (0, 1e-6))
TAU_BY_EPOCHS = ((1000, 0.996), (41, 0.99), (0, 0.97))
# Small images (--res <= 64) take solo-learn's CIFAR BYOL recipe where it differs from ImageNet's, except the
# 1-D group's lr (a quarter of the lr), a 4x weight decay, residual blocks that start as their shortcuts and crops
# of at least a fifth of the image: measured on the quickstart (docs/recipe.md).
SMALL_IMAGE_RECIPE = {"base_lr": 1.0, "weight_decay": 4e-5, "eta": 0.02, "tau_base": 0.99, "lr_1d_scale": 0.25,
                      "zero_init_residual": True, "min_scale": 0.2}
ETA = 1e-3
# The official code steps biases and norm weights at the full lr.
LR_1D_SCALE = 1.0
# torchvision's initialisation (the official code zero-inits bottleneck blocks only; not measured here on GPUs).
ZERO_INIT_RESIDUAL = False
# The view size of data other than the built-in dataset (whose own size is IMAGE_SIDE), and the encoders.
DEFAULT_RES, SMALL_IMAGE_ARCH, ARCH = 224, "resnet18", "resnet50"


def by_epochs(table: tuple[tuple[int, float], ...], epochs: int) -> float:
    """The value of a *_BY_EPOCHS table for a run of `epochs`."""
    return next(value for start, value in table if epochs >= start)


def _recipe_help(name: str, table: tuple[tuple[int, float], ...]) -> str:
    """'default: 1.0 for small images; else 0.2 from 1000 epochs, 0.3 from 300, 0.45 below'."""
    (first_start, first), *rest = table
    steps = [f"{first:g} from {first_start} epochs"] + [f"{value:g} from {start}" for start, value in rest[:-1]]
    return (f"default: {SMALL_IMAGE_RECIPE[name]:g} for small images; else {', '.join(steps)}, "
            f"{rest[-1][1]:g} below")


def option(default: Any, help: str, choices: Iterable[str] | None = None, *, bound: Bound | None = None,
           on_resume: str = NOTED) -> Any:
    """A TrainConfig field and everything the CLI, the checks and --resume need to know about it.

    Parameters
    ----------
    default: the value when neither a flag nor --config gives one; None: filled by `TrainConfig.resolved`.
    help: the --help text.
    choices: the accepted values (from the registry that defines them).
    bound: the accepted range, checked before any process starts (None values are always accepted).
    on_resume: REFUSED, FIXED, QUIET or NOTED (above).
    """
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "bound": bound,
                "on_resume": on_resume}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    loader: str | None = option(None, "data loader (default: ffcv for a .beton, else dali where installed, else "
                                "torchvision; synthetic makes random views and reads no data)",
                                LOADER_MODULES, on_resume=FIXED)
    data: str = option("fashion-mnist", "ImageFolder root (root/<class>/<image>; the class folders are only read by "
                       "the evaluation), .beton file (ffcv), or the built-in fashion-mnist[:<idx folder>]",
                       on_resume=FIXED)
    gpus: int | None = option(None, "GPUs to train on, one process each (default: all visible GPUs, 0 on a "
                              "CPU-only machine; 0 = CPU). Under torchrun the launcher decides instead",
                              bound=NOT_NEGATIVE, on_resume=QUIET)
    device: str | None = option(None, "shorthand for the hardware: cpu = --gpus 0, cuda = all visible GPUs",
                                ("cpu", "cuda"), on_resume=QUIET)
    processes: int = option(1, "CPU processes (gloo DDP) when --gpus 0: exercises the distributed path without "
                            "GPUs", bound=AT_LEAST_1, on_resume=QUIET)
    arch: str | None = option(None, f"encoder (default: {SMALL_IMAGE_ARCH} for small images, else {ARCH})", ARCHS,
                              on_resume=REFUSED)
    small_images: bool | None = option(None, "small-image form: CIFAR-style stem (3x3 conv, no max-pool), no view "
                                       "blur and solo-learn's CIFAR optimiser defaults (default: on when --res <= "
                                       f"{SMALL_IMAGE_MAX_RES})", on_resume=REFUSED)
    width: int = option(DEFAULT_WIDTH, "backbone width: channels of the stem and first stage, stages 1-2-4-8x it "
                        f"({DEFAULT_WIDTH} = torchvision's ResNets; e.g. 8 for a quick CPU run)", bound=AT_LEAST_1,
                        on_resume=REFUSED)
    blur: bool | None = option(None, "Gaussian blur in the views (default: on, off for small images)", on_resume=FIXED)
    jitter: str = option("official", "colour-jitter formulas: the official BYOL code's (additive brightness, HSV "
                         "saturation) or torchvision's ColorJitter", JITTER_MODES, on_resume=FIXED)
    res: int | None = option(None, f"side in px of both views (default: {IMAGE_SIDE} for the built-in fashion-mnist, "
                             f"its images' own size; {DEFAULT_RES} for other data)", bound=AT_LEAST_1, on_resume=FIXED)
    in_memory: bool = option(True, "ffcv: the .beton fits in RAM (random order, OS page cache); --no-in-memory "
                             "reads a larger-than-RAM .beton in QUASI_RANDOM order (one process)", on_resume=FIXED)
    min_scale: float | None = option(None, "smallest random-resized-crop area fraction (default: "
                                     f"{SMALL_IMAGE_RECIPE['min_scale']:g} for small images, measured in "
                                     f"docs/recipe.md; else the recipe's {BYOL_VIEWS.crop_scale[0]:g})",
                                     on_resume=FIXED)
    batch_size: int = option(256, "GLOBAL batch size over all processes and nodes (each gets batch / world size)",
                             bound=AT_LEAST_1, on_resume=FIXED)
    epochs: int = option(100, "training epochs", bound=AT_LEAST_1, on_resume=FIXED)
    steps: int | None = option(None, "the run's length in optimizer steps; the schedule spans them (default: "
                               "--epochs x the steps of an epoch)", bound=AT_LEAST_1, on_resume=FIXED)
    optimizer: str = option("lars", "optimizer (lars-loop: the fused lars's formula one parameter at a time, "
                            "the reference; torch-optimizer-lars: the LARC formula)", OPTIMIZERS, on_resume=REFUSED)
    base_lr: float | None = option(None, f"lr per 256 images ({_recipe_help('base_lr', BASE_LR_BY_EPOCHS)})",
                                   bound=ABOVE_0, on_resume=FIXED)
    weight_decay: float | None = option(None, f"weight decay ({_recipe_help('weight_decay', WEIGHT_DECAY_BY_EPOCHS)})",
                                        bound=Bound(lambda v: v >= 0, "0 or more"), on_resume=FIXED)
    momentum: float = option(0.9, "LARS momentum", bound=Bound(lambda v: 0 <= v < 1, "in [0, 1)"),
                            on_resume=FIXED)
    eta: float | None = option(None, f"LARS trust coefficient (default: {SMALL_IMAGE_RECIPE['eta']:g} for small "
                               f"images, else {ETA:g})", bound=ABOVE_0, on_resume=FIXED)
    lr_1d_scale: float | None = option(None, "learning rate of the 1-D parameters (biases, norm weights: plain SGD "
                                       "with momentum, no weight decay or trust ratio) as a multiple of the lr "
                                       f"(default: {SMALL_IMAGE_RECIPE['lr_1d_scale']:g} for small images, measured "
                                       f"in docs/recipe.md; else {LR_1D_SCALE:g}, the official code's)",
                                       bound=NOT_NEGATIVE, on_resume=FIXED)
    # argparse formats help with %: "%%" prints one.
    warmup_epochs: float = option(10.0, "linear lr warmup length in epochs, capped at "
                                  f"{100 * MAX_WARMUP_FRACTION:g}%% of the run's steps", bound=NOT_NEGATIVE,
                                  on_resume=FIXED)
    tau_base: float | None = option(None, f"target EMA base ({_recipe_help('tau_base', TAU_BY_EPOCHS)})",
                                    bound=Bound(lambda v: 0 <= v <= 1, "in [0, 1] (the target's EMA weight on its own "
                                                "past)"), on_resume=FIXED)
    zero_init_residual: bool | None = option(None, "start each residual block's last batch-norm scale at 0, so every "
                                             "block begins as its shortcut (default: on for small images, measured "
                                             "in docs/recipe.md; else off, torchvision's initialisation)",
                                             on_resume=FIXED)
    hidden_dim: int = option(4096, "projector/predictor hidden width", bound=AT_LEAST_1, on_resume=REFUSED)
    proj_dim: int = option(256, "projection size", bound=AT_LEAST_1, on_resume=REFUSED)
    bn_per_view: bool = option(True, "BN statistics per view (official); --no-bn-per-view concatenates views",
                               on_resume=FIXED)
    sync_bn: bool = option(True, "cross-replica BatchNorm over all processes in online and target networks")
    precision: str = option("bf16", "autocast precision (a CPU without native bf16 runs fp32)",
                            AUTOCAST_DTYPES)
    compile: bool | None = option(None, "torch.compile the step (default: on with GPUs; off on CPU, where "
                                  "compiling takes minutes on a few cores)", on_resume=QUIET)
    workers: int | None = option(None, "loader worker threads/processes per training process (default: this "
                                 "machine's usable cores divided among its training processes)", bound=NOT_NEGATIVE,
                                 on_resume=QUIET)
    seed: int = option(0, "random seed", on_resume=FIXED)
    deterministic: bool = option(False, "torch.use_deterministic_algorithms (bitwise-reproducible resume; slower)")
    log_every: int = option(10, "read metrics from the device every N steps", bound=AT_LEAST_1, on_resume=QUIET)
    out: str = option("runs/byol", "output folder: checkpoints/, metrics.csv/.jsonl, metrics.png, backbone.pt, "
                      "eval.json (with --eval-every or --finetune), finetune.json and finetune-subsets.json (with "
                      "--finetune), tensorboard/ (if tensorboard is installed)", on_resume=QUIET)
    resume: bool = option(False, "continue from the newest valid checkpoint in --out (starts fresh if there is "
                          "none)", on_resume=QUIET)
    eval_every: int = option(0, "kNN monitor every N epochs and kNN + linear probe at the end (0: off); with a "
                             "folder as --data it needs --val-data", bound=NOT_NEGATIVE)
    val_data: str | None = option(None, "labelled ImageFolder (root/<class>/<image>) the evaluation reports on when "
                                  "--data is a folder (default: none; the built-in dataset has its test split)")
    eval_limit: int | None = option(None, "evaluate on at most N evenly spaced train and N test images, e.g. for CPU "
                                    "runs (default: all)", bound=AT_LEAST_1)
    finetune: tuple[str, ...] | None = option(None, "after training, the semi-supervised protocol of python -m "
                                              "evaluation.finetune on the exported backbone: fine-tune the whole "
                                              "encoder on each share of the labelled training images, e.g. 1%% 10%% "
                                              "(or 0.01 0.1; shares of the --eval-limit images where given), beside "
                                              "the same network from random init and a frozen probe; figures in "
                                              "eval.json and finetune.json (default: off; a folder as --data needs "
                                              "--val-data; no share turns off a config file's)")
    checkpoint_every: int = option(1, "save a checkpoint every N epochs (0: off)", bound=NOT_NEGATIVE)
    checkpoint_minutes: float = option(30.0, "also save every M minutes of training (0: off)", bound=NOT_NEGATIVE)
    time_limit: float = option(0.0, "stop training after M minutes of it (counted over resumes), save, then "
                               "evaluate and export as at the end of the schedule, which keeps its length: a "
                               "cut run ends at a higher lr than a shorter one would (0: no limit)",
                               bound=NOT_NEGATIVE, on_resume=QUIET)
    keep_checkpoints: int = option(3, "keep the newest K checkpoints", bound=AT_LEAST_1)

    def resolved(self) -> TrainConfig:
        """Fill the None options with the recipe's values for this run length and image size."""
        # The built-in dataset's images are IMAGE_SIDE px: upsampling them to ImageNet's size would cost
        # 64x the memory and compute for no information.
        res = self.res or (IMAGE_SIDE if parse_builtin(self.data) is not None else DEFAULT_RES)
        small = res <= SMALL_IMAGE_MAX_RES if self.small_images is None else self.small_images
        recipe = {"res": res, "small_images": small, "blur": not small, "arch": SMALL_IMAGE_ARCH if small else ARCH}
        recipe |= SMALL_IMAGE_RECIPE if small else {
            "base_lr": by_epochs(BASE_LR_BY_EPOCHS, self.epochs), "eta": ETA, "lr_1d_scale": LR_1D_SCALE,
            "zero_init_residual": ZERO_INIT_RESIDUAL, "min_scale": BYOL_VIEWS.crop_scale[0],
            "weight_decay": by_epochs(WEIGHT_DECAY_BY_EPOCHS, self.epochs),
            "tau_base": by_epochs(TAU_BY_EPOCHS, self.epochs)}
        if self.device is not None and self.gpus is not None and (self.device == "cpu") != (self.gpus == 0):
            raise ValueError(f"--device {self.device} contradicts --gpus {self.gpus}; give one of them")
        recipe["gpus"] = 0 if self.device == "cpu" else None
        gpus = self.gpus if self.gpus is not None else recipe["gpus"]
        on_gpus = gpus != 0 and torch.cuda.is_available()
        processes = (gpus or torch.cuda.device_count()) if on_gpus else self.processes
        recipe |= {"compile": on_gpus, "workers": max(1, len(os.sched_getaffinity(0)) // max(1, processes)),
                   "loader": self.loader or default_loader(self.data)}  # an import check: only when needed
        return replace(self, **{name: value if getattr(self, name) is None else getattr(self, name)
                                for name, value in recipe.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConfigError(ValueError):
    """A bad --config file or value; the message is one line that says what to do."""


def options_on_resume(rule: str) -> list[str]:
    """The options whose change --resume treats by `rule` (REFUSED, QUIET or NOTED), in field order."""
    return [f.name for f in fields(TrainConfig) if f.metadata["on_resume"] == rule]


def option_flag(name: str) -> str:
    """The command-line spelling of an option: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def option_type(name: str) -> type:
    """The value type of an option (int for `int | None`; tuple for `tuple[str, ...] | None`, whose items are str)."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if isinstance(hint, types.UnionType):
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    return typing.get_origin(hint) or hint


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description="BYOL pretraining")
    parser.add_argument("--config", metavar="FILE", help="TOML or YAML file of options (keys are the flag names); "
                        "flags given on the command line override it")
    for f in fields(TrainConfig):
        flag = option_flag(f.name)
        kind = option_type(f.name)
        default = None if f.default is MISSING else f.default
        help_text = f.metadata["help"] + (f" (default: {default})" if default is not None else "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif kind is tuple:  # zero words too: a bare flag clears what a config file gave
            parser.add_argument(flag, nargs="*", metavar="SHARE", default=default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, choices=f.metadata["choices"], help=help_text)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    # argparse gives a list of words; the frozen config holds a tuple, as a config file's list becomes.
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    return TrainConfig(**{name: tuple(value) if isinstance(value, list) else value for name, value in values.items()})


def read_config_file(path: str) -> dict[str, Any]:
    """Options from a TOML (stdlib tomllib) or YAML (needs pyyaml) file, checked against TrainConfig."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = file.read_text()
    try:
        if file.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"--config {path}: YAML needs pyyaml (pip install pyyaml); "
                                  "or write the file as TOML") from None
            values = yaml.safe_load(text) or {}
        else:
            values = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"--config {path}: not valid {'YAML' if file.suffix != '.toml' else 'TOML'}: "
                          f"{str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a table of option = value pairs")
    return {name: _checked_value(path, name, value) for name, value in
            ((key.replace("-", "_"), value) for key, value in values.items())}


def _checked_value(path: str, name: str, value: Any) -> Any:
    known = {f.name: f for f in fields(TrainConfig)}
    if name not in known:
        raise ConfigError(f"--config {path}: unknown option {name!r}; valid options are the flag names "
                          "of train.py --help")
    kind = option_type(name)
    if kind is tuple:
        # Numbers are taken as written ([0.01, 0.1] is the same as ["1%", "10%"] on the command line).
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, str | int | float)
                                              for v in value):
            raise ConfigError(f"--config {path}: {name} must be a list of words or numbers, e.g. "
                              f'["1%", "10%"], got {value!r}')
        return tuple(str(v) for v in value)
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"--config {path}: {name} must be {kind.__name__}, got {value!r}")
    choices = known[name].metadata["choices"]
    if choices and value not in choices:
        raise ConfigError(f"--config {path}: {name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Command line -> TrainConfig: defaults, then the --config file, then explicit flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**read_config_file(args.config))
        args = parser.parse_args(argv)
    return config_from_args(args)
