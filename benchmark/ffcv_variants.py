"""The FFCV decode-once loader against stock FFCV, for the throughput benchmark's `ffcv_variants` section.

Stock FFCV gets two views the documented way: two `RandomResizedCropRGBImageDecoder` PipelineSpecs on
the image field, so every image is decoded twice. fastbyol's `TwoCropDecoder` decodes once and cuts
both crops from that decode. Each is timed two ways:
- `*-crops` stops at the uint8 crops: the work FFCV does on the CPU in training either way;
- `*-full` adds the same `TwoViewAugment` (pipelines/gpu_augment.py) on the training device.
`decode_crop_costs` times one JPEG decode and one crop-resize per image on one thread with FFCV's own
C functions: with decode D and crop C, decoding once instead of twice saves (2D + 2C) / (D + 2C),
the model the measured crops ratio is read against.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import numpy as np

from pipelines.base import Batch, LoaderConfig, TwoViewLoader
from pipelines.views import BYOL_VIEWS

VARIANTS = ("ffcv-once-crops", "ffcv-stock-crops", "ffcv-once-full", "ffcv-stock-full")


class StockFfcvLoader:
    """FFCV's documented way to get two views: two RandomResizedCrop decoders on the image field."""

    def __init__(self, cfg: LoaderConfig, augment: bool) -> None:
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import Squeeze, ToDevice, ToTensor

        from pipelines.ffcv_loader import ShardedOrder
        from pipelines.gpu_augment import TwoViewAugment

        recipe = cfg.recipe
        # As the decode-once loader: on the CPU the batch is already where it must be.
        to_device = [ToDevice(cfg.device, non_blocking=True)] if cfg.device.type != "cpu" else []

        def view_spec() -> PipelineSpec:
            decoder = RandomResizedCropRGBImageDecoder((recipe.res, recipe.res), recipe.crop_scale, recipe.crop_ratio)
            return PipelineSpec("image", decoder=decoder, transforms=[ToTensor(), *to_device])

        self.loader = Loader(
            cfg.data, batch_size=cfg.batch_size, num_workers=cfg.workers, os_cache=True,
            order=ShardedOrder(cfg.rank, cfg.world_size, cfg.seed), seed=cfg.seed, drop_last=cfg.drop_last,
            pipelines={"image": None, "view1": view_spec(), "view2": view_spec(),
                       "label": [IntDecoder(), ToTensor(), Squeeze()]},
        )
        self.augment = TwoViewAugment(recipe, cfg.dtype, compile=cfg.compile).to(cfg.device) if augment else None

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
    """The decode-once loader stopped at its uint8 crops on the training device (no augmentation)."""

    def __init__(self, cfg: LoaderConfig) -> None:
        from pipelines.ffcv_loader import FfcvTwoViewLoader

        self.loader = FfcvTwoViewLoader(cfg)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:
        for crops, labels in self.loader.crops():
            yield crops[:, 0], crops[:, 1], labels


def build_variant(name: str, cfg: LoaderConfig) -> TwoViewLoader:
    """One of VARIANTS on the `.beton` at cfg.data."""
    if name == "ffcv-once-crops":
        return CropsOnly(cfg)
    if name == "ffcv-once-full":
        from pipelines.ffcv_loader import FfcvTwoViewLoader

        return FfcvTwoViewLoader(cfg)
    if name in ("ffcv-stock-crops", "ffcv-stock-full"):
        return StockFfcvLoader(cfg, augment=name.endswith("full"))
    raise ValueError(f"unknown ffcv variant {name!r}; choose from {', '.join(VARIANTS)}")


def decode_crop_costs(paths: list[str], res: int, quality: int, images: int = 200) -> dict:
    """Median single-thread ms of one JPEG decode and one crop-resize (FFCV's imdecode / resize_crop) on
    the first `images` files re-encoded at `quality` as the converter stores them, and the decode-once
    model ratio (2D + 2C) / (D + 2C)."""
    import cv2
    from ffcv.libffcv import imdecode, resize_crop

    from pipelines.ffcv_decoder import random_crop

    recipe = BYOL_VIEWS.with_overrides(res=res)
    decode_ms, crop_ms = [], []
    out = np.empty((res, res, 3), np.uint8)
    for index, path in enumerate(paths[:images]):
        image = cv2.imread(path)
        _, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
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
