"""The semi-supervised protocol (evaluation/finetune.py): class-balanced label subsets, the fine-tune, the
random-init baseline of the same network, and `python -m evaluation.finetune` end to end."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from image_files import class_folders

import evaluation.finetune as ft
from evaluation import ArraySet
from evaluation.data import eval_splits
from models.backbones import build_backbone
from models.export import save_backbone

# 100 labels in 3 classes of 50, 45 and 5 images, interleaved.
LABELS = torch.tensor([0, 1] * 45 + [0] * 5 + [2] * 5)


def test_subsets_are_class_balanced_deterministic_and_nested():
    subset = ft.draw_subset(LABELS, 3, 0.3, seed=0)
    # round(0.3 * 100 / 3) = 10 of each class; class 2 has only 5, and gives all of them.
    assert Counter(LABELS[subset].tolist()) == {0: 10, 1: 10, 2: 5}
    assert len(set(subset.tolist())) == len(subset) == 25
    assert torch.equal(subset, ft.draw_subset(LABELS, 3, 0.3, seed=0))
    assert not torch.equal(subset, ft.draw_subset(LABELS, 3, 0.3, seed=1))
    smaller = ft.draw_subset(LABELS, 3, 0.06, seed=0)  # 2 of each class, among the 30% subset's images
    assert Counter(LABELS[smaller].tolist()) == {0: 2, 1: 2, 2: 2} and set(smaller.tolist()) <= set(subset.tolist())


def test_too_small_a_share_names_the_smallest_that_works():
    with pytest.raises(ValueError, match=r"^1% of 100 labelled training images is fewer than one per class for "
                                         r"3 classes: give at least 3%$"):
        ft.draw_subset(LABELS, 3, 0.01)
    assert len(ft.draw_subset(LABELS, 3, 0.03)) == 3


@pytest.mark.parametrize("text", ["0%", "101%", "-1%", "abc", "nan", "1.5"])
def test_a_share_outside_0_to_100_percent_is_one_line(text):
    with pytest.raises(ValueError, match=rf"^--labels {text}: give shares"):
        ft.parse_fractions([text])
    assert ft.parse_fractions(["1%", "10%", "0.5", "100%"]) == [0.01, 0.1, 0.5, 1.0]


def folders(root: Path, train_per_class: int = 4) -> tuple[str, str]:
    """A train and a test ImageFolder of two classes (separate files; test has 2 images per class)."""
    return (class_folders(root / "train", ["a", "b"], train_per_class),
            class_folders(root / "test", ["a", "b"], 2))


def test_subsets_come_from_the_training_folder_and_a_shared_file_is_refused(tmp_path):
    train_root, test_root = folders(tmp_path, train_per_class=10)
    train_set, test_set = eval_splits(train_root, test_root, workers=0)
    ft.check_disjoint(train_set, test_set)
    files = [train_set.samples[i][0] for i in ft.draw_subset(train_set.labels, 2, 0.4)]
    assert len(files) == 8 and Counter(Path(f).parent.name for f in files) == {"a": 4, "b": 4}
    test_files = {str(p) for p in Path(test_root).rglob("*.png")}
    assert all(f.startswith(train_root) for f in files) and not set(files) & test_files
    same, _ = eval_splits(train_root, train_root, workers=0)
    with pytest.raises(ValueError, match=r"^--val-data shares 20 image files with --data"):
        ft.check_disjoint(train_set, same)


def tiny_set(count: int = 16, side: int = 8) -> ArraySet:
    """Two classes told apart by brightness (dark / bright grey noise), in memory."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(count) % 2
    images = torch.randint(0, 100, (count, side, side), generator=g, dtype=torch.uint8) + 150 * labels[:, None, None]
    return ArraySet(images.to(torch.uint8), labels, 2)


def test_the_fine_tune_updates_the_encoder_and_the_head():
    torch.manual_seed(0)
    encoder, dim = build_backbone("resnet18", small_images=True, width=2)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    model, steps = ft.finetune(encoder, dim, tiny_set(), torch.device("cpu"), res=8,
                               settings=ft.FinetuneSettings(epochs=10, batch_size=8))
    assert steps == 20 and model[0] is encoder
    # Every conv and BN weight of the encoder moved (a frozen or detached encoder would leave them equal)...
    after = encoder.state_dict()
    unchanged = [k for k, v in before.items() if v.is_floating_point() and torch.equal(v, after[k])]
    assert not unchanged
    # ...and the trained classifier separates the two brightness classes it was fine-tuned on (1 of 6 seeds does
    # after 2 epochs, all 6 after 10).
    assert ft.top1(model, tiny_set(), torch.device("cpu"), res=8) == 1.0


@pytest.mark.parametrize(("small_images", "width", "zero_init_residual", "head"),
                         [(True, 4, True, "probe"), (False, 2, False, "new")])
def test_the_random_init_baseline_is_the_checkpoints_network(tmp_path, monkeypatch, small_images, width,
                                                             zero_init_residual, head):
    trained, _ = build_backbone("resnet18", small_images=small_images, width=width)
    save_backbone(tmp_path / "backbone.pt", trained, arch="resnet18", width=width, small_images=small_images, res=16,
                  zero_init_residual=zero_init_residual)
    saved = torch.load(tmp_path / "backbone.pt", weights_only=True)["state_dict"]
    started_from = []

    def recording_finetune(encoder, *args, head=None, **kwargs):
        started_from.append(({k: v.clone() for k, v in encoder.state_dict().items()}, copy.deepcopy(head)))
        return real_finetune(encoder, *args, head=head, **kwargs)

    real_finetune = ft.finetune
    monkeypatch.setattr(ft, "finetune", recording_finetune)
    encoder, info = ft.load_backbone(tmp_path / "backbone.pt")
    test_set = tiny_set(8, side=16)
    results, _ = ft.compare_on_subsets(encoder, info, tiny_set(side=16), test_set, [0.5], "cpu", 16,
                                       ft.FinetuneSettings(epochs=1, batch_size=4, lr_choices=(0.05,), head=head),
                                       log=lambda line: None)
    (pretrained, pretrained_head), (random_init, new_head) = started_from
    # Both start from the saved file's tensors' names and shapes (arch, width and stem); only the values differ.
    for state in (pretrained, random_init):
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in saved.items()}
    assert all(torch.equal(v, saved[k]) for k, v in pretrained.items())  # the saved network as it is
    assert not torch.equal(random_init["conv1.weight"], saved["conv1.weight"])
    # ...initialised as the pretraining run initialised it: residual blocks that start as their shortcuts or not.
    last_norm_scales = [v for k, v in random_init.items() if k.endswith(".bn2.weight")]
    assert len(last_norm_scales) == 8
    assert all(bool(torch.all(v == 0)) == zero_init_residual and bool(torch.all(v == 1)) != zero_init_residual
               for v in last_norm_scales)
    if head == "probe":  # LP-FT: the pretrained start's head is the frozen probe, which scores the probe's top-1
        reference, _ = build_backbone("resnet18", small_images=small_images, width=width)
        reference.load_state_dict(saved)
        probe_top1 = ft.top1(nn.Sequential(reference, pretrained_head), test_set, torch.device("cpu"), res=16)
        assert probe_top1 == pytest.approx(results["50%"]["frozen_probe_top1"], abs=1e-6)
    else:  # the default: a new head, as the random-init start gets
        assert pretrained_head is None
    assert new_head is None  # the random-init baseline gets a new head
    assert all(torch.equal(v, saved[k]) for k, v in encoder.state_dict().items())  # the caller's encoder is kept
    assert set(results["50%"]) >= {"labels", "finetune_top1", "random_init_finetune_top1", "frozen_probe_top1",
                                   "epochs", "seconds"}


def test_the_held_out_split_is_class_balanced_disjoint_and_deterministic():
    fit, held = ft.held_out_split(LABELS, 3, share=0.2, seed=0)
    # round(0.2 * n) of each class of n (50, 45, 5 images): 10, 9 and 1; the rest to fit.
    assert Counter(LABELS[held].tolist()) == {0: 10, 1: 9, 2: 1}
    assert Counter(LABELS[fit].tolist()) == {0: 40, 1: 36, 2: 4}
    assert sorted(fit.tolist() + held.tolist()) == list(range(len(LABELS)))
    again = ft.held_out_split(LABELS, 3, share=0.2, seed=0)
    assert torch.equal(fit, again[0]) and torch.equal(held, again[1])
    assert not torch.equal(held, ft.held_out_split(LABELS, 3, share=0.2, seed=1)[1])
    with pytest.raises(ValueError, match="^class 1 has one labelled image: .* give a larger share or one --lr$"):
        ft.held_out_split(torch.tensor([0, 0, 1]), 2)


def test_a_class_of_one_image_to_hold_out_from_is_refused_before_anything_trains():
    train, test = tiny_set(4), tiny_set(4)
    with pytest.raises(ValueError, match="^50% of the labels: class 0 has one labelled image"):
        ft.draw_subsets(train, test, [0.5])  # one image of each class in the subset
    assert list(ft.draw_subsets(train, test, [0.5], ft.FinetuneSettings(lr_choices=(0.05,)))) == ["50%"]


def test_the_lr_that_scores_best_on_held_out_images_is_chosen():
    torch.manual_seed(0)
    encoder, dim = build_backbone("resnet18", small_images=True, width=2)
    # Too small to move the random head off chance, one that learns the two classes, one that diverges.
    settings = ft.FinetuneSettings(epochs=10, batch_size=8, lr_choices=(1e-7, 0.05, 100.0))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    lr, held_out = ft.choose_lr(encoder, None, dim, tiny_set(), tiny_set(8, side=8), torch.device("cpu"), 8, settings)
    assert lr == 0.05 and held_out["0.05"] == 1.0 and max(held_out["1e-07"], held_out["100.0"]) < 1.0
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())  # the start is left as it was


@pytest.mark.parametrize("head", ["new", "probe"])
def test_each_start_is_fine_tuned_on_the_whole_subset_with_the_lr_chosen_on_held_out_images(tmp_path, monkeypatch,
                                                                                             head):
    trained, _ = build_backbone("resnet18", small_images=True, width=2)
    save_backbone(tmp_path / "backbone.pt", trained, arch="resnet18", width=2, small_images=True, res=8)
    encoder, info = ft.load_backbone(tmp_path / "backbone.pt")
    chosen = {"pretrained": 0.03, "random": 0.07}
    choices, final_runs = [], []

    def fake_choose_lr(start_from, selection_head, feature_dim, fit_set, held_set, device, res, settings):
        start = "random" if choices else "pretrained"  # the pretrained start goes first
        choices.append((len(fit_set), len(held_set), selection_head is not None, settings.epochs))
        return chosen[start], {"0.03": 0.5, "0.07": 0.5}

    def recording_finetune(encoder, feature_dim, train_set, *args, **kwargs):
        final_runs.append((len(train_set), args[2].lr))
        return real_finetune(encoder, feature_dim, train_set, *args, **kwargs)

    real_finetune = ft.finetune
    monkeypatch.setattr(ft, "choose_lr", fake_choose_lr)
    monkeypatch.setattr(ft, "finetune", recording_finetune)
    results, subsets = ft.compare_on_subsets(encoder, info, tiny_set(20), tiny_set(8), [0.5], "cpu", 8,
                                             ft.FinetuneSettings(batch_size=4, head=head), log=lambda line: None)
    # 10 labels, 5 of each class: 1 of each held out, 8 to fit; with --head probe the pretrained start's selection
    # runs start from a probe (of the fit share), else both starts get new heads.
    assert choices == [(8, 2, head == "probe", 50), (8, 2, False, 50)]
    assert final_runs == [(10, 0.03), (10, 0.07)]  # the whole subset, each with its own chosen lr
    record = results["50%"]
    assert record["finetune_lr"] == 0.03 and record["random_init_finetune_lr"] == 0.07
    assert record["finetune_held_out_top1"] == {"0.03": 0.5, "0.07": 0.5}


def error_line(capsys, argv: list[str]) -> str:
    assert ft.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the folder scans' own lines come first
    errors = [line for line in err if line.startswith("evaluation.finetune: error: ")]
    assert errors == err[-1:] and "Traceback" not in "\n".join(err)
    return errors[0].removeprefix("evaluation.finetune: error: ")


def test_the_command_end_to_end_on_cpu(tmp_path, capsys):
    train_root, test_root = folders(tmp_path)
    trained, _ = build_backbone("resnet18", small_images=True, width=2)
    checkpoint = tmp_path / "run" / "backbone.pt"
    checkpoint.parent.mkdir()
    save_backbone(checkpoint, trained, arch="resnet18", width=2, small_images=True, res=8)
    common = ["--checkpoint", str(checkpoint), "--data", train_root, "--device", "cpu"]
    assert ft.main([*common, "--val-data", test_root, "--labels", "50%", "--epochs", "2", "--batch-size", "2"]) == 0
    assert "fine-tune 50%: " in capsys.readouterr().out
    written = json.loads((checkpoint.parent / "finetune.json").read_text())
    result = written["results"]["50%"]
    assert result["labels"] == 4 and result["per_class"] == [2, 2] and result["epochs"] == 2
    assert all(0 <= result[k] <= 1 for k in ("finetune_top1", "random_init_finetune_top1", "frozen_probe_top1"))
    assert written["test_images"] == 4 and written["network"]["width"] == 2
    subsets = json.loads((checkpoint.parent / written["subsets_file"]).read_text())["subsets"]["50%"]
    assert Counter(Path(f).parent.name for f in subsets["files"]) == {"a": 2, "b": 2}
    assert all(Path(f).is_relative_to(train_root) for f in subsets["files"])
    # Bad input: one line each, before anything trains.
    assert error_line(capsys, [*common, "--val-data", test_root, "--labels", "0%"]).startswith("--labels 0%: give")
    assert error_line(capsys, [*common, "--val-data", test_root, "--labels", "10%"]) == (
        "10% of 8 labelled training images is fewer than one per class for 2 classes: give at least 25%")
    assert "also give --val-data" in error_line(capsys, common)
    assert error_line(capsys, [*common, "--val-data", train_root]).startswith("--val-data shares 8 image files")
    assert error_line(capsys, ["--checkpoint", str(tmp_path / "none.pt")]).startswith("--checkpoint ")
