"""benchmark/environment_probe.py: the verdict rules for facts only a GPU machine has, and a package that
imports without distribution metadata (as ffcv copied onto the GPU machine) counted as importable."""

from __future__ import annotations

import sys

import pytest

from benchmark.environment_probe import importable, judge_environment


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
    ({"ffcv": {"version": "unknown", "note": "ffcv imports but has no distribution metadata"}}, False, None,
     "no distribution metadata"),
    ({"dali_mixed_decode": {"ok": False, "error": "boom"}}, False, "mixed (nvJPEG) decode failed", None),
    ({"torch": {"cuda_available": False}}, False, "no CUDA device", None),
    ({"torch": {"cuda_available": False}}, True, None, "no CUDA device"),
])
def test_environment_verdict_rules(changes, quick, problem, note) -> None:
    problems, notes = judge_environment(_facts(**changes), quick)
    assert (problem is None and not problems) or any(problem in p for p in problems), problems
    assert note is None or any(note in n for n in notes), notes


def test_a_package_without_metadata_is_importable_with_a_note(tmp_path, monkeypatch) -> None:
    """The first H200 run failed the environment on 'No package metadata was found for ffcv' while ffcv
    imported and loaded: the import decides."""
    (tmp_path / "copied_in_pkg").mkdir()
    (tmp_path / "copied_in_pkg" / "__init__.py").write_text("__version__ = '1.2.3'\n")
    (tmp_path / "bare_pkg").mkdir()
    (tmp_path / "bare_pkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = importable("copied_in_pkg")
    assert found["importable"] is True and found["version"] == "1.2.3" and "no distribution metadata" in found["note"]
    assert importable("bare_pkg") | {"note": ""} == {"importable": True, "version": "unknown", "note": ""}
    missing = importable("no_such_pkg_here")
    assert missing["importable"] is False and "ModuleNotFoundError" in missing["error"]
    assert importable("pytest") == {"importable": True, "version": pytest.__version__}
    sys.modules.pop("copied_in_pkg", None)
    sys.modules.pop("bare_pkg", None)
