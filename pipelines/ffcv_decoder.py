"""FFCV decoder op that decodes each image ONCE and emits the two random-resized crops of both views.

Stock FFCV makes a second view with a second PipelineSpec on the same field, which decodes every
JPEG twice. `TwoCropDecoder` decodes into a scratch buffer and resizes two independent crops out
of it: output (B, 2, res, res, 3) uint8, view index on axis 1.

Randomness: FFCV's own decoders draw from numba's thread-local np.random streams, so their crops
depend on which thread handled which sample and cannot be reproduced. Here every crop parameter
comes from a counter-based generator (splitmix64) keyed by (seed, epoch, sample index, view), so a
sample's two crops in a given epoch are the same whatever the thread count or batch composition.
The epoch lives in a one-element array whose address is compiled into the op (numba freezes array
contents but not memory behind a pointer), so `set_epoch` needs no recompilation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.libffcv import ctypes_memcopy, imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

from pipelines.views import ViewRecipe

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 draws before the centre fallback


@numba.njit(inline="always")
def _splitmix(x: np.uint64) -> np.uint64:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit
def sample_key(seed: int, epoch: int, index: int, view: int) -> np.uint64:
    """Independent 64-bit stream key per (seed, epoch, sample, view).

    Parameters
    ----------
    seed: the run's seed (`LoaderConfig.seed`), non-negative.
    epoch: the epoch of the draw (`TwoCropDecoder.set_epoch`).
    index: the sample's index in the .beton (not its position in the batch).
    view: 0 or 1.
    """
    key = _splitmix(np.uint64(seed) + _GOLDEN)
    key = _splitmix(key ^ np.uint64(epoch))
    key = _splitmix(key ^ np.uint64(index))
    return _splitmix(key ^ np.uint64(view))


@numba.njit
def _uniform(state: np.uint64) -> tuple[float, np.uint64]:
    state = state + _GOLDEN
    return float(_splitmix(state) >> np.uint64(11)) * (1.0 / 9007199254740992.0), state


@numba.njit
def random_crop(
    height: int, width: int, scale_lo: float, scale_hi: float, log_ratio_lo: float, log_ratio_hi: float,
    seed: int, epoch: int, index: int, view: int,
) -> tuple[int, int, int, int]:  # fmt: skip
    """torchvision's RandomResizedCrop parameters (top, left, h, w) of `view` of sample `index` in
    `epoch`, deterministic per (seed, epoch, index, view).

    Area fraction U[scale], log aspect ratio U[log_ratio]; after 10 rejected draws, the largest
    centred crop with the nearest allowed aspect ratio.

    Parameters
    ----------
    height, width: the decoded image's size in pixels.
    scale_lo, scale_hi: the crop's area as a fraction of the image's (`ViewRecipe.crop_scale`).
    log_ratio_lo, log_ratio_hi: natural logs of the aspect ratio (width / height) bounds (`ViewRecipe.log_ratio`).
    seed, epoch, index, view: the key of the draw (`sample_key`).
    """
    state = sample_key(seed, epoch, index, view)
    area = height * width
    for _ in range(_CROP_TRIES):
        u_area, state = _uniform(state)
        u_ratio, state = _uniform(state)
        target = area * (scale_lo + (scale_hi - scale_lo) * u_area)
        ratio = math.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * u_ratio)
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            u_top, state = _uniform(state)
            u_left, state = _uniform(state)
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < math.exp(log_ratio_lo):
        w, h = width, min(height, int(round(width / math.exp(log_ratio_lo))))
    elif in_ratio > math.exp(log_ratio_hi):
        w, h = min(width, int(round(height * math.exp(log_ratio_hi)))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def scratch_pixels(heights: np.ndarray, widths: np.ndarray) -> np.uint64:
    """Pixels of the largest single image: the decode buffer each sample of a batch needs.

    Not max(height) x max(width): in a dataset with one tall and one wide image that is far larger
    than any image, and FFCV pins every scratch buffer on CUDA machines (per rank, per batch slot).
    uint64 avoids overflow for large images.

    Parameters
    ----------
    heights, widths: per-sample image sizes in pixels (the .beton's image metadata), in the same order.
    """
    return np.uint64((heights.astype(np.uint64) * widths.astype(np.uint64)).max())


class TwoCropDecoder(Operation):
    """Decode an RGBImageField once; emit two random-resized crops per sample, (2, res, res, 3) uint8.

    Call `set_epoch(epoch)` before each epoch's iteration: the crops are keyed by (seed, epoch, sample, view).

    Parameters
    ----------
    recipe: the crops' output side (`res`), area fractions (`crop_scale`) and aspect ratios (`crop_ratio`).
    seed: the run's seed (`LoaderConfig.seed`); crops depend only on it, the epoch, the sample and the view.
    """

    def __init__(self, recipe: ViewRecipe, seed: int = 0) -> None:
        super().__init__()
        self.res = recipe.res
        self.scale = recipe.crop_scale
        self.log_ratio = recipe.log_ratio
        self.seed = seed
        self._epoch = np.zeros(1, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        max_pixels = scratch_pixels(self.metadata["height"], self.metadata["width"])
        shape = (2, self.res, self.res, 3)
        dtype = np.dtype("<u1")
        return (
            replace(previous_state, jit_mode=True, shape=shape, dtype=dtype),
            (AllocationQuery(shape, dtype), AllocationQuery((max_pixels * np.uint64(3),), dtype)),
        )

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        seed = self.seed
        scale_lo, scale_hi = self.scale
        ratio_lo, ratio_hi = self.log_ratio
        epoch_address = self._epoch.ctypes.data

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, scratch = my_storage
            epoch_now = np.empty(1, dtype=np.int64)
            ctypes_memcopy(epoch_address, epoch_now.ctypes.data, 8)
            epoch = epoch_now[0]
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    pixels = scratch[dst_ix]
                    imdecode_c(image_data, pixels, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = pixels.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                for view in range(2):
                    top, left, h, w = random_crop(
                        height, width, scale_lo, scale_hi, ratio_lo, ratio_hi, seed, epoch, source_ix, view
                    )
                    resize_crop_c(image, top, top + h, left, left + w, destination[dst_ix, view])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode
