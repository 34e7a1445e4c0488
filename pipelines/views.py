"""The BYOL view recipe: the one definition of both augmented views that every loader reads.

Numbers follow docs/recipe.md (Grill et al. 2020, Table 6). Loaders must not hard-code
any of them; CLI flags override fields through `ViewRecipe.with_overrides`.

Colour jitter (`ViewRecipe.jitter`, one of JITTER_MODES) on RGB x in [0, 1]; each pixel is a vector
(r, g, b), mean_c is channel c's spatial mean over the image as it is at that op, V = max(r, g, b),
m = min(r, g, b), C = V - m, gray(x) = 0.2989 r + 0.587 g + 0.114 b (both references' weights):

  op          "official" (DeepMind byol/utils/augmentations.py)      "torchvision" (transforms.v2.ColorJitter)
  brightness  x + d,  d ~ U[-b, b]                                   x * f,  f ~ U[max(0, 1 - b), 1 + b]
  contrast    (x_c - mean_c) * f + mean_c, per channel c,            (x - M) * f + M, M = spatial mean of gray(x),
              f ~ U[max(0, 1 - c), 1 + c]                            f ~ U[max(0, 1 - c), 1 + c]
  saturation  HSV: S -> clip(S * f, 0, 1), i.e.                      blend with the gray image:
              x_c -> V - g (V - x_c), g = min(f, V / C),             x -> gray(x) + f (x - gray(x)),
              f ~ U[max(0, 1 - s), 1 + s]                            f ~ U[max(0, 1 - s), 1 + s]
  hue         HSV: H -> (H + d) mod 1,  d ~ U[-h, h] turns           the same (a positive d turns red towards green)

In both modes the four ops run in a random order per sample and every op's result is clipped to
[0, 1] before the next; an op whose strength is 0 is skipped. Factors are clamped at 0 (the recipe's
strengths are below 1, so this never applies). Grayscale (p = grayscale_p, after the jitter) sets
every channel to gray(x) in both modes. The modes differ in brightness (official moves a pixel by
up to 0.4, torchvision by up to 0.4 x, about half as far on a typical photo), in the contrast pivot
(per-channel means keep each channel's mean, so a colour cast survives; the gray mean pulls the
channel means together) and in saturation (HSV keeps each pixel's V = max channel, the gray blend
keeps its luma).
The torchvision loader applies these formulas as written; dali and gpu_augment fuse each sample's
chain into colour maps and approximate it (hue as a YIQ rotation, a clip per fused segment), as their
module docstrings say; tests/test_jitter_fidelity.py measures all three against them.

Other documented choices where the recipe allows two:
- Crop interpolation is bilinear (the common fast choice); the official code uses bicubic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JITTER_MODES = ("official", "torchvision")


@dataclass(frozen=True)
class ViewSpec:
    """Per-view photometric augmentations; each probability is drawn independently per sample.

    Attributes
    ----------
    flip_p: probability of a horizontal flip.
    jitter_p: probability of the colour jitter (all four ops together; each is skipped at strength 0).
    brightness, contrast, saturation, hue: the jitter strengths; the factor and shift laws of each are
        in the module docstring (hue in turns of the colour wheel: 0.1 is up to 36 degrees).
    grayscale_p: probability of the grayscale op, after the jitter.
    blur_p: probability of the Gaussian blur; its kernel size is `ViewRecipe.blur_kernel_size`.
    blur_sigma: (low, high) of the blur's sigma ~ U[low, high], in output pixels.
    solarize_p: probability of solarizing, the last photometric op.
    solarize_threshold: see the comment below.
    """

    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    # On the [0, 1] scale: x -> 1 - x where x >= threshold.
    solarize_threshold: float = 0.5


@dataclass(frozen=True)
class ViewRecipe:
    """Geometry shared by both views plus the two asymmetric photometric specs.

    Attributes
    ----------
    res: side in pixels of both (square) output views.
    crop_scale: (low, high) of the random-resized crop's area as a fraction of the image's area.
    crop_ratio: (low, high) of the crop's aspect ratio (width / height), drawn log-uniformly.
    blur_kernel_fraction: see the comment below (`blur_kernel_size`).
    mean, std: per-channel RGB normalization on the [0, 1] scale (ImageNet's); `mean_255`/`std_255`
        give them on the 0-255 scale.
    view1, view2: the photometric specs of the two views; by default view1 is always blurred and never
        solarized, view2 rarely blurred and sometimes solarized (the recipe's asymmetry).
    jitter: see the comment below.
    """

    res: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # The recipe's 23 px kernel at 224 px is 10% of the side, rounded to the next odd size.
    blur_kernel_fraction: float = 0.1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    view1: ViewSpec = field(default_factory=lambda: ViewSpec(blur_p=1.0, solarize_p=0.0))
    view2: ViewSpec = field(default_factory=lambda: ViewSpec(blur_p=0.1, solarize_p=0.2))
    # The colour-jitter formulas of both views, one of JITTER_MODES (see the module docstring).
    jitter: str = "official"

    def __post_init__(self) -> None:
        if self.jitter not in JITTER_MODES:
            raise ValueError(f"jitter must be one of {', '.join(JITTER_MODES)}, got {self.jitter!r}")

    @property
    def views(self) -> tuple[ViewSpec, ViewSpec]:
        return (self.view1, self.view2)

    @property
    def blur_kernel_size(self) -> int:
        """Odd Gaussian kernel size for the output resolution (23 at 224, 7 at 64, 3 at 28)."""
        size = math.ceil(self.blur_kernel_fraction * self.res)
        return max(3, size if size % 2 == 1 else size + 1)

    @property
    def log_ratio(self) -> tuple[float, float]:
        return (math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))

    def mean_255(self) -> tuple[float, ...]:
        return tuple(m * 255.0 for m in self.mean)

    def std_255(self) -> tuple[float, ...]:
        return tuple(s * 255.0 for s in self.std)

    def without_blur(self) -> ViewRecipe:
        """The small-image form (solo-learn's CIFAR BYOL recipe): no Gaussian blur in either view. At
        16-32 px the recipe's sigma of up to 2 px erases the image (the official kernel rule,
        2 * int(res / 20) + 1 taps, already blurs nothing below 20 px)."""
        return replace(self, view1=replace(self.view1, blur_p=0.0), view2=replace(self.view2, blur_p=0.0))

    def with_overrides(self, res: int | None = None, min_scale: float | None = None,
                       blur: bool = True, jitter: str | None = None) -> ViewRecipe:
        """Return a copy with CLI overrides applied (None keeps the recipe value; blur=False: `without_blur`).

        Parameters
        ----------
        res: --res, the output side in pixels (at least 8; ValueError below).
        min_scale: --min-scale, the smallest crop area fraction; in (0, crop_scale[1]], else ValueError.
        blur: --blur; False drops the Gaussian blur from both views.
        jitter: --jitter, one of JITTER_MODES (ValueError from the new recipe otherwise).
        """
        recipe = self if blur else self.without_blur()
        if jitter is not None:
            recipe = replace(recipe, jitter=jitter)
        if res is not None:
            if res < 8:
                raise ValueError(f"--res must be at least 8 pixels, got {res}")
            recipe = replace(recipe, res=res)
        if min_scale is not None:
            if not 0.0 < min_scale <= recipe.crop_scale[1]:
                raise ValueError(f"--min-scale must be in (0, {recipe.crop_scale[1]}], got {min_scale}")
            recipe = replace(recipe, crop_scale=(min_scale, recipe.crop_scale[1]))
        return recipe


BYOL_VIEWS = ViewRecipe()
