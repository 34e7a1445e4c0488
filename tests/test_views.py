"""The view recipe's small-image form."""

from __future__ import annotations

from dataclasses import replace

from pipelines.views import BYOL_VIEWS


def test_without_blur_turns_off_only_the_blur():
    small = BYOL_VIEWS.with_overrides(res=16, blur=False)
    assert small.view1.blur_p == small.view2.blur_p == 0.0
    # Everything else is the recipe's, view by view.
    assert replace(small.view1, blur_p=BYOL_VIEWS.view1.blur_p) == BYOL_VIEWS.view1
    assert replace(small.view2, blur_p=BYOL_VIEWS.view2.blur_p) == BYOL_VIEWS.view2
    assert small.res == 16 and small.crop_scale == BYOL_VIEWS.crop_scale


def test_blur_stays_by_default():
    assert BYOL_VIEWS.with_overrides(res=16) == replace(BYOL_VIEWS, res=16)
