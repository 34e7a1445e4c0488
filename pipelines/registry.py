"""Loader names -> modules, imported lazily so a missing optional extra gives a clear error."""

from __future__ import annotations

import importlib

from foundation.threads import keep_torch_threads
from pipelines.base import LoaderConfig, LoaderUnavailable, TwoViewLoader

LOADER_MODULES = {
    "dali": "pipelines.dali_loader",
    "ffcv": "pipelines.ffcv_loader",
    "torchvision": "pipelines.torchvision_loader",
    "synthetic": "pipelines.synthetic_loader",
}
INSTALL_HINTS = {
    "dali": "pip install -e '.[dali-cu13]' (CUDA 13 torch) or '.[dali]' (CUDA 12 torch); scripts/setup.sh picks",
    "ffcv": "apt-get install pkg-config libopencv-dev libturbojpeg0-dev && pip install -e '.[ffcv]'",
}


def _import_loader_module(name: str):
    if name not in LOADER_MODULES:
        raise ValueError(f"unknown loader {name!r}; choose one of {', '.join(LOADER_MODULES)}")
    try:
        with keep_torch_threads():
            return importlib.import_module(LOADER_MODULES[name])
    except ImportError as err:
        hint = INSTALL_HINTS.get(name, "pip install -e .")
        raise LoaderUnavailable(f"loader {name!r} is not installed ({err}); install it with: {hint}") from err


def build_loader(name: str, cfg: LoaderConfig) -> TwoViewLoader:
    """Build the named loader; every module exposes `build_loader(cfg) -> TwoViewLoader`.

    Parameters
    ----------
    name: a key of LOADER_MODULES (ValueError otherwise); LoaderUnavailable, with the install command,
        when its optional dependency is missing.
    cfg: this rank's share of the loading (`runtime.assembly.loader_config`).
    """
    return _import_loader_module(name).build_loader(cfg)


def is_available(name: str) -> bool:
    """Whether loader `name` (a key of LOADER_MODULES) imports; importing it is the test."""
    try:
        _import_loader_module(name)
    except LoaderUnavailable:
        return False
    return True


def default_loader(data: str) -> str:
    """The loader a run uses when none is named: FFCV for its own .beton files; otherwise DALI, which
    decodes on the GPU and, in its CPU mode, beats the torchvision baseline too; torchvision without it.

    Parameters
    ----------
    data: --data as the loader reads it; only its suffix is looked at (".beton" picks ffcv).
    """
    if data.endswith(".beton"):
        return "ffcv"
    return "dali" if is_available("dali") else "torchvision"
