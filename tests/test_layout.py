"""The layout a newcomer reads: the README's layout table names real paths and every package; the trainer is
not a library; imports go one way, down the layers of MAY_IMPORT; no test file imports another; scripts run
without sys.path edits."""

from __future__ import annotations

import ast
import graphlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.parent.name for p in REPO.glob("*/__init__.py"))


def layout_rows() -> list[str]:
    text = (REPO / "README.md").read_text()
    table = text[text.index("## Layout\n"):text.index("\n## ", text.index("## Layout\n") + 1)]
    return [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| path")]


def imports_of(path: Path) -> set[str]:
    """Top-level module names `path` imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_layout_table_names_existing_paths_and_every_package_and_module():
    named = {cell for row in layout_rows() for cell in re.findall(r"`([\w./]+(?:\.py|/))`", row.split(" | ")[0])}
    assert named, "no paths found in the README layout table"
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"the README layout table names paths that do not exist: {missing}"
    for package in PACKAGES:
        if package in ("evaluation", "benchmark"):  # one row for the whole folder
            assert f"{package}/" in named
            continue
        modules = {f"{package}/{p.name}" for p in (REPO / package).glob("*.py") if p.name != "__init__.py"}
        unnamed = sorted(modules - named - {"pipelines/ffcv_convert.py"})  # the old name's pointer
        assert not unnamed, f"modules missing from the README layout table: {unnamed}"


def test_train_py_is_not_imported_by_the_code_or_the_benchmarks():
    importers = [str(p.relative_to(REPO)) for package in PACKAGES for p in (REPO / package).rglob("*.py")
                 if "train" in imports_of(p)]
    assert not importers, f"train.py is the trainer, not a library; these import it: {importers}"


def test_no_test_file_imports_another_test_file():
    offenders = {p.name: sorted(n for n in imports_of(p) if n.startswith("test_"))
                 for p in (REPO / "tests").glob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}, "shared helpers belong in tests/ helper modules"


def test_no_code_edits_sys_path():
    edits = [str(p.relative_to(REPO)) for p in [*REPO.glob("*.py"), *(q for pkg in PACKAGES
                                                                       for q in (REPO / pkg).rglob("*.py"))]
             if "sys.path.insert" in p.read_text() or "sys.path.append" in p.read_text()]
    assert not edits, edits


@pytest.mark.parametrize("command", [
    [sys.executable, str(REPO / "benchmark" / "throughput.py"), "--help"],
    [sys.executable, "-m", "benchmark.throughput", "--help"],
    [sys.executable, "-m", "benchmark.acceptance", "--help"],
    [sys.executable, str(REPO / "train.py"), "--help"],
])
def test_scripts_start_from_any_folder(command, tmp_path):
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr


def test_the_old_converter_name_still_converts_and_names_the_new_one(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipelines.ffcv_convert", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: python -m datasources.ffcv_convert" in result.stdout
    assert "note: the converter is now python -m datasources.ffcv_convert" in result.stderr


# Who may import whom, one row per package and top-level module: data flows datasources -> pipelines -> models +
# optim (the step) -> runtime -> train.py, all standing on foundation/ (signals, torch threads, numba settings,
# atomic files), which imports nothing of the project; evaluation scores features beside runtime, config names
# every option of the parts below it, benchmark measures all of them. A unit may always import itself; any other
# project import not in its row points up or sideways and fails.
MAY_IMPORT = {
    "foundation": set(),
    "datasources": {"foundation"},
    "pipelines": {"foundation", "datasources"},
    "optim": {"foundation"},
    "models": {"foundation", "optim"},
    "config": {"foundation", "datasources", "pipelines", "models", "optim"},
    "evaluation": {"foundation", "datasources", "pipelines", "models", "optim"},
    "runtime": {"foundation", "datasources", "pipelines", "models", "optim", "evaluation", "config"},
    "benchmark": {"foundation", "datasources", "pipelines", "models", "optim", "evaluation", "runtime", "config"},
    "train": {"foundation", "datasources", "pipelines", "models", "optim", "evaluation", "runtime", "config"},
}
PROJECT = {*PACKAGES, *(p.stem for p in REPO.glob("*.py"))}


# File I/O beside the networks: the exported backbone names a wrong file's kind with datasources' one
# image-signature table rather than keeping a copy of it.
FILE_MAY_ALSO_IMPORT = {"models/export.py": {"datasources"}}


def sources(unit: str) -> list[Path]:
    return sorted((REPO / unit).rglob("*.py")) if (REPO / unit).is_dir() else [REPO / f"{unit}.py"]


def forbidden_imports(unit: str, files: list[Path]) -> dict[str, list[str]]:
    """Per file of `unit`, the project units it imports that its row of MAY_IMPORT does not allow."""
    found = {}
    for path in files:
        name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name
        allowed = MAY_IMPORT[unit] | {unit} | FILE_MAY_ALSO_IMPORT.get(name, set())
        if bad := sorted(imports_of(path) & PROJECT - allowed):
            found[name] = bad
    return found


def test_every_package_and_module_has_a_row_and_the_rows_form_no_cycle():
    assert set(MAY_IMPORT) == PROJECT, f"place every unit in MAY_IMPORT: {sorted(PROJECT ^ set(MAY_IMPORT))}"
    assert all(row <= PROJECT for row in MAY_IMPORT.values())
    list(graphlib.TopologicalSorter(MAY_IMPORT).static_order())  # raises CycleError on a two-way pair


@pytest.mark.parametrize("unit", sorted(MAY_IMPORT))
def test_imports_follow_the_layers(unit):
    assert not forbidden_imports(unit, sources(unit))


@pytest.mark.parametrize(("unit", "code", "caught"), [
    ("foundation", "import datasources.imagefolder\n", ["datasources"]),
    ("datasources", "def convert():\n    from runtime.checkpoint import CheckpointDir\n", ["runtime"]),
    ("pipelines", "from models.step import BYOLStep\nimport config\n", ["config", "models"]),
    ("evaluation", "from runtime.metrics import Window\n", ["runtime"]),
    ("runtime", "import train\n", ["train"]),
])
def test_an_upward_import_is_caught(unit, code, caught, tmp_path):
    (tmp_path / "offender.py").write_text(code)
    assert forbidden_imports(unit, [tmp_path / "offender.py"]) == {"offender.py": caught}
