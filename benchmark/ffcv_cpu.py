"""CPU benchmark: decode-once FFCV loader vs stock FFCV (two PipelineSpecs, two decodes) vs torchvision.

    python -m benchmark.make_corpus --out /tmp/ffcv_corpus --images 1000 --classes 10
    python -m pipelines.ffcv_convert --src /tmp/ffcv_corpus --out /tmp/ffcv_corpus.beton --write-mode jpg
    python -m benchmark.ffcv_cpu --beton /tmp/ffcv_corpus.beton --data /tmp/ffcv_corpus [--cores 2]

Images/s, an image = two views; warm-up excluded, median of repeats (benchmark.loaders_cpu's
`measure_loader`). Both FFCV variants are timed twice: 'crops' stops at the uint8 crops (the work
FFCV does on the CPU in training too), 'full' adds the same TwoViewAugment on the CPU (on a GPU that
part is a few milliseconds per batch; the augment is compiled as the trainer compiles it unless
--no-compile). It also times one JPEG decode and one crop-resize per image on one thread with
FFCV's own C functions: with decode D and crop C, the simple model of decoding once vs twice is
(2D + 2C) / (D + 2C), which tells how much the decode-once design can gain on a given corpus (the
loaders' per-batch overheads move the measured ratio around it).
Writes a table and benchmark/results/cpu-<date>-ffcv.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.pipeline import PipelineSpec
from ffcv.transforms import Squeeze, ToTensor

from benchmark.loaders_cpu import measure_loader, pin_cores, save_cpu_report
from pipelines.base import Batch, LoaderConfig
from pipelines.ffcv import FfcvTwoViewLoader, ShardedOrder
from pipelines.ffcv_convert import DEFAULT_JPEG_QUALITY
from pipelines.ffcv_decoder import random_crop
from pipelines.gpu_augment import TwoViewAugment
from pipelines.imagefolder import scan_image_folder
from pipelines.registry import build_loader
from pipelines.views import BYOL_VIEWS


class StockFfcvLoader:
    """FFCV's documented way to get two views: two RandomResizedCrop decoders on the image field."""

    def __init__(self, cfg: LoaderConfig, augment: bool) -> None:
        recipe = cfg.recipe

        def view_spec() -> PipelineSpec:
            decoder = RandomResizedCropRGBImageDecoder((recipe.res, recipe.res), recipe.crop_scale, recipe.crop_ratio)
            return PipelineSpec("image", decoder=decoder, transforms=[ToTensor()])

        self.loader = Loader(
            cfg.data,
            batch_size=cfg.batch_size,
            num_workers=cfg.workers,
            os_cache=True,
            order=ShardedOrder(cfg.rank, cfg.world_size, cfg.seed),
            seed=cfg.seed,
            drop_last=cfg.drop_last,
            pipelines={
                "image": None,
                "view1": view_spec(),
                "view2": view_spec(),
                "label": [IntDecoder(), ToTensor(), Squeeze()],
            },
        )
        self.augment = TwoViewAugment(recipe, cfg.dtype) if augment else None

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        # FFCV yields field pipelines ('label') first, then the extra outputs in insertion order.
        for labels, crops1, crops2 in self.loader:
            if self.augment is not None:
                crops1, crops2 = self.augment(crops1, crops2)
            yield crops1, crops2, labels


class CropsOnly:
    """The decode-once loader stopped at its uint8 crops (no augmentation)."""

    def __init__(self, loader: FfcvTwoViewLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:
        for crops, labels in self.loader.crops():
            yield crops[:, 0], crops[:, 1], labels


def build(name: str, args: argparse.Namespace, cfg: LoaderConfig):
    if name == "ffcv-once-crops":
        return CropsOnly(FfcvTwoViewLoader(cfg))
    if name == "ffcv-once-full":
        return FfcvTwoViewLoader(cfg)
    if name == "ffcv-stock-crops":
        return StockFfcvLoader(cfg, augment=False)
    if name == "ffcv-stock-full":
        return StockFfcvLoader(cfg, augment=True)
    if name == "torchvision":
        return build_loader("torchvision", LoaderConfig(**{**cfg.__dict__, "data": args.data}))
    raise ValueError(f"unknown loader {name}")


def decode_crop_costs(corpus: str, res: int, images: int = 200) -> dict:
    """Median single-thread ms of one JPEG decode and one crop-resize (FFCV's imdecode/resize_crop),
    on the corpus images re-encoded as the converter stores them, and the decode-once model ratio."""
    recipe = BYOL_VIEWS.with_overrides(res=res)
    decode_ms, crop_ms = [], []
    out = np.empty((res, res, 3), np.uint8)
    for index, (path, _) in enumerate(scan_image_folder(corpus).samples[:images]):
        image = cv2.imread(path)
        _, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, DEFAULT_JPEG_QUALITY])
        height, width = image.shape[:2]
        pixels = np.empty((height, width, 3), np.uint8)
        start = time.perf_counter()
        imdecode(jpeg.reshape(-1), pixels, height, width, height, width, 0, 0, 1, 1, False, False)
        decode_ms.append((time.perf_counter() - start) * 1e3)
        top, left, h, w = random_crop(height, width, *recipe.crop_scale, *recipe.log_ratio, 0, 0, index, 0)
        start = time.perf_counter()
        resize_crop(pixels, top, top + h, left, left + w, out)
        crop_ms.append((time.perf_counter() - start) * 1e3)
    decode, crop = statistics.median(decode_ms), statistics.median(crop_ms)
    return {"images": len(decode_ms), "decode_ms": decode, "crop_ms": crop,
            "once_vs_twice_model": (2 * decode + 2 * crop) / (decode + 2 * crop)}


LOADERS = ("ffcv-once-crops", "ffcv-stock-crops", "ffcv-once-full", "ffcv-stock-full", "torchvision")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beton", required=True, help="jpg-mode .beton of the corpus (pipelines.ffcv_convert)")
    parser.add_argument("--data", help="the corpus ImageFolder, for the torchvision baseline (skipped without)")
    parser.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS))
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the CPU augment, as train.py does by default")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    loaders = [n for n in args.loaders if n != "torchvision" or args.data]

    cores = pin_cores(args.cores)
    load_before = os.getloadavg()[0]
    cfg = LoaderConfig(
        data=args.beton, batch_size=args.batch, recipe=BYOL_VIEWS.with_overrides(res=args.res), workers=len(cores),
        compile=args.compile,
    )
    costs = decode_crop_costs(args.data, args.res) if args.data else None
    if costs:
        print(f"per image, one thread: decode {costs['decode_ms']:.3f} ms, crop-resize {costs['crop_ms']:.3f} ms "
              f"-> decode-once model {costs['once_vs_twice_model']:.2f}x", flush=True)
    results = {}
    for name in loaders:
        loader = build(name, args, cfg)
        results[name] = measure_loader(loader, args.warmup, args.batches, args.repeats)
        print(f"{name:<18}{results[name]['images_per_s']:>9.1f} images/s", flush=True)
        del loader
        gc.collect()

    def ratio(a: str, b: str) -> float | None:
        if a in results and b in results:
            return results[a]["images_per_s"] / results[b]["images_per_s"]
        return None

    speedups = {
        "once_vs_stock_crops": ratio("ffcv-once-crops", "ffcv-stock-crops"),
        "once_vs_stock_full": ratio("ffcv-once-full", "ffcv-stock-full"),
        "once_full_vs_torchvision": ratio("ffcv-once-full", "torchvision"),
    }
    print(f"\n{'loader':<18}{'images/s':>10}   runs")
    for name, result in results.items():
        runs = ", ".join(f"{rate:.0f}" for rate in result["runs_images_per_s"])
        print(f"{name:<18}{result['images_per_s']:>10.1f}   {runs}")
    for key, value in speedups.items():
        print(f"{key:<28}{'-' if value is None else f'{value:.2f}x'}")

    save_cpu_report(
        "ffcv", cores, load_before,
        {
            "beton": str(Path(args.beton).resolve()),
            "data": args.data,
            "res": args.res,
            "batch_size": args.batch,
            "recipe": "BYOL_VIEWS (full)",
            "augment_compiled": args.compile,
            "image": "two views; 'crops' = uint8 crops only, 'full' = + TwoViewAugment on CPU",
        },
        {"results": results, "speedups": speedups, "per_image_costs": costs},
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
