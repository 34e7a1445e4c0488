"""runtime/preflight.py: every option's own bound (from its config metadata) is checked before any process
starts, with one line naming the flag, what it accepts and the value given."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import fields, replace

import pytest

from config import AT_LEAST_1, NOT_NEGATIVE, TrainConfig, option_flag
from runtime import backends, preflight

# A value just outside each bound kind, by hand; the float ranges each name their own.
OUTSIDE = {AT_LEAST_1: 0, NOT_NEGATIVE: -1}
FLOAT_OUTSIDE = {"base_lr": 0.0, "weight_decay": -1e-6, "momentum": 1.0, "eta": 0.0, "tau_base": 1.5}
VALID = TrainConfig(loader="synthetic", gpus=0, arch="resnet18", res=8, batch_size=8).resolved()


def bounded_options() -> list[str]:
    return [f.name for f in fields(TrainConfig) if f.metadata["bound"] is not None]


def test_every_float_with_a_range_is_named_here():
    floats = [name for name in bounded_options() if name not in
              [f.name for f in fields(TrainConfig) if f.metadata["bound"] in OUTSIDE]]
    assert sorted(floats) == sorted(FLOAT_OUTSIDE)


@pytest.mark.parametrize("name", bounded_options())
def test_a_value_outside_an_options_bound_is_one_line(name):
    field = next(f for f in fields(TrainConfig) if f.name == name)
    bad = OUTSIDE.get(field.metadata["bound"], FLOAT_OUTSIDE.get(name))
    preflight.check_values(VALID)  # the valid config passes
    with pytest.raises(ValueError) as raised:
        preflight.check_values(replace(VALID, **{name: bad}))
    assert str(raised.value) == f"{option_flag(name)} must be {field.metadata['bound'].meaning}, got {bad}"


def test_non_finite_floats_are_refused_before_their_range():
    with pytest.raises(ValueError, match=r"^--momentum must be a finite number, got nan$"):
        preflight.check_values(replace(VALID, momentum=float("nan")))


def test_compiling_a_cpu_step_without_a_cpp_compiler_is_one_line(monkeypatch, tmp_path):
    cfg = replace(VALID, compile=True, out=str(tmp_path / "run"))
    monkeypatch.setattr(preflight, "cpu_compiler", lambda: None)
    message = (r"^--compile on CPU builds the step's kernels with a C\+\+ compiler and none was found .*: "
               r"install one \(apt-get install g\+\+\) or pass --no-compile$")
    with pytest.raises(ValueError, match=message):
        preflight.check(cfg)
    assert preflight.check(replace(cfg, compile=False)) == 1  # the eager step needs no compiler


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ on PATH")
def test_the_compiler_found_is_the_one_inductor_runs(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    found = backends.cpu_compiler()
    assert found is not None and shutil.which(found) is not None
    subprocess.run([found, "--version"], check=True, capture_output=True)
