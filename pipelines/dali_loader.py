"""NVIDIA DALI two-view loader: read each JPEG once, decode once, build both BYOL views from it.

On CUDA the decode is `device="mixed"` (nvJPEG, partly on the hardware decoder) and every
augmentation runs on the GPU; with a CPU `LoaderConfig.device` the same graph runs on DALI's CPU
operators (this is how CI tests it). Every random parameter is drawn per sample.

Per view: random resized crop -> colour jitter with p -> grayscale with p -> Gaussian blur with p
-> solarize with p -> flip + normalize in one `crop_mirror_normalize`. Flip is applied last because
it commutes with the photometric ops, so it costs nothing extra there.

Probabilities are expressed through parameters where an op that does not fire costs little: it
gets its identity parameters (a 1-tap blur window, XOR mask 0). Jitter and grayscale instead run
only on the samples that draw them, through DALI's per-sample conditionals (the pipeline is built
with `enable_conditionals`: the batch is split and merged back inside the graph, still one static
graph with no Python per sample), because each costs a full colour map of the image. An op whose
probability is 0 for a view is left out of that view's graph.

Colour jitter (`recipe.jitter`; the formulas of both modes are in pipelines/views.py) uses the
colour maps of pipelines/gpu_augment.py: each op is a 4x4 homogeneous map of the RGB vector, built
from the sample's draws with small per-sample tensor ops on the CPU, the ops compose into one map,
and one `coord_transform` applies it to the uint8 crop (its uint8 result is rounded and saturated,
which is the clip to [0, 1]). On CUDA the crop's mean colour, which the contrast pivots need, comes
back to the CPU as 3 floats per sample (`.cpu()`, allowed by DALI's default dynamic executor).
Random order: the affine ops commute (see `_Jitter`), so only where the non-affine official HSV
saturation falls in the sample's order matters; it is drawn per sample and splits the map there,
with the HSV op (per-pixel max and min, a float blend) in between. Grayscale is a second map, on
the clipped jitter output as in the official code (luma weights 0.2989/0.587/0.114).
Where this departs from the formulas, as in gpu_augment: hue is the YIQ rotation, and values are
clipped per fused segment rather than after every op (bounds in tests/test_jitter_fidelity.py).
DALI's own hue, hsv and colour-twist operators are linear approximations too; an exact HSV hue in
DALI arithmetic (about 30 elementwise operators, which DALI runs one pass each) measured about 4 ms
more per 224-px view on 2 CPU cores, some three times the whole old colour twist.

Choices the recipe leaves open (see also pipelines/views.py):
- Output layout is HWC: a (B, H, W, C) tensor permuted to (B, C, H, W) is already channels_last,
  so the contract's layout costs no copy (CHW output would need one `.contiguous()` copy).
- DALI has float16 but no bfloat16: for bf16 the pipeline emits float16 (normalized values lie
  within +-3, where float16 is finer than bf16) and torch converts it on the device.

Epochs: every epoch runs on a pipeline built for it, whose file list is shuffled with (seed, epoch),
the same on every rank, and whose augmentation seed is (seed, epoch, rank); the reader gives each
rank a contiguous shard, so each sample is read exactly once per epoch across ranks. An epoch's
order and augmentations are thus a function of (seed, epoch) alone: a run resumed mid-epoch (which
draws and skips the batches it already trained on) sees what an uninterrupted run saw; a pipeline
carried over from the previous epoch would reshuffle and draw on from wherever that left it. `drop_last=True`
drops each rank's last partial batch; `drop_last=False` returns it partial (LastBatchPolicy.PARTIAL).

Files DALI cannot read: the scan (datasources/imagefolder.py) knows each file's real format from its
magic bytes, and files whose format DALI's decoder lacks (GIF, even named .JPEG) are left out with a
warning naming them, as the unreadable ones are. A file that vanishes or breaks during the run (or
before the first batch, which the iterator decodes as it is made) fails the whole pipeline: DALI
cannot skip one sample inside its graph. So the loader finds it: the file DALI's error names (the
reader names a file it cannot open), else the files that are missing or fail the scan's checks now,
else, up to DECODE_SEARCH_LIMIT files, those that fail a PIL decode. It drops them with a warning
naming each (`skipped` lists them), rebuilds the pipeline for the same epoch and goes on after the
batches this epoch already gave (the rest of the epoch is drawn from the new file list, so a few
samples may come twice or not at all in it; with several ranks each drops what it meets, so until
the others meet it too their shards may overlap by those files). Where no file is found (ImageNet
size: a corrupt body behind intact markers, which only a full decode finds) the run stops with one
line that says so and names the ways on: `python -m datasources.imagefolder --deep-check ROOT`
(decodes every file at 1/8 scale and lists the ones that fail), or `--loader torchvision`, which
skips such files one by one, naming each. (A full decode check at every start-up would cost
ImageNet minutes per run; the scan's head/tail check costs two small reads per file.)
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.data_node import DataNode
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from datasources.imagefolder import ImageFolderIndex, SkipLog, Unreadable, find_undecodable, inspect_files, load_index
from pipelines.base import Batch, LoaderConfig
from pipelines.gpu_augment import HUE_RADIANS_PER_TURN, ColourBasis
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
# Real formats (datasources.imagefolder's names) DALI's image decoder reads; GIF is not one of them.
DECODABLE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "JPEG2000", "PPM")
# Up to this many files, a failure the quick checks cannot explain is looked for by decoding every file
# of the shard (seconds); beyond it (ImageNet: minutes) the run stops and names the deep check instead.
DECODE_SEARCH_LIMIT = 20_000


class DaliLoaderError(RuntimeError, ValueError):
    """The DALI pipeline could not be built or failed while running; the message says why. Also a
    ValueError: like a bad argument, bad data ends the run with its one line (train.py, exit code 2)."""


def _coin(p: float):
    """Per-sample 0/1 (int32, promoted to float in arithmetic) with P(1) = p."""
    return fn.random.coin_flip(probability=p)


def _uniform(lo: float, hi: float):
    return fn.random.uniform(range=[lo, hi])


def _when(fired, value, identity: float):
    """Per-sample `value` where `fired` is 1, else `identity`."""
    return identity + fired * (value - identity)


def _draw(lo: float, hi: float):
    """Per-sample U[lo, hi], also where the range is a point (an op switched off), which DALI's
    uniform rejects."""
    return fn.constant(fdata=[lo], shape=[]) if lo == hi else _uniform(lo, hi)


def _on_device(img, node):
    """A CPU per-sample value on `img`'s device: an expression's tensor inputs must share one."""
    return node.gpu() if img.device == "gpu" else node


def _const(array) -> DataNode:
    """A per-sample constant float32 tensor (on the CPU, where DALI takes argument inputs)."""
    return types.Constant(np.asarray(array, np.float32))


def _host(node) -> DataNode:
    """A small per-sample result (a mean colour) where the colour maps are built: on the CPU. From a
    GPU op this is a copy of 3 floats per sample inside the pipeline (DALI's default executor)."""
    return node.cpu() if node.device == "gpu" else node


def _matmul(a, b) -> DataNode:
    """Per-sample (4, 4) @ (4, 4)."""
    return fn.reductions.sum(fn.reshape(a, shape=[4, 4, 1]) * fn.reshape(b, shape=[1, 4, 4]), axes=[1])


def _apply(matrix, v) -> DataNode:
    """Per-sample (4, 4) @ (4,)."""
    return fn.reductions.sum(matrix * fn.reshape(v, shape=[1, 4]), axes=[1])


def _embed(m3=None, column=None) -> np.ndarray:
    """A 4x4 homogeneous colour map with linear part m3 (default 0) and offset column (default 0)."""
    out = np.zeros((4, 4))
    out[3, 3] = 1.0
    if m3 is not None:
        out[:3, :3] = m3
    if column is not None:
        out[:3, 3] = column
    return out


_BASIS = {name: part.numpy() for name, part in ColourBasis.build(dtype=torch.float64)._asdict().items()}
_EYE = np.eye(4)
_SCALE = np.diag([1.0, 1.0, 1.0, 0.0])  # f * _SCALE + _CORNER scales the colour by f
_CORNER = _embed()
_SHIFT = _embed(column=np.ones(3)) - _CORNER  # delta * _SHIFT adds delta to every channel
_GRAY_ROWS = _embed(np.tile(_BASIS["gray"], (3, 1))) - _CORNER  # every channel = luma
_HUE = {name: _embed(_BASIS[name]) - _CORNER for name in ("hue_fixed", "hue_cos", "hue_sin")}
_ORDERS = tuple(itertools.permutations(range(4)))  # (brightness, contrast, saturation, hue) at each step
_BRIGHT, _CONTRAST, _SAT, _HUE_OP = range(4)


class _Jitter:
    """Per-sample draws of one view's jitter, and its colour maps as in pipelines/gpu_augment.py:
    each op is a 4x4 homogeneous map on [0, 1] RGB (built with small per-sample tensor ops on the
    CPU), the ops compose into one map, and one `coord_transform` applies it to the image.

    The affine ops commute: each treats luma and chroma (the YIQ planes) separately, shifting or
    scaling luma and scaling, rotating or (official contrast) pulling towards its mean the chroma,
    and a contrast pivots on the mean of the image as it is, which every other op carries along.
    So any order of them gives the same map (to 1e-4: contrast and the gray blend weigh luma
    0.2989/0.587/0.114, the YIQ rotation keeps 0.299/0.587/0.114), and one order is used. Order
    matters only at the non-affine official HSV saturation: each sample draws one of the 24 orders,
    and its map is split into the ops before and after the saturation in that order.
    """

    def __init__(self, spec: ViewSpec, mode: str) -> None:
        self.spec, self.official = spec, mode == "official"
        b, s = spec.brightness, spec.saturation
        self.bright = _draw(-b, b) if self.official else _draw(max(0.0, 1 - b), 1 + b)
        self.contrast = _draw(max(0.0, 1 - spec.contrast), 1 + spec.contrast)
        self.saturation = _draw(max(0.0, 1 - s), 1 + s)
        theta = HUE_RADIANS_PER_TURN * _draw(-spec.hue, spec.hue)
        self.hue = _const(_HUE["hue_fixed"] + _CORNER) + dmath.cos(theta) * _const(_HUE["hue_cos"]) + \
            dmath.sin(theta) * _const(_HUE["hue_sin"])

    def _op(self, op: int, current):
        """The 4x4 map of `op`; `current`: (4,) homogeneous mean colour of the image it applies to."""
        if op == _BRIGHT and self.official:
            return _const(_EYE) + self.bright * _const(_SHIFT)
        if op == _BRIGHT:
            return self.bright * _const(_SCALE) + _const(_CORNER)
        if op == _CONTRAST:
            # The pivot: each channel's own mean (official) or the gray one (torchvision).
            pivot = current * _const([1.0, 1.0, 1.0, 0.0])
            if not self.official:
                pivot = fn.reductions.sum(current * _const([*_BASIS["gray"], 0.0])) * _const([1.0, 1.0, 1.0, 0.0])
            f = self.contrast
            return f * _const(_SCALE) + _const(_CORNER) + (1.0 - f) * fn.reshape(pivot, shape=[4, 1]) * \
                _const([[0.0, 0.0, 0.0, 1.0]])
        if op == _SAT:
            return self.saturation * _const(_SCALE) + (1.0 - self.saturation) * _const(_GRAY_ROWS) + \
                _const(_CORNER)
        return self.hue

    def matrix(self, mean_rgb, included: dict | None = None):
        """The composed 4x4 map of the affine ops. mean_rgb: (3,) mean colour of the input on the
        [0, 1] scale (for the contrast pivots); included: op -> per-sample 0/1, whether the op is
        part of this map (default: every affine op with a strength > 0)."""
        ops = [op for op, name in enumerate(("brightness", "contrast", "saturation", "hue"))
               if getattr(self.spec, name) > 0 and not (op == _SAT and self.official)]
        total = _const(_EYE)
        current = fn.cat(mean_rgb, _const([1.0]))
        for op in ops:
            step = self._op(op, current)
            if included is not None:
                step = _const(_EYE) + included[op] * (step - _const(_EYE))
            total = _matmul(step, total)
            current = _apply(step, current)
        return total

    def before_saturation(self) -> dict:
        """op -> per-sample 0/1: the op comes before the saturation in the sample's random order."""
        order = fn.random.uniform(values=list(range(len(_ORDERS))), dtype=types.INT32)
        return {op: fn.lookup_table(order, keys=list(range(len(_ORDERS))), dtype=types.FLOAT,
                                    values=[float(o.index(op) < o.index(_SAT)) for o in _ORDERS])
                for op in (_BRIGHT, _CONTRAST, _HUE_OP)}


def _transform(img, matrix, dtype: types.DALIDataType):
    """The 4x4 map (on [0, 1] values) applied to an HWC image on the 0-255 scale; a uint8 result is
    rounded and saturated, i.e. clipped to [0, 1]."""
    return fn.coord_transform(img, MT=matrix[0:3] * _const([1.0, 1.0, 1.0, 255.0]), dtype=dtype)


def _mean_rgb(img):
    return _host(fn.reductions.mean(img, axes=[0, 1])) / 255.0


def _hsv_saturation(x, factor):
    """HSV's S -> clip(S * factor, 0, 1) (as gpu_augment.hsv_saturation): x -> V - g (V - x) with
    g = min(factor, V / C), V the max channel, C = V - min; float result."""
    top = fn.reductions.max(x, axes=[2], keep_dims=True)
    low = fn.reductions.min(x, axes=[2], keep_dims=True)
    # Gray pixels (C = 0) have x = V, so any finite g leaves them unchanged.
    g = dmath.min(_on_device(x, factor), top / dmath.max(top - low, 1e-6))
    return g * x + (1.0 - g) * top


def _jitter(img, spec: ViewSpec, mode: str):
    """Colour jitter of `mode` (pipelines/views.py) on uint8 HWC crops, fused into colour maps as in
    pipelines/gpu_augment.py; uint8 result."""
    draws = _Jitter(spec, mode)
    if mode != "official" or spec.saturation == 0:
        return _transform(img, draws.matrix(_mean_rgb(img)), types.UINT8)
    before = draws.before_saturation()
    x = _hsv_saturation(_transform(img, draws.matrix(_mean_rgb(img), before), types.UINT8), draws.saturation)
    after = {op: 1.0 - flag for op, flag in before.items()}
    return fn.cast(_transform(x, draws.matrix(_mean_rgb(x), after), types.FLOAT), dtype=types.UINT8)


def _colour(img, spec: ViewSpec, mode: str):
    """Colour jitter with p = jitter_p, then grayscale with p = grayscale_p, each only on the samples
    that draw it (a per-sample `if`: DALI splits the batch and merges it back)."""
    if spec.jitter_p > 0 and _coin(spec.jitter_p):
        img = _jitter(img, spec, mode)
    if spec.grayscale_p > 0 and _coin(spec.grayscale_p):
        img = fn.coord_transform(img, M=list(np.tile(_BASIS["gray"], 3)), dtype=types.UINT8)
    return img


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
    img = _solarize(_blur(_colour(img, spec, recipe.jitter), spec, recipe.blur_kernel_size), spec)
    mirror = fn.random.coin_flip(probability=spec.flip_p) if spec.flip_p > 0 else 0
    return fn.crop_mirror_normalize(
        img, mirror=mirror, mean=list(recipe.mean_255()), std=list(recipe.std_255()),
        output_layout="HWC", dtype=dtype,
    )


@pipeline_def(enable_conditionals=True)
def two_view_pipeline(files: list[str], labels: list[int], recipe: ViewRecipe, gpu: bool,
                      dtype: types.DALIDataType, shard_id: int, num_shards: int):
    """The DALI graph: read, decode once, and both views from the decode, with the labels.

    `pipeline_def` adds DALI's own keyword arguments (batch_size, num_threads, device_id, seed, ...).

    Parameters
    ----------
    files, labels: the samples in a seeded order identical on every rank; the reader shards this list
        contiguously and reshuffles it after every epoch.
    recipe: both views' specs, resolution and normalization.
    gpu: decode in DALI's "mixed" mode and augment on the GPU (else all on the CPU).
    dtype: the views' DALI dtype (FLOAT or FLOAT16).
    shard_id, num_shards: this rank's shard of `files` (`LoaderConfig.rank`, `LoaderConfig.world_size`).
    """
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
    """Iterates (view1, view2, labels) on `cfg.device`; `bad_files` lists the skipped files.

    Parameters
    ----------
    cfg: the loading options; a CUDA `cfg.device` decodes and augments on that GPU, a CPU one on the
        CPU; `cfg.workers` DALI's CPU threads (at least 1 is used); `cfg.dtype` float32, float16 or
        bfloat16 (bfloat16 views are made in float16 and cast).
    index: the scanned ImageFolder `cfg.data`, formats DALI cannot decode already skipped (`build_loader`).
    """

    def __init__(self, cfg: LoaderConfig, index: ImageFolderIndex):
        self.cfg = cfg
        self.index = index
        self.bad_files = index.bad_files
        self.runtime_skips = SkipLog()
        self._gpu = cfg.device.type == "cuda"
        self._dtype = _dali_dtype(cfg.dtype)
        self._epoch = 0
        self._iterator = self._build(start_epoch=0)
        self._used = False  # whether `_iterator` has given batches: a new epoch then needs a new pipeline

    def _build(self, start_epoch: int) -> DALIGenericIterator:
        """`_build_once`, after dropping the files that make it fail: the iterator decodes its first batch
        as it is made, so a file deleted or broken since the scan can fail it already."""
        while True:
            try:
                return self._build_once(start_epoch)
            except DaliLoaderError as err:
                if not _is_data_error(err.__cause__):
                    raise
                self._drop_failed_files(err.__cause__)

    def _build_once(self, start_epoch: int) -> DALIGenericIterator:
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
            # No auto_reset: the next epoch gets a pipeline of its own, and a reset would prefetch batches.
            return DALIGenericIterator([pipe], list(OUTPUTS), reader_name=READER, last_batch_policy=policy,
                                       auto_reset=False)
        except RuntimeError as err:
            raise DaliLoaderError(f"could not build the DALI pipeline for {self.index.root} on {cfg.device}: "
                                  f"{_reason(err)}") from err

    def __len__(self) -> int:
        return len(self._iterator)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` on a new pipeline (unless the current one was built for it and is unused), so
        its order and augmentations depend only on (seed, epoch), not on how the run got there."""
        if epoch != self._epoch or self._used:
            self._iterator = self._build(start_epoch=epoch)
            self._epoch, self._used = epoch, False

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of the files dropped during the run, in the order met."""
        return self.runtime_skips.skipped

    def __iter__(self) -> Iterator[Batch]:
        if self._used:  # iterated again without set_epoch: the next epoch, on its own pipeline
            self.set_epoch(self._epoch)
        self._used = True
        given = 0  # batches of this epoch already yielded
        while True:
            try:
                for batch in itertools.islice(self._iterator, given, None):
                    given += 1
                    yield self._to_torch(batch[0])
            except StopIteration:
                return
            except RuntimeError as err:
                if not _is_data_error(err):
                    raise DaliLoaderError(f"DALI failed while loading {self.index.root}: {_reason(err)}") from err
                self._drop_failed_files(err)
                # The failed pipeline is no longer valid: the same epoch from the new file list, after
                # the batches it already gave (islice above draws and discards them).
                self._iterator = self._build(start_epoch=self._epoch)
                continue
            break
        self._epoch += 1

    def _drop_failed_files(self, err: RuntimeError) -> None:
        """Take the files behind a run-time DALI failure out of the index (warning with each one's name),
        or raise DaliLoaderError when none can be found."""
        failed = _failed_files(err, [path for path, _ in self.index.samples])
        if not failed:
            checks = ("the scan's checks or a PIL decode (a corrupt body PIL tolerates is likely)"
                      if len(self.index.samples) <= DECODE_SEARCH_LIMIT else
                      "the scan's quick checks (too many files to decode them all now), so a file with intact "
                      "markers but a corrupt body is likely")
            raise DaliLoaderError(
                f"DALI failed while loading {self.index.root}: {_reason(err)}; no file of it is missing or fails "
                f"{checks}: list such files "
                f"with `python -m datasources.imagefolder --deep-check {self.index.root}` and move them out, or "
                "train with --loader torchvision, which skips them one by one, naming each") from err
        for path, reason in failed:
            self.runtime_skips.add(Unreadable(path, reason))
        self.index = self.index.without(failed)
        if not self.index.samples:
            raise DaliLoaderError(f"DALI: no readable file is left in {self.index.root}") from err

    def _to_torch(self, outputs: dict[str, torch.Tensor]) -> Batch:
        device, dtype = self.cfg.device, self.cfg.dtype
        # (B, H, W, C) -> (B, C, H, W) view with channels_last strides: no copy.
        view1, view2 = (outputs[name].permute(0, 3, 1, 2).to(device, dtype, non_blocking=True)
                        for name in OUTPUTS[:2])
        labels = outputs["labels"].view(-1).to(device, torch.int64, non_blocking=True)
        return view1, view2, labels


def _is_data_error(err: BaseException | None) -> bool:
    """Whether a DALI error comes from reading or decoding a file (DALI names the operator that failed)."""
    return isinstance(err, RuntimeError) and any(op in str(err) for op in ("fn.readers.file", "fn.decoders.image"))


def _failed_files(err: RuntimeError, paths: list[str]) -> list[tuple[str, str]]:
    """(path, reason) of the files behind DALI error `err` among `paths`: files deleted since the scan
    when the error names a file that is gone (the reader names a file it cannot open; checking only
    for existence keeps this quick on ImageNet), else every file that now fails the scan's checks or
    is in a format DALI cannot decode (the decoder does not name its file), else, for up to
    DECODE_SEARCH_LIMIT files, every file that fails a full decode."""
    message = str(err)
    named = max((path for path in paths if path in message), key=len, default=None)
    if named is not None and not os.path.exists(named):
        return [(path, "the file no longer exists (deleted after the scan)") for path in paths
                if not os.path.exists(path)]
    failed = []
    for path, (kind, reason) in zip(paths, inspect_files(paths), strict=True):
        if reason is None and kind not in DECODABLE_FORMATS:
            reason = f"now a {kind} file, which DALI cannot decode"
        if reason is not None:
            failed.append((path, reason))
    if not failed and len(paths) <= DECODE_SEARCH_LIMIT:
        failed = find_undecodable(paths)
    return failed


def build_loader(cfg: LoaderConfig) -> DaliTwoViewLoader:
    """This rank's DaliTwoViewLoader over the ImageFolder `cfg.data`, skipping files DALI cannot decode."""
    index = load_index(cfg.data, decoder=("DALI", DECODABLE_FORMATS))
    return DaliTwoViewLoader(cfg, index)
