"""NVIDIA DALI two-view loader: read each JPEG once, decode once, build both BYOL views from it.

On CUDA the decode is `device="mixed"` (nvJPEG, partly on the hardware decoder) and every
augmentation runs on the GPU; with a CPU `LoaderConfig.device` the same graph runs on DALI's CPU
operators (this is how CI tests it). Every random parameter is drawn per sample.

Per view: random resized crop -> colour twist (jitter with p, grayscale with p) -> Gaussian blur
with p -> solarize with p -> flip + normalize in one `crop_mirror_normalize`. Flip is applied last
because it commutes with the photometric ops, so it costs nothing extra there.

Probabilities are expressed through parameters, not branches: an op that does not fire gets its
identity parameters (brightness 1, a 1-tap blur window, XOR mask 0). That keeps one static graph with no
batch splitting; an op whose probability is 0 for a view is left out of that view's graph.

Choices the recipe leaves open (see also pipelines/views.py):
- DALI's colour twist is one fused linear map, so brightness/contrast/saturation/hue apply in a
  fixed order (not a random one) and contrast pivots on mid-grey rather than the image mean.
  Grayscale is saturation 0 in the same map (luma weights 0.299/0.587/0.114, as torchvision).
- Output layout is HWC: a (B, H, W, C) tensor permuted to (B, C, H, W) is already channels_last,
  so the contract's layout costs no copy (CHW output would need one `.contiguous()` copy).
- DALI has float16 but no bfloat16: for bf16 the pipeline emits float16 (normalized values lie
  within +-3, where float16 is finer than bf16) and torch converts it on the device.

Epochs: files are pre-shuffled with `cfg.seed`, then the reader reshuffles the whole list every
epoch with the same permutation on every rank (`shuffle_after_epoch`) and gives each rank a
contiguous shard, so each sample is read exactly once per epoch across ranks. `drop_last=True`
drops each rank's last partial batch; `drop_last=False` returns it partial (LastBatchPolicy.PARTIAL).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipelines.base import Batch, LoaderConfig
from pipelines.imagefolder import ImageFolderIndex, load_index
from pipelines.views import ViewRecipe, ViewSpec

READER = "Reader"
OUTPUTS = ("view1", "view2", "labels")
# Preallocation hints as in DALI's ResNet-50 example, for ImageNet's JPEGs: nvJPEG's host and device
# buffers and the hardware decoder's output buffers sized up front for the largest image (5980 x 6430),
# so the decoder does not reallocate (and synchronize) during the first epochs.
DEVICE_MEMORY_PADDING = 211025920
HOST_MEMORY_PADDING = 140544512
PREALLOCATE_WIDTH_HINT = 5980
PREALLOCATE_HEIGHT_HINT = 6430
# Share of each batch's baseline JPEGs sent to the hardware JPEG decoder (A100: 5 NVJPG engines,
# H100: 7); the rest decode with CUDA nvJPEG on the SMs, which the training step needs. 0.65 is
# DALI's default, tuned on A100; not yet measured on an H100.
HW_DECODER_LOAD = 0.65


class DaliLoaderError(RuntimeError):
    """The DALI pipeline could not be built or failed while running; the message says why."""


def _coin(p: float):
    """Per-sample 0/1 (int32, promoted to float in arithmetic) with P(1) = p."""
    return fn.random.coin_flip(probability=p)


def _uniform(lo: float, hi: float):
    return fn.random.uniform(range=[lo, hi])


def _when(fired, value, identity: float):
    """Per-sample `value` where `fired` is 1, else `identity`."""
    return identity + fired * (value - identity)


def _colour(img, spec: ViewSpec):
    """Colour jitter with p = jitter_p, then grayscale with p = grayscale_p, as one colour twist."""
    if spec.jitter_p == 0 and spec.grayscale_p == 0:
        return img
    jitter = _coin(spec.jitter_p)
    saturation = _when(jitter, _uniform(1 - spec.saturation, 1 + spec.saturation), 1.0)
    if spec.grayscale_p > 0:
        saturation = saturation * (1.0 - _coin(spec.grayscale_p))
    return fn.color_twist(
        img,
        brightness=_when(jitter, _uniform(max(0.0, 1 - spec.brightness), 1 + spec.brightness), 1.0),
        contrast=_when(jitter, _uniform(max(0.0, 1 - spec.contrast), 1 + spec.contrast), 1.0),
        saturation=saturation,
        # The recipe's hue is a fraction of a turn (torchvision); DALI takes degrees.
        hue=_when(jitter, _uniform(-360.0 * spec.hue, 360.0 * spec.hue), 0.0),
    )


def _blur(img, spec: ViewSpec, kernel: int):
    """Gaussian blur with p = blur_p, sigma ~ U[blur_sigma], window at most the recipe's kernel.

    The window is 2 ceil(3 sigma) + 1 when that is smaller than the recipe's kernel: the cut tails
    hold < 0.3% of each 1-D kernel's mass (at most ~1.4 grey levels, on a hard edge), and the blur,
    the costliest op on CPU, gets about 3x cheaper at 224 px (mean window 9 instead of 23).
    A sample that is not blurred gets a 1-tap window: an exact copy.
    """
    if spec.blur_p == 0:
        return img
    sigma = _uniform(*spec.blur_sigma)
    window = dmath.min(2 * dmath.ceil(3 * sigma) + 1, kernel)
    if spec.blur_p < 1:
        window = _when(_coin(spec.blur_p), window, 1)
    return fn.gaussian_blur(img, window_size=fn.cast(window, dtype=types.INT32), sigma=sigma)


def _solarize(img, spec: ViewSpec):
    """x -> 255 - x where x >= threshold; on uint8, 255 - x is x XOR 255."""
    if spec.solarize_p == 0:
        return img
    # x >= t on the [0, 1] scale is x >= ceil(255 t) on uint8 (128 for t = 0.5).
    threshold = math.ceil(spec.solarize_threshold * 255)
    fired = fn.random.coin_flip(probability=spec.solarize_p, dtype=types.UINT8)
    if img.device == "gpu":  # an expression's tensor inputs must share a device
        fired = fired.gpu()
    mask = (img >= threshold) * fired
    return fn.cast(img ^ (mask * 255), dtype=types.UINT8)


def _view(decoded, recipe: ViewRecipe, spec: ViewSpec, dtype: types.DALIDataType):
    img = fn.random_resized_crop(
        decoded, size=[recipe.res, recipe.res], random_area=list(recipe.crop_scale),
        random_aspect_ratio=list(recipe.crop_ratio), interp_type=types.INTERP_LINEAR, antialias=True,
    )
    img = _solarize(_blur(_colour(img, spec), spec, recipe.blur_kernel_size), spec)
    mirror = fn.random.coin_flip(probability=spec.flip_p) if spec.flip_p > 0 else 0
    return fn.crop_mirror_normalize(
        img, mirror=mirror, mean=list(recipe.mean_255()), std=list(recipe.std_255()),
        output_layout="HWC", dtype=dtype,
    )


@pipeline_def
def two_view_pipeline(files: list[str], labels: list[int], recipe: ViewRecipe, gpu: bool,
                      dtype: types.DALIDataType, shard_id: int, num_shards: int):
    jpegs, label = fn.readers.file(
        files=files, labels=labels, shuffle_after_epoch=True, shard_id=shard_id, num_shards=num_shards,
        stick_to_shard=False, pad_last_batch=True, name=READER,
    )
    if gpu:
        decoded = fn.decoders.image(
            jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=HW_DECODER_LOAD,
            device_memory_padding=DEVICE_MEMORY_PADDING, host_memory_padding=HOST_MEMORY_PADDING,
            preallocate_width_hint=PREALLOCATE_WIDTH_HINT, preallocate_height_hint=PREALLOCATE_HEIGHT_HINT,
        )
        # Labels leave the pipeline on the device too: a per-batch copy from pageable host memory
        # would block the training thread.
        label = label.gpu()
    else:
        decoded = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
    view1, view2 = (_view(decoded, recipe, spec, dtype) for spec in recipe.views)
    return view1, view2, label


def _dali_dtype(dtype: torch.dtype) -> types.DALIDataType:
    if dtype == torch.float32:
        return types.FLOAT
    if dtype in (torch.float16, torch.bfloat16):
        return types.FLOAT16
    raise ValueError(f"the DALI loader emits float32, float16 or bfloat16 views, not {dtype}")


def _seed(*keys: int) -> int:
    """A 31-bit seed mixed from `keys` (DALI takes a non-negative int)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0] >> 1)


def _shuffled(samples: list[tuple[str, int]], seed: int) -> tuple[list[str], list[int]]:
    """The sample list in a seeded random order, identical on every rank.

    Needed because the reader shards a list contiguously: a class-sorted list would give
    each rank (and each epoch's first permutation) a class-skewed slice.
    """
    order = np.random.default_rng(seed).permutation(len(samples))
    return [samples[i][0] for i in order], [samples[i][1] for i in order]


def _reason(err: Exception) -> str:
    """The line of a DALI error that says what went wrong (DALI puts it after 'encountered:')."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1]
    return next((line for line in lines if not line.startswith("Critical error")), type(err).__name__)


class DaliTwoViewLoader:
    """Iterates (view1, view2, labels) on `cfg.device`; `bad_files` lists the skipped files."""

    def __init__(self, cfg: LoaderConfig, index: ImageFolderIndex):
        self.cfg = cfg
        self.index = index
        self.bad_files = index.bad_files
        self._gpu = cfg.device.type == "cuda"
        self._dtype = _dali_dtype(cfg.dtype)
        self._epoch = 0
        self._iterator = self._build(start_epoch=0)

    def _build(self, start_epoch: int) -> DALIGenericIterator:
        """Pipeline starting at `start_epoch`: order and augmentations follow from (seed, start_epoch)."""
        cfg = self.cfg
        files, labels = _shuffled(self.index.samples, seed=_seed(cfg.seed, start_epoch))
        device_id = (cfg.device.index or 0) if self._gpu else None
        try:
            pipe = two_view_pipeline(
                files=files, labels=labels, recipe=cfg.recipe, gpu=self._gpu, dtype=self._dtype,
                shard_id=cfg.rank, num_shards=cfg.world_size,
                batch_size=cfg.batch_size, num_threads=max(1, cfg.workers), device_id=device_id,
                # Augmentations differ per rank; the file order must not (every rank shards the same list).
                seed=_seed(cfg.seed, start_epoch, cfg.rank),
            )
            policy = LastBatchPolicy.DROP if cfg.drop_last else LastBatchPolicy.PARTIAL
            return DALIGenericIterator([pipe], list(OUTPUTS), reader_name=READER, last_batch_policy=policy,
                                       auto_reset=True)
        except RuntimeError as err:
            raise DaliLoaderError(f"could not build the DALI pipeline for {self.index.root} on {cfg.device}: "
                                  f"{_reason(err)}") from err

    def __len__(self) -> int:
        return len(self._iterator)

    def set_epoch(self, epoch: int) -> None:
        """The reader reshuffles every epoch by itself; jumping to another epoch (resuming) rebuilds
        the pipeline so its order depends only on (seed, epoch), not on how the run got there."""
        if epoch != self._epoch:
            self._iterator = self._build(start_epoch=epoch)
            self._epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        try:
            for batch in self._iterator:
                yield self._to_torch(batch[0])
        except StopIteration:
            return
        except RuntimeError as err:
            raise DaliLoaderError(f"DALI failed while loading {self.index.root}: {_reason(err)}") from err
        self._epoch += 1

    def _to_torch(self, outputs: dict[str, torch.Tensor]) -> Batch:
        device, dtype = self.cfg.device, self.cfg.dtype
        # (B, H, W, C) -> (B, C, H, W) view with channels_last strides: no copy.
        view1, view2 = (outputs[name].permute(0, 3, 1, 2).to(device, dtype, non_blocking=True)
                        for name in OUTPUTS[:2])
        labels = outputs["labels"].view(-1).to(device, torch.int64, non_blocking=True)
        return view1, view2, labels


def build_loader(cfg: LoaderConfig) -> DaliTwoViewLoader:
    index = load_index(cfg.data)
    return DaliTwoViewLoader(cfg, index)
