"""kNN monitor, linear probe, frozen feature extraction and the evaluation CLI (evaluation/__init__.py,
knn.py, linear_probe.py, features.py, __main__.py)."""

from __future__ import annotations

import math

import pytest
import torch
from eval_sets import gray_set, needs_fashion_mnist
from image_files import class_folders
from tiny_models import TinyEncoder

from evaluation import (
    ArraySet,
    effective_k,
    evaluate_encoder,
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe,
    pixel_features,
)
from evaluation.__main__ import main
from evaluation.data import eval_splits
from evaluation.features import prepare
from evaluation.linear_probe import fit_logistic
from models.backbones import build_backbone
from models.export import save_backbone
from pipelines.views import BYOL_VIEWS


def unit(degrees: float, length: float = 1.0) -> list[float]:
    return [length * math.cos(math.radians(degrees)), length * math.sin(math.radians(degrees))]


# Bank on the unit circle (lengths vary: only the angle may matter), labels 0/1. For the query at 0 deg
# the 3 nearest by cosine are 10 deg (cos .985, class 0), -30 deg (cos .866, class 1) and 50 deg
# (cos .643, class 1); 120 and 170 deg (class 0) and 95 deg (class 1) are further.
BANK = torch.tensor([unit(10, 3.0), unit(-30, 0.5), unit(50, 7.0), unit(120), unit(170, 2.0), unit(95)])
BANK_LABELS = torch.tensor([0, 1, 1, 0, 0, 1])
QUERY = torch.tensor([unit(0, 4.0)])


@pytest.mark.parametrize(
    ("k", "temperature", "expected"),
    [
        (1, 0.07, 0),  # the single nearest neighbour is class 0
        # T = 0.07: class 0 gets exp(.985/.07) = 1.29e6; class 1 exp(.866/.07) + exp(.643/.07) = 2.47e5.
        (3, 0.07, 0),
        # T = 1: class 0 gets exp(.985) = 2.68; class 1 exp(.866) + exp(.643) = 2.38 + 1.90 = 4.28.
        (3, 1.0, 1),
        # k = 6, T = 1: class 0: 2.68 + exp(-.5) + exp(-.985) = 2.68 + .61 + .37 = 3.66;
        # class 1: 4.28 + exp(cos 95 deg = -.087) = 4.28 + .92 = 5.20.
        (6, 1.0, 1),
        # k = 6, T = 0.07: the nearest neighbour's weight dominates everything else.
        (6, 0.07, 0),
    ],
)
def test_knn_matches_hand_computed_votes(k: int, temperature: float, expected: int) -> None:
    assert knn_predict(BANK, BANK_LABELS, QUERY, num_classes=2, k=k, temperature=temperature).tolist() == [expected]


def test_knn_k_larger_than_bank_and_bad_k() -> None:
    assert knn_predict(BANK, BANK_LABELS, QUERY, 2, k=100, temperature=0.07).tolist() == [0]
    with pytest.raises(ValueError, match="k >= 1"):
        knn_predict(BANK, BANK_LABELS, QUERY, 2, k=0)


def clusters(n: int, classes: int, dim: int, seed: int, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around `classes` random centres (separable when spread is small)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    labels = torch.randint(classes, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, dim, generator=g), labels


def test_linear_probe_separable_and_shuffled() -> None:
    train_x, train_y = clusters(1000, 4, 16, seed=0, spread=0.5)
    test_x, test_y = clusters(2000, 4, 16, seed=1, spread=0.5)
    assert linear_probe(train_x, train_y, test_x, test_y, 4).top1 >= 0.99
    # Labels independent of the features: the probe can do no better than chance (0.25). With 2000
    # test samples the accuracy's standard deviation is sqrt(.25 * .75 / 2000) = 0.0097; allow 5 sigma.
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(5))]
    random_test = torch.randint(4, (2000,), generator=torch.Generator().manual_seed(6))
    assert abs(linear_probe(train_x, shuffled, test_x, random_test, 4).top1 - 0.25) < 0.05


def test_the_probes_classifier_reads_raw_features() -> None:
    # Features far from standardized (a large offset and per-dimension scales): the folded classifier on the raw
    # test features must give the probe's logits on the standardized ones, computed here by hand.
    train_x, train_y = clusters(400, 3, 8, seed=2, spread=1.0)
    test_x, test_y = clusters(300, 3, 8, seed=3, spread=1.0)
    scale, offset = torch.linspace(0.1, 20, 8), torch.linspace(-50, 50, 8)
    train_x, test_x = train_x * scale + offset, test_x * scale + offset
    result = linear_probe(train_x, train_y, test_x, test_y, 3)
    mean, std = train_x.mean(dim=0), train_x.std(dim=0)
    refit = fit_logistic((train_x - mean) / std, train_y, 3, result.weight_decay)
    with torch.no_grad():
        torch.testing.assert_close(result.classifier(test_x), refit((test_x - mean) / std), rtol=1e-4, atol=1e-3)
        assert (result.classifier(test_x).argmax(dim=1) == test_y).float().mean().item() == result.top1


@needs_fashion_mnist
@pytest.mark.timeout(120)
def test_raw_pixel_probe_on_fashion_mnist_subset() -> None:
    # Logistic regression on raw pixels reaches ~84% with all 60k training images; with 2k
    # (200 per class) it is a few points lower (~80%). One penalty keeps it fast; the sweep is tested above.
    train, test = (split.limit(2000) for split in eval_splits("fashion-mnist"))
    top1 = linear_probe(*pixel_features(train), *pixel_features(test), train.num_classes, weight_decays=(1e-3,)).top1
    assert 0.76 <= top1 <= 0.86


def test_extract_features_uses_running_stats_without_grad_and_restores_mode() -> None:
    torch.manual_seed(0)
    encoder = TinyEncoder()
    encoder.bn.running_mean.uniform_(-1, 1)
    encoder.bn.running_var.uniform_(0.5, 2)
    encoder.train()
    stats_before = encoder.bn.running_mean.clone()
    data = gray_set()
    features, labels = extract_features(encoder, data, "cpu", res=12, batch_size=3)  # uneven last batch
    assert encoder.training, "the caller's mode must be restored"
    assert torch.equal(encoder.bn.running_mean, stats_before), "eval mode must not update BN statistics"
    assert not features.requires_grad and features.shape == (10, 4)
    assert torch.equal(labels, data.labels)
    # Independent reference: BN with running statistics, written out by hand.
    with torch.no_grad():
        x = prepare(data.images, 12, BYOL_VIEWS, torch.device("cpu"))
        conv = encoder.conv(x)
        bn = encoder.bn
        normed = (conv - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
        expected = (normed * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)).mean(dim=(2, 3))
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_prepare_gray_to_normalized_rgb() -> None:
    images = torch.full((1, 1, 8, 8), 51, dtype=torch.uint8)  # 51 / 255 = 0.2
    x = prepare(images, 16, BYOL_VIEWS, torch.device("cpu"))
    assert x.shape == (1, 3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)
    expected = [(0.2 - m) / s for m, s in zip(BYOL_VIEWS.mean, BYOL_VIEWS.std, strict=True)]
    torch.testing.assert_close(x[0, :, 5, 5], torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_evaluate_encoder_reports_both_scores() -> None:
    # Features that are a fixed function of the label: kNN and probe must both be perfect.
    labels = torch.arange(40) % 2
    images = (labels * 200 + 20).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 6, 6).contiguous()
    data = ArraySet(images, labels, 2)
    torch.manual_seed(0)
    scores = evaluate_encoder(TinyEncoder(), data, data, "cpu", res=6, k=5)
    assert scores["knn_top1"] == 1.0 and scores["linear_top1"] == 1.0


def _export(path, arch: str = "resnet18", width: int = 8, res: int = 16) -> None:
    torch.manual_seed(0)
    save_backbone(path, build_backbone(arch, small_images=True, width=width)[0], arch=arch, width=width,
                  small_images=True, res=res)


@pytest.mark.parametrize(("flags", "expected"), [
    (["--arch", "resnet34"], "is a resnet18 backbone of width 8, not --arch resnet34: pass --arch resnet18"),
    (["--width", "64"], "not --width 64: pass --width 8 or leave it out"),
])
def test_cli_flags_that_contradict_the_checkpoint_are_one_line(tmp_path, capsys, flags, expected) -> None:
    _export(tmp_path / "backbone.pt")
    assert main(["--checkpoint", str(tmp_path / "backbone.pt"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


def test_cli_a_file_that_is_not_a_backbone_is_one_line_naming_the_flag(tmp_path, capsys) -> None:
    (tmp_path / "backbone.pt").write_bytes(b"")  # every kind of bad file: tests/test_export.py
    assert main(["--checkpoint", str(tmp_path / "backbone.pt")]) == 2
    err = capsys.readouterr().err
    assert err == f"evaluation: error: --checkpoint {tmp_path / 'backbone.pt'} is empty (0 bytes); " \
                  "give the backbone.pt a run exported\n"


def test_cli_needs_only_the_checkpoint_and_its_baseline_is_the_same_network(tmp_path, capsys) -> None:
    data = class_folders(tmp_path / "train", ["a", "b"], per_class=4)
    _export(tmp_path / "backbone.pt", width=4, res=16)
    assert main(["--checkpoint", str(tmp_path / "backbone.pt"), "--data", data, "--val-data", data,
                 "--baselines", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "resnet18 width 4 random init: kNN" in captured.out and "warning" not in captured.err
    assert main(["--checkpoint", str(tmp_path / "backbone.pt"), "--data", data, "--val-data", data, "--res", "20",
                 "--device", "cpu"]) == 0
    assert "was trained at 16 px; evaluating at --res 20" in capsys.readouterr().err


def test_val_classes_the_training_data_lacks_are_refused_in_one_line(tmp_path, capsys) -> None:
    train = class_folders(tmp_path / "train", ["n01", "n02"])
    val = class_folders(tmp_path / "val", ["0", "1"])
    assert main(["--data", train, "--val-data", val]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("evaluation: error: --val-data " + val)
    assert "lacks: 0, 1; the training data has n01, n02 instead" in err[-1]


def test_cli_prints_the_k_it_used(tmp_path, capsys) -> None:
    data = class_folders(tmp_path / "train", ["a", "b"], per_class=4)
    assert main(["--data", data, "--val-data", data, "--arch", "resnet18", "--width", "8", "--res", "16",
                 "--k", "200", "--device", "cpu"]) == 0
    # 8 images of 2 classes: k is at most half a class's share (2), not the bank (a vote of every image).
    assert "kNN (k=2) top-1" in capsys.readouterr().out


def test_cli_bad_input_is_one_line(tmp_path, capsys) -> None:
    assert main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--data", str(tmp_path)]) == 2
    assert main(["--data", str(tmp_path)]) == 2
    assert "--val-data" in capsys.readouterr().err


def test_knn_k_is_at_most_half_a_class_share_of_the_bank() -> None:
    # --eval-limit 200 on Fashion-MNIST's 10 classes: 20 images a class, so 10 neighbours, not all 200.
    assert effective_k(200, 10) == 10 and effective_k(10_000, 10) == 200 and effective_k(3, 10) == 1
    assert effective_k(10_000, 10, k=20) == 20
    # 15 images of class 0 and 5 of class 1, each class at one point: with nearly equal weights (T = 1e6) a
    # 20-neighbour vote (the whole bank) says class 0 for every query; effective_k's 5 neighbours are right.
    bank = torch.tensor([unit(0)] * 15 + [unit(90)] * 5)
    labels = torch.tensor([0] * 15 + [1] * 5)
    queries, truth = torch.tensor([unit(5), unit(85)]), torch.tensor([0, 1])
    assert knn_predict(bank, labels, queries, 2, k=20, temperature=1e6).tolist() == [0, 0]
    assert knn_accuracy(bank, labels, queries, truth, num_classes=2, k=200, temperature=1e6) == 1.0
