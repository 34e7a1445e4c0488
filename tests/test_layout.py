"""The layout a newcomer reads: the README's layout table names real paths and every package; the trainer is
not a library; no test file imports another; scripts run without sys.path edits."""

from __future__ import annotations

import ast
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


# Data flows one way: datasources -> pipelines -> models/optim (the step); runtime and evaluation sit on top.
MAY_NOT_IMPORT = {
    "datasources": {"pipelines", "models", "optim", "evaluation", "config", "train"},
    "pipelines": {"models", "optim", "evaluation", "config", "train"},
    "models": {"datasources", "pipelines", "evaluation", "runtime", "config", "train"},
    "optim": {"datasources", "pipelines", "models", "evaluation", "runtime", "config", "train"},
}


# File I/O beside the networks: the exported backbone writes through runtime's one atomic writer and names a
# wrong file's kind with datasources' one image-signature table rather than keeping copies of either.
MAY_IMPORT = {"models/export.py": {"runtime", "datasources"}}


@pytest.mark.parametrize("package", sorted(MAY_NOT_IMPORT))
def test_imports_follow_the_data_flow(package):
    upstream = {name: sorted(imports_of(p) & MAY_NOT_IMPORT[package] - MAY_IMPORT.get(name, set()))
                for p in (REPO / package).rglob("*.py") if (name := str(p.relative_to(REPO)))}
    assert not {k: v for k, v in upstream.items() if v}
