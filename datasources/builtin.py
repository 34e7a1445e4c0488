"""The built-in dataset: `--data fashion-mnist` resolved into what each loader reads.

    data = resolve_data("torchvision", "fashion-mnist")          # -> ~/.cache/fastbyol/fashion-mnist/train
    data = resolve_data("ffcv", "fashion-mnist:/srv/fmnist")  # -> ~/.cache/fastbyol/fashion-mnist-<hash>/train.beton

`fashion-mnist` reads the Debian idx files (datasources/fashion_mnist.py); `fashion-mnist:<folder>`
reads them from another folder. Anything else is returned unchanged (a user's folder or .beton).

The ImageFolder (dali, torchvision) is one grayscale PNG per image under
<cache>/<name>/<split>/<NN_class>/<index>.png; class folders sort in label order, so ImageFolder
class indices equal Fashion-MNIST labels. ffcv reads <cache>/<name>/<split>.beton.

Both are made once and appear atomically: a hidden temp folder/file is filled, a manifest is written
last, then it is renamed into place. A folder at the final path without a matching manifest (an
interrupted older run, a hand-made folder) is not trusted: it is rebuilt. Concurrent first runs
(e.g. DDP ranks) each build their own temp copy; the first rename wins and the others drop theirs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from datasources.fashion_mnist import CLASSES, FASHION_MNIST_DIR, load_fashion_mnist
from foundation.threads import keep_torch_threads

FASHION_MNIST = "fashion-mnist"
MANIFEST = "fastbyol-manifest.json"
# Bump when the on-disk layout changes, so old caches are rebuilt instead of misread.
CACHE_VERSION = 1
FOLDER_LOADERS = ("dali", "torchvision")


def cache_root() -> Path:
    """$FASTBYOL_CACHE, else $XDG_CACHE_HOME/fastbyol, else ~/.cache/fastbyol."""
    if "FASTBYOL_CACHE" in os.environ:
        return Path(os.environ["FASTBYOL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastbyol"


def parse_builtin(data: str) -> Path | None:
    """The idx folder if `data` names the built-in dataset (`fashion-mnist[:folder]`), else None.

    Parameters
    ----------
    data: --data as given; 'fashion-mnist' gives FASHION_MNIST_DIR, 'fashion-mnist:<folder>' that folder,
        'fashion-mnist:' a ValueError.
    """
    name, sep, folder = data.partition(":")
    if name != FASHION_MNIST:
        return None
    if sep and not folder:
        raise ValueError(f"--data {data}: give the folder holding the idx files after the colon, or just "
                         f"'{FASHION_MNIST}'")
    return Path(folder) if folder else FASHION_MNIST_DIR


def class_folder_names() -> list[str]:
    """'00_T-shirt-top', '01_Trouser', ...: label order is sort order, and no '/' in names."""
    return [f"{label:02d}_{name.replace('/', '-')}" for label, name in enumerate(CLASSES)]


def _dataset_dir(idx_folder: Path, root: Path) -> Path:
    # The default source gets the readable name; another folder gets its own cache, keyed by path.
    if idx_folder.resolve() == FASHION_MNIST_DIR.resolve():
        return root / FASHION_MNIST
    digest = hashlib.sha256(str(idx_folder.resolve()).encode()).hexdigest()[:10]
    return root / f"{FASHION_MNIST}-{digest}"


def _manifest(split: str, kind: str, count: int) -> dict:
    return {"version": CACHE_VERSION, "dataset": FASHION_MNIST, "split": split, "kind": kind, "count": count}


def _is_complete(final: Path, expected: dict) -> bool:
    try:
        return final.exists() and json.loads(_manifest_path(final).read_text()) == expected
    except (OSError, ValueError):
        return False


def _manifest_path(final: Path) -> Path:
    return final.with_suffix(".beton.json") if final.suffix == ".beton" else final / MANIFEST


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _publish_folder(tmp: Path, final: Path, expected: dict) -> None:
    """Rename the finished `tmp` to `final`, unless a concurrent builder already published one."""
    if _is_complete(final, expected):
        _discard(tmp)
        return
    _discard(final)  # an untrusted leftover (no or stale manifest)
    try:
        os.replace(tmp, final)
    except OSError:
        # Renaming onto a non-empty folder fails: a concurrent builder published between the two lines.
        if not _is_complete(final, expected):
            raise
        _discard(tmp)


def write_png_folder(images: np.ndarray, labels: np.ndarray, out: Path) -> None:
    """One lossless grayscale PNG per image under out/<class folder>/<index>.png.

    Parameters
    ----------
    images: uint8 (N, H, W) grayscale images.
    labels: (N,) Fashion-MNIST labels in [0, 10); a label picks its `class_folder_names` folder.
    out: the folder to fill (made if missing); index is the image's position, zero-padded to one width.
    """
    names = class_folder_names()
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)
    width = len(str(len(images) - 1))
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image, mode="L").save(out / names[label] / f"{index:0{width}d}.png", compress_level=1)


def write_beton_file(images: np.ndarray, labels: np.ndarray, out: Path) -> None:
    """An FFCV .beton of raw RGB pixels, written atomically by datasources.ffcv_convert.

    Parameters
    ----------
    images: uint8 (N, H, W) grayscale images, stored as RGB (the gray value in all three channels).
    labels: (N,) integer labels.
    out: the .beton's path; written with one worker per CPU core.
    """
    with keep_torch_threads():
        from ffcv.fields import RGBImageField

        from datasources.ffcv_convert import GrayImages, new_progress, write_beton
    with new_progress() as progress:
        write_beton(GrayImages(images, labels), out, RGBImageField(write_mode="raw"), os.cpu_count() or 1, progress)


def materialize(idx_folder: Path, split: str, kind: str, root: Path | None = None) -> Path:
    """Return the cached ImageFolder (kind 'folder') or .beton (kind 'beton') of one split, making it once.

    Parameters
    ----------
    idx_folder: the folder holding the gzip idx files (`parse_builtin`); another folder than the default
        gets its own cache folder, named by a hash of its path.
    split: 'train' or 'test'.
    kind: 'folder' or 'beton'.
    root: the cache folder (default: `cache_root()`).
    """
    base = _dataset_dir(idx_folder, root or cache_root())
    final = base / (f"{split}.beton" if kind == "beton" else split)
    images, labels = load_fashion_mnist(split, idx_folder)
    expected = _manifest(split, kind, len(images))
    if _is_complete(final, expected):
        return final
    base.mkdir(parents=True, exist_ok=True)
    if kind == "folder":
        tmp = Path(tempfile.mkdtemp(prefix=f".{split}.", suffix=".tmp", dir=base))
        try:
            write_png_folder(images, labels, tmp)
            (tmp / MANIFEST).write_text(json.dumps(expected))
            _publish_folder(tmp, final, expected)
        except BaseException:
            _discard(tmp)
            raise
    else:
        # write_beton is atomic itself; the side-car manifest, written after it, marks completion.
        _discard(_manifest_path(final))
        write_beton_file(images, labels, final)
        _manifest_path(final).write_text(json.dumps(expected))
    return final


def resolve_data(loader: str, data: str, split: str = "train", root: Path | None = None) -> str:
    """What `loader` should read for `--data`: the cached built-in dataset, or `data` unchanged.

    Parameters
    ----------
    loader: the --loader name: ffcv gets a .beton, dali and torchvision an ImageFolder; any other
        (synthetic) gets `data` unchanged.
    data: --data as given; only 'fashion-mnist[:folder]' is resolved.
    split: 'train' or 'test'.
    root: the cache folder (default: `cache_root()`).
    """
    idx_folder = parse_builtin(data)
    if idx_folder is None or loader not in (*FOLDER_LOADERS, "ffcv"):
        return data
    return str(materialize(idx_folder, split, "beton" if loader == "ffcv" else "folder", root))
