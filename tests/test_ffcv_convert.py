"""The .beton converter (datasources/ffcv_convert.py, `python -m datasources.ffcv_convert`): counts, labels and
resolution of what it writes, unreadable files skipped and reported (at the scan or while writing), bad
input refused with one line, failed or interrupted conversions that leave nothing behind, signals that
end it promptly, extreme aspect ratios, and an --out that cannot be (or must not be) written refused
before any work. The loader that reads the .beton is tested in test_ffcv_loader.py."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from bad_files import UNREADABLE
from ffcv_betons import MAX_RES
from PIL import Image

from datasources.ffcv_convert import (
    BETON_HEADER,
    ConversionError,
    FolderImages,
    drop_samples,
    fit_within,
    main,
    new_progress,
    write_beton,
)
from datasources.imagefolder import scan_image_folder

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
LOADING_LINE = "loading ffcv"
# Long enough (60000 raw 28x28 images, ~20 s on 2 cores) that a signal sent once writing is under
# way always lands mid-write.
LONG_CONVERSION = ("--src", "fashion-mnist", "--workers", "2")


# ---------------------------------------------------------------- the converter's output and errors


def test_converter_counts_labels_and_skips_unreadable(dirty_beton, dirty_corpus: str) -> None:
    from ffcv.reader import Reader

    path = dirty_beton
    readable = scan_image_folder(dirty_corpus, validate=True)
    reader = Reader(path)
    assert reader.num_samples == len(readable.samples) == 32 + 4  # 4 odd-but-valid files are kept
    assert {Path(p).name for p, _ in readable.bad_files} == set(UNREADABLE)
    labels = reader.metadata["f1"]
    assert labels.tolist() == [label for _, label in readable.samples]
    sizes = zip(reader.metadata["f0"]["width"], reader.metadata["f0"]["height"], strict=True)
    assert max(max(int(w), int(h)) for w, h in sizes) == MAX_RES


def test_converter_reports_unreadable_files(dirty_corpus: str, tmp_path, capfd) -> None:
    out = tmp_path / "small.beton"
    assert main(["--src", dirty_corpus, "--out", str(out), "--limit", "4", "--workers", "1"]) == 0
    captured = capfd.readouterr()
    for name in UNREADABLE:
        assert f"class_000/{name}" in captured.err
    assert "skipped 3 unreadable file(s)" in captured.out and "wrote 4 images" in captured.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--src", "/nonexistent/folder"], "is not a folder"),
        (["--src", "EMPTY"], "no class sub-folders"),
        (["--src", "fashion-mnist", "--out", "/nonexistent/dir/x.beton"], "does not exist"),
        (["--src", "fashion-mnist", "--jpeg-quality", "0"], "--jpeg-quality must be in [1, 100]"),
        (["--src", "fashion-mnist", "--compress-prob", "1.5"], "--compress-prob must be in [0, 1]"),
        (["--src", "fashion-mnist", "--max-res", "4"], "--max-res must be at least 8"),
        (["--src", "fashion-mnist", "--workers", "0"], "--workers must be at least 1"),
        (["--src", "CORPUS", "--split", "test"], "--split applies only"),
    ],
)
def test_converter_rejects_bad_input_with_one_line(args, message, photo_corpus, tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    args = [{"EMPTY": str(tmp_path / "empty"), "CORPUS": photo_corpus}.get(a, a) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "x.beton")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "x.beton").exists()


def test_converter_limits_resolution_to_512_by_default(photo_corpus: str, tmp_path) -> None:
    from ffcv.reader import Reader

    source = sorted(Path(photo_corpus).glob("*/*"))[0]
    big = tmp_path / "src" / "class_a"
    big.mkdir(parents=True)
    Image.open(source).convert("RGB").resize((900, 700)).save(big / "big.JPEG", quality=90)
    out = tmp_path / "big.beton"
    assert main(["--src", str(tmp_path / "src"), "--out", str(out), "--workers", "1"]) == 0
    image = Reader(str(out)).metadata["f0"][0]  # fields by position: image, label
    assert max(image["width"], image["height"]) == 512
    assert main(["--src", str(tmp_path / "src"), "--out", str(out), "--workers", "1", "--max-res", "0"]) == 0
    image = Reader(str(out)).metadata["f0"][0]
    assert (image["width"], image["height"]) == (900, 700)


class _FailsAt:
    """Real photos, but sample `bad` raises in the writer's worker (a mid-write failure)."""

    def __init__(self, samples, bad: int) -> None:
        self.images, self.bad = FolderImages(samples, 64), bad

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        if index == self.bad:
            raise OSError("simulated read failure")
        return self.images[index]


@pytest.mark.timeout(60)
def test_failed_conversion_leaves_no_output(photo_corpus: str, tmp_path) -> None:
    from ffcv.fields import RGBImageField

    samples = scan_image_folder(photo_corpus).samples[:40]
    out = tmp_path / "out.beton"
    with pytest.raises(ConversionError, match="writer worker exited"), new_progress() as progress:
        write_beton(_FailsAt(samples, bad=30), out, RGBImageField(write_mode="jpg"), workers=2, progress=progress)
    assert os.listdir(tmp_path) == []  # neither the .beton nor the temp file


def test_interrupted_conversion_leaves_no_output(photo_corpus: str, tmp_path, monkeypatch) -> None:
    from ffcv.fields import RGBImageField

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    samples = scan_image_folder(photo_corpus).samples[:40]
    with pytest.raises(KeyboardInterrupt), new_progress() as progress:
        monkeypatch.setattr(progress, "advance", interrupt)
        write_beton(FolderImages(samples, 64), tmp_path / "out.beton", RGBImageField(), workers=2, progress=progress)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- a converter subprocess


@dataclass
class Conversion:
    """`python -m datasources.ffcv_convert` in its own session, its stderr lines collected as they come."""

    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, *args: str) -> Conversion:
        process = subprocess.Popen([sys.executable, "-m", "datasources.ffcv_convert", *args], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        run = cls(process)
        threading.Thread(target=lambda: run.lines.extend(process.stderr), daemon=True).start()
        return run

    def wait_for(self, ready, what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None:
                raise AssertionError(f"ffcv_convert exited ({self.process.returncode}) before {what}: {self.lines}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout} s: {self.lines}")
            time.sleep(0.02)

    def descendants(self) -> set[int]:
        found, todo = set(), [self.process.pid]
        while todo:
            pid = todo.pop()
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            found.update(int(c) for c in children)
            todo.extend(int(c) for c in children)
        return found

    def shared_memory(self) -> set[str]:
        maps = Path(f"/proc/{self.process.pid}/maps").read_text()
        return {line.split()[-1] for line in maps.splitlines() if "/dev/shm/" in line}

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        """Exit code and stderr; a converter that does not exit in `timeout` s fails the test (and is killed)."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError(f"ffcv_convert still running {timeout} s after the signal: {self.lines}") from None
        time.sleep(0.2)  # the reader thread takes the last lines
        return self.process.returncode, "".join(self.lines)


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for a parent (the container's init may not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_until_gone(pids: set[int], timeout: float = 10) -> set[int]:
    deadline = time.monotonic() + timeout
    while (alive := {pid for pid in pids if _alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _temp_files(folder: Path) -> list[Path]:
    return list(folder.glob(".*.tmp-*"))


# ---------------------------------------------------------------- signals


def test_sigint_while_numba_compiles_stops_the_run(tmp_path) -> None:
    """ffcv's import compiles numba code for seconds, and numba swallowed the KeyboardInterrupt: the run
    went on to write the whole file and exit 0."""
    run = Conversion.start(*LONG_CONVERSION, "--limit", "500", "--out", str(tmp_path / "x.beton"))
    run.wait_for(lambda: any(LOADING_LINE in line for line in run.lines), "loading line")
    run.process.send_signal(signal.SIGINT)
    code, err = run.finish()
    assert code == 128 + signal.SIGINT, err
    assert "interrupted by SIGINT" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "whole_group"), [(signal.SIGINT, False), (signal.SIGINT, True),
                                                     (signal.SIGTERM, False)],
                         ids=["sigint", "ctrl-c-to-the-process-group", "sigterm"])
def test_signal_while_writing_exits_promptly_leaving_nothing(tmp_path, signum: int, whole_group: bool) -> None:
    """Mid-write, SIGINT hung (the work queue's feeder thread) and SIGTERM killed only the main process,
    orphaning the workers with the temp file and the /dev/shm segment left behind."""
    run = Conversion.start(*LONG_CONVERSION, "--out", str(tmp_path / "x.beton"))
    # Writing: the temp file holds data pages (written by the workers) beyond the header.
    run.wait_for(lambda: any(p.stat().st_size > 1 << 20 for p in _temp_files(tmp_path)), "data in the temp file")
    children, segments = run.descendants(), run.shared_memory()
    assert len(children) >= 2 and segments, (children, segments)
    if whole_group:  # what a terminal's Ctrl-C does: every process of the job gets SIGINT
        os.killpg(run.process.pid, signum)
    else:
        run.process.send_signal(signum)
    started = time.monotonic()
    code, err = run.finish()
    assert code == 128 + signum, err
    assert time.monotonic() - started < 10, "not prompt"
    assert f"interrupted by {signal.Signals(signum).name}" in err
    assert "Traceback" not in err, err
    assert os.listdir(tmp_path) == []
    assert not [s for s in segments if os.path.exists(s)]
    assert not _wait_until_gone(children)


@pytest.mark.slow
def test_sigkill_takes_the_workers_and_the_next_run_removes_its_temp_file(tmp_path, capfd) -> None:
    """Killed outright, the converter cannot clean up: its workers must still die with it (they were
    orphaned, writing on), and the temp file it leaves is removed by the next conversion into that folder."""
    out = tmp_path / "x.beton"
    run = Conversion.start(*LONG_CONVERSION, "--out", str(out))
    run.wait_for(lambda: any(p.stat().st_size > 1 << 20 for p in _temp_files(tmp_path)), "data in the temp file")
    children, (leftover,) = run.descendants(), _temp_files(tmp_path)
    run.process.kill()
    run.finish()
    assert not _wait_until_gone(children)
    assert main(["--src", "fashion-mnist", "--limit", "10", "--workers", "1", "--out", str(out)]) == 0
    assert f"removed {leftover}" in capfd.readouterr().err
    assert os.listdir(tmp_path) == ["x.beton"]


# ---------------------------------------------------------------- files unreadable while writing


def _corrupt_body(path: Path) -> None:
    """Keep SOI, headers and EOI (so the pre-scan passes it) and fill the entropy-coded data with 0xFF."""
    data = bytearray(path.read_bytes())
    start = data.index(b"\xff\xda") + 2
    data[start:-2] = b"\xff" * (len(data) - 2 - start)
    path.write_bytes(bytes(data))


def _copy_corpus(photo_corpus: str, dest: Path, per_class: int = 3) -> list[Path]:
    files = []
    for folder in sorted(Path(photo_corpus).iterdir()):
        (dest / folder.name).mkdir(parents=True)
        for source in sorted(folder.iterdir())[:per_class]:
            files.append(dest / folder.name / source.name)
            files[-1].write_bytes(source.read_bytes())
    return files


def test_files_unreadable_at_write_time_are_skipped_and_counted(photo_corpus, tmp_path, monkeypatch,
                                                                capfd) -> None:
    """A file removed after the scan and a JPEG with intact markers but a corrupt body aborted the
    conversion (a writer worker died on them)."""
    from ffcv.reader import Reader

    import datasources.ffcv_convert as convert

    files = _copy_corpus(photo_corpus, tmp_path / "src")
    corrupt, removed = files[1], files[4]
    _corrupt_body(corrupt)
    load_source = convert.load_source

    def scan_then_remove(*args):
        source = load_source(*args)
        removed.unlink()
        return source

    monkeypatch.setattr(convert, "load_source", scan_then_remove)
    out = tmp_path / "out.beton"
    assert main(["--src", str(tmp_path / "src"), "--out", str(out), "--max-res", "64", "--workers", "2"]) == 0
    captured = capfd.readouterr()
    assert f"{corrupt}: cannot decode" in captured.err
    assert f"{removed}: the file no longer exists" in captured.err
    assert f"wrote {len(files) - 2} images" in captured.out and "skipped 2 unreadable file(s)" in captured.out
    reader = Reader(str(out))
    kept = [f for f in files if f not in (corrupt, removed)]
    classes = sorted(d.name for d in (tmp_path / "src").iterdir())
    assert reader.metadata["f1"].tolist() == [classes.index(f.parent.name) for f in kept]
    assert sorted(set(reader.alloc_table["sample_id"].tolist())) == list(range(len(kept)))


def test_dropped_samples_leave_a_beton_the_loader_reads(photo_corpus, tmp_path) -> None:
    """drop_samples rewrites count, metadata and allocation table: every remaining sample decodes to
    the image it was written from."""
    from ffcv.fields import RGBImageField

    from pipelines.base import LoaderConfig
    from pipelines.ffcv_loader import build_loader
    from pipelines.views import BYOL_VIEWS

    samples = scan_image_folder(photo_corpus).samples[:12]
    out = tmp_path / "all.beton"
    with new_progress() as progress:
        assert write_beton(FolderImages(samples, 32), out, RGBImageField(write_mode="raw"), 2, progress) == []
    drop = [0, 5, 11]
    assert drop_samples(out, drop) == 9
    recipe = BYOL_VIEWS.with_overrides(res=8)
    loader = build_loader(LoaderConfig(data=str(out), batch_size=9, recipe=recipe, workers=1, drop_last=False),
                          order="sequential")
    (_, labels), = list(loader.crops())
    assert labels.view(-1).tolist() == [label for i, (_, label) in enumerate(samples) if i not in drop]


@pytest.mark.parametrize("workers", [1, 4])
def test_jpg_beton_of_jpegs_is_at_most_one_and_a_half_times_the_sources(photo_corpus, tmp_path, workers) -> None:
    """ffcv's writer leaves one partly empty 8 MiB page per worker (the 640-photo corpus made 32 MB with 2
    workers, 136 MB with 16): compact_pages packs them, so the size follows the images, not the machine."""
    out = tmp_path / "corpus.beton"
    assert main(["--src", photo_corpus, "--out", str(out), "--workers", str(workers)]) == 0
    sources = sum(p.stat().st_size for p in Path(photo_corpus).rglob("*.JPEG"))
    assert out.stat().st_size <= 1.5 * sources, (out.stat().st_size, sources)


def test_compacted_beton_keeps_every_samples_bytes(photo_corpus, tmp_path) -> None:
    """Raw pixels read straight from the compacted file at each sample's pointer equal the images written
    (the pointers in the metadata and the allocation table were moved with the bytes), samples share no
    bytes, none crosses a page, and the file ends right after its allocation table."""
    from ffcv.fields import RGBImageField
    from ffcv.reader import Reader

    samples = scan_image_folder(photo_corpus).samples[:24]
    images = FolderImages(samples, 64)
    out = tmp_path / "raw.beton"
    with new_progress() as progress:
        assert write_beton(images, out, RGBImageField(write_mode="raw"), 3, progress) == []
    reader = Reader(str(out))
    page, meta, table = int(reader.header["page_size"]), reader.metadata["f0"], reader.alloc_table
    data = out.read_bytes()
    spans = []
    for i, (pixels, label) in enumerate(images[i] for i in range(len(images))):
        start, size = int(meta["data_ptr"][i]), pixels.nbytes
        assert (int(meta["height"][i]), int(meta["width"][i])) == pixels.shape[:2]
        assert data[start:start + size] == pixels.tobytes(), i
        assert int(reader.metadata["f1"][i]) == label
        assert start // page == (start + size - 1) // page, "a sample crosses a page"
        spans.append((start, start + size))
    spans.sort()
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))
    assert sorted(zip(table["ptr"].tolist(), (table["ptr"] + table["size"]).tolist(), strict=True)) == spans
    assert len(data) == int(reader.header["alloc_table_ptr"]) + table.nbytes
    # Packed: no gap of a page or more anywhere (the writer's per-worker pages left whole empty pages).
    assert all(nxt - end < page for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))


@pytest.mark.timeout(60)
def test_worker_failing_after_its_last_sample_ends_the_conversion(photo_corpus, tmp_path, monkeypatch) -> None:
    """A worker that dies once every sample is counted (the disk full as it flushes its last page) never
    sends ffcv the allocation table it waits for: the conversion hung."""
    from ffcv.fields import RGBImageField
    from ffcv.memory_allocator import MemoryAllocator

    def disk_full(self, *_exc) -> None:
        time.sleep(0.5)  # after the main process has seen the last sample counted
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MemoryAllocator, "__exit__", disk_full)  # the forked workers inherit it
    samples = scan_image_folder(photo_corpus).samples[:8]
    with pytest.raises(ConversionError, match="writer worker exited"), new_progress() as progress:
        write_beton(FolderImages(samples, 32), tmp_path / "out.beton", RGBImageField(), 2, progress)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- extreme aspect ratios


def test_fit_within_keeps_a_pixel_per_side() -> None:
    assert fit_within(np.zeros((50, 10000, 3), np.uint8), 64).shape == (1, 64, 3)
    assert fit_within(np.zeros((10000, 50, 3), np.uint8), 64).shape == (64, 1, 3)
    assert fit_within(np.zeros((700, 900, 3), np.uint8), 512).shape == (398, 512, 3)  # as ffcv's own resize
    image = np.zeros((30, 40, 3), np.uint8)
    assert fit_within(image, 64) is image and fit_within(image, None) is image


def test_very_wide_image_converts(tmp_path, capfd) -> None:
    """10000 x 50 at --max-res 64: ffcv's resize asked OpenCV for a 64 x 0 image and the run crashed."""
    from ffcv.reader import Reader

    (tmp_path / "src" / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 10000, 3), dtype=np.uint8)).save(tmp_path / "src" / "a" / "w.jpg")
    out = tmp_path / "wide.beton"
    assert main(["--src", str(tmp_path / "src"), "--out", str(out), "--max-res", "64", "--workers", "1"]) == 0
    image = Reader(str(out)).metadata["f0"][0]
    assert (int(image["width"]), int(image["height"])) == (64, 1)


# ---------------------------------------------------------------- --out checks


def test_beton_header_matches_ffcv() -> None:
    from ffcv.types import CURRENT_VERSION, HeaderType

    from datasources.ffcv_convert import BETON_VERSION

    assert HeaderType == BETON_HEADER and BETON_VERSION == CURRENT_VERSION


@pytest.mark.parametrize(("out", "message"), [
    ("/proc/x.beton", "cannot create a file in /proc"),  # os.access says yes to root
    ("/proc/x/y.beton", "--out folder /proc/x does not exist"),
    ("FILE/x.beton", "is a file, not a folder"),
    ("FILE/deeper/x.beton", "is a file, not a folder"),
    ("FILE", "exists and is not a .beton file"),
    ("/dev/null", "exists and is not a .beton file"),
])
def test_unwritable_or_foreign_out_is_refused_before_any_work(out, message, tmp_path, capsys) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    out = out.replace("FILE", str(notes))
    assert main(["--src", "fashion-mnist", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert notes.read_text() == "my notes"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_existing_beton_is_replaced(tmp_path, capsys) -> None:
    out = tmp_path / "x.beton"
    args = ["--src", "fashion-mnist", "--limit", "20", "--workers", "1", "--out", str(out)]
    assert main(args) == 0 and main([*args[:3], "30", *args[4:]]) == 0
    assert "wrote 30 images" in capsys.readouterr().out
    assert os.listdir(tmp_path) == ["x.beton"]
