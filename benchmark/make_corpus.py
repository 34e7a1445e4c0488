"""Build an ImageNet-like JPEG ImageFolder from real photographs.

Sources are the photographs among the wallpapers of Debian's mate-backgrounds, ukui-wallpapers
and lomiri-wallpapers packages (installed by scripts/setup.sh), re-encoded as baseline JPEG at
quality 85-96 in ImageNet's typical size (about 400x350). Noise or flat colours would decode
unrealistically fast, so sources too smooth to stand in for a photograph are dropped (vector art,
large out-of-focus areas: see MIN_DETAIL_KB), and each image is a crop of at least a third of its
source's width, downscaled, which keeps the detail per pixel close to a camera photo's.
Caveat: wallpapers are still cleaner than ImageNet's photos, so the files average about half of
ImageNet's ~110 KB (the script prints the mean); pixel count, the main decode cost, matches.

    python -m benchmark.make_corpus --out data/corpus --images 2000 --classes 10
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

# Bumped whenever the images change, so cached corpora (benchmark.throughput) are rebuilt.
CORPUS_VERSION = 2
PHOTO_DIRS = ("/usr/share/backgrounds",)
# Abstract/geometric wallpapers in those packages: flat colour areas, not photographs.
NOT_PHOTOS = ("Stripes", "Arc-Colors", "Ubuntu-Mate", "Float-into", "Flow", "Gulp", "Silk", "Spring",
              "Waves", "fluent", "rollpaper", "focal", "rhythm", "string")

# mate ships some photos again at other sizes (Elephants_3840x2160.jpg): one copy is enough.
SAME_PHOTO_RESIZED = re.compile(r"_\d+x\d+\.")

def find_photos(dirs: tuple[str, ...] = PHOTO_DIRS) -> list[Path]:
    photos = sorted(
        p for d in dirs if os.path.isdir(d) for p in Path(d).rglob("*")
        if p.suffix.lower() in (".jpg", ".jpeg", ".png") and not any(tag in p.name for tag in NOT_PHOTOS)
        and not SAME_PHOTO_RESIZED.search(p.name)
    )
    if not photos:
        raise SystemExit(
            "make_corpus: no photographs under /usr/share/backgrounds; install them with "
            "`apt-get install mate-backgrounds ukui-wallpapers lomiri-wallpapers` (scripts/setup.sh does this)"
        )
    return photos


# A source whose whole frame, downscaled to 400x350 and saved at quality 90, is smaller than this is
# too smooth to stand in for a photograph (ImageNet photos of that size are about 110 KB).
MIN_DETAIL_KB = 20


def _detail_kb(img: Image.Image) -> float:
    return len(_jpeg_bytes(img.resize((400, 350), Image.Resampling.BILINEAR), 90)) / 1024


def _source(path: Path, max_side: int) -> Image.Image | None:
    """The wallpaper decoded and downscaled to at most `max_side`, or None when it is too smooth to use."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        return img.copy() if _detail_kb(img) >= MIN_DETAIL_KB else None


@functools.lru_cache(maxsize=1)
def _load_sources(photos: tuple[Path, ...], max_side: int = 1600) -> tuple[Image.Image, ...]:
    """Decode each detailed-enough wallpaper once, downscaled to at most `max_side`, in input order: kept for
    the process's next corpus (the test session makes two). The images are only read (cropped) afterwards.
    In threads (PIL decodes, resizes and encodes without the GIL): 7.3 s -> 4 s on 2 cores."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(os.sched_getaffinity(0)), 8))) as pool:
        sources = [img for img in pool.map(_source, photos, [max_side] * len(photos)) if img is not None]
    if not sources:
        raise SystemExit(f"make_corpus: none of the {len(photos)} wallpapers is detailed enough to use as a photo")
    return tuple(sources)


def _random_photo(sources: tuple[Image.Image, ...], rng: np.random.Generator,
                  mean_size: tuple[int, int]) -> Image.Image:
    src = sources[rng.integers(len(sources))]
    out_w = int(np.clip(rng.normal(mean_size[0], mean_size[0] * 0.15), 96, src.width))
    out_h = int(np.clip(rng.normal(mean_size[1], mean_size[1] * 0.15), 96, src.height))
    max_zoom = max(1.0, min(src.width / out_w, src.height / out_h))
    zoom = rng.uniform(max(1.0, max_zoom / 3), max_zoom)
    crop_w, crop_h = int(out_w * zoom), int(out_h * zoom)
    left = rng.integers(0, src.width - crop_w + 1)
    top = rng.integers(0, src.height - crop_h + 1)
    return src.crop((left, top, left + crop_w, top + crop_h)).resize((out_w, out_h), Image.Resampling.BILINEAR)


def _jpeg_bytes(img: Image.Image, quality: int, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kwargs)
    return buf.getvalue()


def make_corpus(
    out: str | os.PathLike,
    images: int = 2000,
    classes: int = 10,
    mean_size: tuple[int, int] = (400, 350),
    quality: tuple[int, int] = (85, 96),
    seed: int = 0,
) -> Path:
    """Write out/<class>/<n>.JPEG atomically (a temp folder renamed into place) and return out."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another --out")
    rng = np.random.default_rng(seed)
    sources = _load_sources(tuple(find_photos()))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for c in range(classes):
            (tmp / f"class_{c:03d}").mkdir()
        for i in range(images):
            img = _random_photo(sources, rng, mean_size)
            q = int(rng.integers(quality[0], quality[1] + 1))
            (tmp / f"class_{i % classes:03d}" / f"img_{i:07d}.JPEG").write_bytes(_jpeg_bytes(img, q))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# The test suite's photo corpora (tests/conftest.py). A machine without the wallpaper photos (a
# GPU box) runs the suite on copies made elsewhere: --test-corpora DIR, then FASTBYOL_TEST_CORPORA=DIR.
TEST_CORPORA = {
    "clean": dict(images=64, classes=4, seed=1),
    "dirty": dict(images=32, classes=4, seed=2),  # tests/bad_files.py adds the bad files to a copy
}
TEST_CORPORA_ENV = "FASTBYOL_TEST_CORPORA"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test-corpora", metavar="DIR",
                        help=f"write the test suite's corpora ({', '.join(TEST_CORPORA)}) under DIR, for "
                        f"{TEST_CORPORA_ENV}=DIR on a machine without the photos; the other options are ignored")
    parser.add_argument("--out", help="output ImageFolder root (must not exist)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--width", type=int, default=400, help="mean image width")
    parser.add_argument("--height", type=int, default=350, help="mean image height")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.test_corpora:
        for name, spec in TEST_CORPORA.items():
            print(f"wrote {make_corpus(Path(args.test_corpora) / name, **spec)}")
        return 0
    if args.out is None:
        parser.error("give --out (or --test-corpora)")
    if args.images < 1 or args.classes < 1:
        parser.error("--images and --classes must be positive")
    try:
        out = make_corpus(args.out, args.images, args.classes, (args.width, args.height),
                          seed=args.seed)
    except FileExistsError as err:
        print(f"make_corpus: {err}", file=sys.stderr)
        return 2
    files = [p for p in out.rglob("img_*.JPEG")]
    mean_kb = sum(p.stat().st_size for p in files) / max(1, len(files)) / 1024
    print(f"wrote {len(files)} JPEGs in {args.classes} classes to {out} (mean {mean_kb:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
