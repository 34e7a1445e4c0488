"""Shared fixtures: small real-photo corpora built once per test session."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from acceptance_runs import QuickRun, quick_run
from bad_files import write_bad_files
from ffcv_betons import MAX_RES
from PIL import Image
from quickstart_runs import QuickstartRun, quickstart_smoke

from benchmark.make_corpus import TEST_CORPORA, TEST_CORPORA_ENV, make_corpus
from datasources.ffcv_convert import main as ffcv_convert


def _test_corpus(name: str, tmp_path_factory) -> str:
    """benchmark.make_corpus.TEST_CORPORA[name]: made here from the wallpaper photos, or taken from
    $FASTBYOL_TEST_CORPORA where a machine has no photos (`python -m benchmark.make_corpus --test-corpora`)."""
    prebuilt = os.environ.get(TEST_CORPORA_ENV)
    if prebuilt:
        return str(Path(prebuilt) / name)
    return str(make_corpus(tmp_path_factory.mktemp("corpus") / name, **TEST_CORPORA[name]))


@pytest.fixture(scope="session")
def photo_corpus(tmp_path_factory) -> str:
    """64 ImageNet-like JPEGs (real photos, ~400x350) in 4 classes, no bad files."""
    return _test_corpus("clean", tmp_path_factory)


@pytest.fixture(scope="session")
def dirty_corpus(tmp_path_factory) -> str:
    """32 real-photo JPEGs in 4 classes plus, in class_000, odd-but-valid and unreadable files
    (tests/bad_files.py: ODD_BUT_VALID / UNREADABLE)."""
    root = tmp_path_factory.mktemp("dirty") / "images"
    shutil.copytree(_test_corpus("dirty", tmp_path_factory), root)
    first = min((root / "class_000").glob("img_*.JPEG"))
    with Image.open(first) as sample:
        write_bad_files(root / "class_000", sample.convert("RGB"))
    return str(root)


@pytest.fixture(scope="session")
def dirty_beton(dirty_corpus: str, tmp_path_factory) -> str:
    """The dirty corpus as a .beton (longest side MAX_RES), converted once per session."""
    out = str(tmp_path_factory.mktemp("beton") / "dirty.beton")
    assert ffcv_convert(["--src", dirty_corpus, "--out", out, "--max-res", str(MAX_RES), "--workers", "2"]) == 0
    return out


@pytest.fixture(scope="session")
def acceptance_quick(photo_corpus: str, tmp_path_factory) -> QuickRun:
    """`python -m benchmark.acceptance --quick` once per session, no budget, on the 64-photo corpus (about
    2.5 minutes on 2 cores): test_acceptance.py's quick tests, and test_benchmark.py's on a CPU machine."""
    return quick_run(photo_corpus, tmp_path_factory.mktemp("acceptance"))


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> QuickstartRun:
    """`python -m benchmark.quickstart -- <a 3-step smoke run>` once per session, from an empty dataset cache:
    test_quickstart.py's test and test_quickstart_configs.py's FFCV case (tests/quickstart_runs.py)."""
    return quickstart_smoke(tmp_path_factory.mktemp("quickstart"))


# pytest-xdist (`-n 2` in pyproject.toml; `-n 0` runs in one process) sends each group of tests to one worker
# (`FileGroups`). A test file is one group, so its module fixtures are built once; files that share a costly
# session fixture are one group, so that fixture is built once, not once per worker.
SHARED_SESSION_RUNS = {"test_acceptance": "acceptance_quick", "test_benchmark": "acceptance_quick",
                       "test_quickstart": "quickstart_run", "test_quickstart_configs": "quickstart_run"}


def worker_group(nodeid: str) -> str:
    module = Path(nodeid.split("::")[0]).stem
    return SHARED_SESSION_RUNS.get(module, module)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's loadscope scheduling over `worker_group`s, in collection order. (xdist's own loadgroup marks
    groups by renaming node ids, which pytest 9.2 no longer lets it do.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    config.option.loadscopereorder = False  # keep the order below: the groups with the most slow tests first
    return FileGroups(config, log)


def pytest_collection_modifyitems(config, items):
    # The groups with the most slow tests start first, so that the last group to start is a short one.
    groups = {item.nodeid: worker_group(item.nodeid) for item in items}
    slow = Counter(groups[item.nodeid] for item in items if "slow" in item.keywords)
    first_seen = {group: index for index, group in reversed(list(enumerate(groups.values())))}
    items.sort(key=lambda item: (-slow[groups[item.nodeid]], first_seen[groups[item.nodeid]]))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# Keep CPU tests deterministic in speed on the 2-core CI machine: the cores shared out over xdist's workers.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // WORKERS))
