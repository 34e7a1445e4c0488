"""The one config object: every hyper-parameter of a run, its default, and its CLI flag.

`build_parser()` derives the command line from the dataclass fields (help and choices live in the
field metadata), so a new option is added in exactly one place. Options left at None take the
recipe's value for the run length (`TrainConfig.resolved`), per ../shared/BYOL_RECIPE.md.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any


def option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    loader: str = option("synthetic", "data loader", ("dali", "ffcv", "torchvision", "synthetic"))
    data: str = option("fashion-mnist", "ImageFolder root, .beton file (ffcv), or built-in dataset name")
    device: str = option("auto", "training device (auto: cuda if available)", ("auto", "cpu", "cuda"))
    arch: str = option("resnet50", "encoder", ("resnet18", "resnet34", "resnet50"))
    small_images: bool | None = option(None, "CIFAR-style stem (default: on when --res <= 64)")
    res: int = option(224, "output resolution of both views")
    min_scale: float | None = option(None, "smallest random-resized-crop area fraction (recipe: 0.08)")
    batch_size: int = option(256, "GLOBAL batch size (split evenly over all processes)")
    epochs: int = option(100, "training epochs")
    steps: int | None = option(None, "stop after this many optimizer steps (schedule still spans them)")
    optimizer: str = option("lars", "optimizer", ("lars", "lars-reference", "lamb", "sgd"))
    base_lr: float | None = option(None, "lr per 256 images (recipe: 0.2 @1000 ep, 0.3 @300, 0.45 @<=100)")
    weight_decay: float | None = option(None, "weight decay (recipe: 1.5e-6 @1000 ep, else 1e-6)")
    momentum: float = option(0.9, "LARS momentum")
    eta: float = option(1e-3, "LARS trust coefficient")
    warmup_epochs: float = option(10.0, "linear lr warmup length in epochs")
    tau_base: float | None = option(None, "target EMA base (recipe: 0.996 @1000 ep, 0.99 @100-300, 0.97 @<=40)")
    hidden_dim: int = option(4096, "projector/predictor hidden width")
    proj_dim: int = option(256, "projection size")
    bn_per_view: bool = option(True, "BN statistics per view (official); --no-bn-per-view concatenates views")
    precision: str = option("bf16", "autocast precision on CUDA (CPU runs fp32 unless bf16 is asked)",
                            ("bf16", "fp16", "fp32"))
    compile: bool = option(True, "torch.compile the step")
    workers: int = option(4, "loader worker threads/processes per process")
    seed: int = option(0, "random seed")
    log_every: int = option(10, "read metrics from the device every N steps")
    out: str = option("runs/byol", "output folder")

    def resolved(self) -> TrainConfig:
        """Fill the None options with the recipe's values for this run length."""
        long, medium = self.epochs >= 1000, self.epochs >= 300
        recipe = {
            "base_lr": 0.2 if long else 0.3 if medium else 0.45,
            "weight_decay": 1.5e-6 if long else 1e-6,
            "tau_base": 0.996 if long else 0.99 if self.epochs > 40 else 0.97,
            "small_images": self.res <= 64,
        }
        return replace(self, **{name: value if getattr(self, name) is None else getattr(self, name)
                                for name, value in recipe.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _base_type(annotation: str) -> type:
    hint = typing.get_type_hints(TrainConfig)[annotation]
    if isinstance(hint, types.UnionType):
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    return hint


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description="BYOL pretraining")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(f.name)
        default = None if f.default is MISSING else f.default
        help_text = f.metadata["help"] + (f" (default: {default})" if default is not None else "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, choices=f.metadata["choices"], help=help_text)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
