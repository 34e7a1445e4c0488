"""The behaviour every ImageFolder two-view loader must show, as a test base class.

A loader's test file subclasses `LoaderContract` and sets `module` (e.g. "pipelines.dali_loader"); pytest
then runs every check below against that loader. A loader that reads another format overrides `prepare`:
`FfcvContract` (at the end) is the contract for the FFCV loader, which reads each folder converted to a
.beton. Checks use independent references: the recipe's mean/std for value ranges, tests/view_stats.py
for per-view probabilities, and images whose content identifies them (flat grey levels) for labels and
epoch coverage.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_files import ODD_BUT_VALID, UNREADABLE
from PIL import Image
from view_stats import OPS, assert_rate, controlled_image, detect, expected_rate, isolate, to_unit

from datasources.ffcv_convert import main as ffcv_convert
from pipelines.base import LoaderConfig
from pipelines.views import BYOL_VIEWS, ViewRecipe

STATS_RES = 32
STATS_FILES = 64
STATS_EPOCHS = 16  # 1024 samples per view: a rate 0.2 is resolved to +-0.056 at 4.5 sigma
ID_IMAGES = 22  # not a multiple of the batch size or of the world size, to exercise partial batches
ID_CLASSES = 3


def _grey(index: int) -> int:
    """Distinct flat grey level of identifiable image `index`."""
    return 20 + 9 * index


def write_folder(root: Path, images: dict[str, np.ndarray]) -> str:
    """Write {'class/name.png': uint8 HWC} as PNGs (lossless, so pixels are exact)."""
    for rel, pixels in images.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / rel)
    return str(root)


def identity_recipe(res: int) -> ViewRecipe:
    """Every random op off and whole-image crops: a view is the normalized input image."""
    recipe = isolate(BYOL_VIEWS.with_overrides(res=res), "flip")
    return replace(recipe, view1=replace(recipe.view1, flip_p=0.0), view2=replace(recipe.view2, flip_p=0.0))


def image_ids(view: torch.Tensor, recipe: ViewRecipe) -> list[int]:
    """Recover identifiable-image indices from identity-recipe views."""
    grey = to_unit(view, recipe).mean(dim=(1, 2, 3)) * 255
    return [round((g - 20) / 9) for g in grey.tolist()]


class OnDevice:
    """A loader seen through the contract's CPU-side checks: every batch must arrive on `device` in
    the contract's layout; the checks then get host copies (with the same strides)."""

    def __init__(self, loader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for view1, view2, labels in self.loader:
            for tensor in (view1, view2, labels):
                assert tensor.device.type == self.device.type, f"batch on {tensor.device}, not {self.device}"
            yield view1.cpu(), view2.cpu(), labels.cpu()


class LoaderContract:
    module: str  # set by the subclass
    device = "cpu"  # "cuda": the same checks on batches made on the GPU

    def prepare(self, folder: str) -> str:
        """The loader's `data` for an ImageFolder tree (a loader reading another format converts it)."""
        return folder

    @pytest.fixture(scope="class")
    @classmethod
    def identifiable_corpus(cls, tmp_path_factory) -> str:
        """ID_IMAGES flat grey 16-px PNGs; image i is in class i % ID_CLASSES."""
        root = tmp_path_factory.mktemp("identifiable")
        images = {f"class_{i % ID_CLASSES}/img_{i:03d}.png": np.full((16, 16, 3), _grey(i), np.uint8)
                  for i in range(ID_IMAGES)}
        return write_folder(root, images)


    @pytest.fixture(scope="class")
    @classmethod
    def controlled_corpora(cls, tmp_path_factory) -> dict[str, str]:
        """For each op in view_stats.OPS, a folder of STATS_FILES copies of its controlled image."""
        copies = range(STATS_FILES)
        return {op: write_folder(tmp_path_factory.mktemp(f"ctl_{op}"),
                                 {f"class_0/{i:03d}.png": controlled_image(op, STATS_RES) for i in copies})
                for op in OPS}


    @pytest.fixture(scope="class")
    @classmethod
    def same_photo_corpus(cls, photo_corpus, tmp_path_factory) -> str:
        """16 copies of one real photo, so any difference between outputs comes from the augmentation."""
        source = sorted(Path(photo_corpus).rglob("*.JPEG"))[0].read_bytes()
        root = tmp_path_factory.mktemp("same_photo")
        (root / "class_0").mkdir()
        for i in range(16):
            (root / "class_0" / f"img_{i:02d}.JPEG").write_bytes(source)
        return str(root)

    def build(self, folder: str, **overrides):
        device = torch.device(self.device)
        cfg = LoaderConfig(**{"data": self.prepare(folder), "batch_size": 8, "workers": 2, "device": device,
                              **overrides})
        loader = importlib.import_module(self.module).build_loader(cfg)
        return loader if device.type == "cpu" else OnDevice(loader, device)

    @pytest.mark.timeout(120)
    def test_batch_shapes_dtype_layout_and_range(self, photo_corpus):
        recipe = BYOL_VIEWS.with_overrides(res=64)
        loader = self.build(photo_corpus, recipe=recipe, batch_size=16)
        assert len(loader) == 64 // 16
        batches = list(loader)
        assert len(batches) == len(loader)
        mean = torch.tensor(recipe.mean).view(1, 3, 1, 1)
        std = torch.tensor(recipe.std).view(1, 3, 1, 1)
        for view1, view2, labels in batches:
            assert labels.dtype == torch.int64 and labels.shape == (16,)
            assert set(labels.tolist()) <= {0, 1, 2, 3}
            for view in (view1, view2):
                assert view.shape == (16, 3, 64, 64) and view.dtype == torch.float32
                assert view.is_contiguous(memory_format=torch.channels_last)
                # Normalized [0, 1] pixels lie in [-mean/std, (1-mean)/std] per channel.
                assert (view >= -mean / std - 1e-4).all() and (view <= (1 - mean) / std + 1e-4).all()
        # Colour jitter and crops spread the values over most of that range.
        everything = torch.cat([torch.cat(b[:2]) for b in batches])
        assert everything.amin() < (-mean / std).max() + 0.5
        assert everything.amax() > ((1 - mean) / std).min() - 0.5

    @pytest.mark.timeout(120)
    def test_bfloat16_output(self, photo_corpus):
        loader = self.build(photo_corpus, recipe=BYOL_VIEWS.with_overrides(res=32), dtype=torch.bfloat16)
        view1, view2, _ = next(iter(loader))
        for view in (view1, view2):
            assert view.dtype == torch.bfloat16 and view.is_contiguous(memory_format=torch.channels_last)

    @pytest.mark.timeout(120)
    def test_labels_match_folder_class(self, identifiable_corpus):
        recipe = identity_recipe(16)
        loader = self.build(identifiable_corpus, recipe=recipe, drop_last=False)
        for view1, view2, labels in loader:
            ids = image_ids(view1, recipe)
            assert ids == image_ids(view2, recipe)
            assert labels.tolist() == [i % ID_CLASSES for i in ids]

    @pytest.mark.timeout(120)
    def test_identical_images_get_different_views(self, same_photo_corpus):
        loader = self.build(same_photo_corpus, recipe=BYOL_VIEWS.with_overrides(res=48), batch_size=16)
        view1, view2, _ = next(iter(loader))
        views = torch.cat([view1, view2]).flatten(1)
        # Every pair of the 32 views differs (per-sample crops), and so do their mean colours.
        distances = torch.cdist(views, views) + torch.eye(32) * 1e9
        assert distances.min() > 1.0
        colours = torch.cat([view1, view2]).mean(dim=(2, 3))
        assert colours.std(dim=0).min() > 0.05

    @pytest.mark.slow
    @pytest.mark.timeout(300)
    @pytest.mark.parametrize("op", OPS)
    def test_view_statistics_match_recipe(self, controlled_corpora, op):
        recipe = isolate(BYOL_VIEWS.with_overrides(res=STATS_RES), op)
        loader = self.build(controlled_corpora[op], recipe=recipe, batch_size=64)
        hits: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for epoch in range(STATS_EPOCHS):
            loader.set_epoch(epoch)
            for view1, view2, _ in loader:
                for view, found in zip((view1, view2), hits, strict=True):
                    found.append(detect(op, to_unit(view, recipe)))
        for v, found in enumerate(hits):
            label = f"{self.module} {op} view{v + 1}"
            assert_rate(torch.cat(found), expected_rate(recipe, op, v), label=label)

    @pytest.mark.timeout(180)
    def test_two_shards_cover_each_epoch_exactly_once(self, identifiable_corpus):
        recipe = identity_recipe(16)
        ranks = [self.build(identifiable_corpus, recipe=recipe, batch_size=4, drop_last=False, rank=r,
                            world_size=2, seed=3) for r in range(2)]
        orders = []
        for epoch in range(2):
            seen = []
            for loader in ranks:
                loader.set_epoch(epoch)
                batches = list(loader)
                assert len(batches) == len(loader)
                seen += [i for view1, _, _ in batches for i in image_ids(view1, recipe)]
            assert sorted(seen) == list(range(ID_IMAGES)), f"epoch {epoch}"
            orders.append(seen)
        assert orders[0] != orders[1]

    @pytest.mark.timeout(120)
    def test_drop_last_gives_only_full_batches(self, identifiable_corpus):
        loader = self.build(identifiable_corpus, recipe=identity_recipe(16), batch_size=4, drop_last=True)
        sizes = [labels.numel() for _, _, labels in loader]
        assert sizes == [4] * (ID_IMAGES // 4) and len(loader) == ID_IMAGES // 4

    @pytest.mark.timeout(180)
    def test_dirty_corpus_skips_unreadable_and_keeps_odd_files(self, dirty_corpus):
        loader = self.build(dirty_corpus, recipe=BYOL_VIEWS.with_overrides(res=32), drop_last=False)
        assert sorted(os.path.basename(path) for path, _ in loader.bad_files) == sorted(UNREADABLE)
        assert all(os.path.isabs(path) and os.path.exists(path) for path, _ in loader.bad_files)
        kept = {os.path.basename(path) for path, _ in loader.index.samples}
        assert set(ODD_BUT_VALID) <= kept
        assert len(loader.index.samples) == 32 + len(ODD_BUT_VALID)
        assert sum(labels.numel() for _, _, labels in loader) == len(loader.index.samples)


class FfcvContract(LoaderContract):
    """The loader contract through the FFCV path: each folder is converted once to a .beton."""

    module = "pipelines.ffcv_loader"
    _betons: dict[str, str] = {}

    def prepare(self, folder: str) -> str:
        if folder not in self._betons:
            out = str(Path(folder).with_name(Path(folder).name + ".beton"))
            assert ffcv_convert(["--src", folder, "--out", out, "--workers", "2"]) == 0
            self._betons[folder] = out
        return self._betons[folder]

    def test_dirty_corpus_skips_unreadable_and_keeps_odd_files(self, dirty_corpus):
        pytest.skip("FFCV reads a converted .beton: test_converter_counts_labels_and_skips_unreadable covers it")
