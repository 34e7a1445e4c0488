"""train.py end to end on CPU (synthetic loader), its outputs, and its up-front one-line errors for bad
arguments and config files (config.py on its own: test_config.py)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from eval_sets import needs_fashion_mnist
from train_runs import TINY, run_train, run_train_here

import runtime.preflight
import train
from config import TrainConfig, parse_config
from evaluation.finetune import FinetuneSettings, default_epochs
from runtime.checkpoint import CheckpointDir, load_checkpoint

NO_GPUS_FLAG = TINY[:2] + TINY[4:]  # TINY without "--gpus 0"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("run")
    # Full width and the standard stem at 32 px, so backbone.pt is a stock torchvision resnet18 state_dict;
    # --device cpu in place of --gpus 0: the minimal command's device flag.
    result = run_train(*NO_GPUS_FLAG, "--device", "cpu", "--width", "64", "--res", "32", "--no-small-images",
                       "--steps", "4", "--log-every", "2", "--out", str(out))
    return result, out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_run_prints_progress_and_writes_metrics(finished_run):
    result, out = finished_run
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 2 and all(k in lines[-1] for k in ("loss", "lr", "tau", "img/s", "loader wait"))
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["step"]) for r in rows] == [r["step"] for r in records] == [2, 4]
    # --steps 4 is the whole schedule, so warmup (a tenth of the run: 0.4 steps) rounds to none and the
    # lr of the 4th step (index 3) is on the cosine: peak (1 + cos(pi 3/4)) / 2, peak = base_lr * batch / 256.
    assert records[-1]["lr"] == pytest.approx(0.45 * 8 / 256 * (1 + math.cos(math.pi * 3 / 4)) / 2)
    assert 0 < records[-1]["loss"] <= 4 and (out / "metrics.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_run_saves_a_final_checkpoint_and_a_torchvision_backbone(finished_run):
    result, out = finished_run
    assert result.returncode == 0, result.stderr
    [path] = CheckpointDir(out / "checkpoints", keep=3).paths()
    state = load_checkpoint(path)
    assert state["step"] == 4 and state["config"]["arch"] == "resnet18" and len(state["rng"]) == 1
    weights = torch.load(out / "backbone.pt", weights_only=True)["state_dict"]
    # The done line says where it loads: a full-width standard stem is a stock torchvision state_dict.
    assert "torch.load(it)['state_dict'] loads into torchvision.models.resnet18() with strict=False" in result.stdout
    encoder = {k.removeprefix("encoder."): v for k, v in state["online"].items() if k.startswith("encoder.")}
    assert encoder.keys() == weights.keys() and all(torch.equal(weights[k], v) for k, v in encoder.items())
    loaded = tvm.resnet18().load_state_dict(weights, strict=False)
    assert sorted(loaded.missing_keys) == ["fc.bias", "fc.weight"] and not loaded.unexpected_keys


@pytest.mark.timeout(400)
def test_diverging_run_stops_with_exit_3_and_keeps_only_finite_checkpoints(tmp_path, capsys):
    # lr 1e36: LARS moves each weight by ~lr * eta * |w| per step, so float32 overflows within steps.
    result = run_train_here(capsys, *TINY, "--res", "8", "--base-lr", "1e36", "--steps", "8", "--log-every", "1",
                            "--checkpoint-minutes", "1e-6", "--out", str(tmp_path))
    assert result.returncode == train.NAN_EXIT_CODE, result.stderr
    assert "non-finite" in result.stderr or "the loss is nan" in result.stderr or "the loss is inf" in result.stderr
    kept = CheckpointDir(tmp_path / "checkpoints", keep=3).paths()
    # The message names a checkpoint only when one exists (tests/test_run_safety.py: the case without one).
    assert (f"the last good checkpoint is kept: {kept[0]}" if kept else "no checkpoint was saved") in result.stderr
    for path in kept:
        online = load_checkpoint(path)["online"]
        assert all(torch.isfinite(t).all() for t in online.values() if t.is_floating_point()), path.name


@pytest.mark.timeout(400)
def test_real_loader_epoch_runs_the_knn_monitor_and_the_final_evaluation(photo_corpus, tmp_path, capsys):
    # 64 photos / batch 8 = 8 steps per epoch: the epoch end logs kNN top-1, the end writes eval.json.
    result = run_train_here(capsys, "--loader", "torchvision", "--data", photo_corpus, "--val-data", photo_corpus,
                            *TINY[2:], "--res", "16", "--epochs", "1", "--log-every", "4", "--eval-every", "1",
                            "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8] and "knn_top1" in records[-1] and "knn_top1" not in records[0]
    scores = json.loads((tmp_path / "eval.json").read_text())
    # 4 classes: accuracies are fractions, and the monitor and the final kNN see the same final encoder.
    assert 0 <= scores["linear_top1"] <= 1 and scores["knn_top1"] == pytest.approx(records[-1]["knn_top1"])
    # The same encoder at random init is measured beside it (raw pixels only for in-memory sets).
    assert 0 <= scores["random_init_knn_top1"] <= 1 and 0 <= scores["random_init_linear_top1"] <= 1
    assert "pixels_linear_top1" not in scores
    # 64 images of 4 classes: k is half a class's 16 images, on the epoch's line and in the final one.
    assert "kNN (k=8) top-1" in result.stdout and "final evaluation: kNN (k=8) top-1" in result.stdout
    assert records[-1]["knn_k"] == scores["knn_k"] == 8
    assert "(random init" in result.stdout


@needs_fashion_mnist
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_finetune_after_training_adds_its_figures_to_eval_json(tmp_path, capsys):
    # 100 evenly spaced Fashion-MNIST training images hold 7 to 13 of each class: 50% is 5 of each of the 10.
    result = run_train_here(capsys, *TINY, "--width", "4", "--res", "16", "--steps", "2", "--eval-every", "1",
                            "--eval-limit", "100", "--finetune", "50%", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert 0 <= scores["linear_top1"] <= 1  # the frozen evaluation stays beside the fine-tunes
    tuned = scores["finetune"]["50%"]
    assert tuned["labels"] == 50 and tuned["per_class"] == [5] * 10 and tuned["epochs"] == default_epochs(50)
    assert all(0 <= tuned[k] <= 1 for k in ("finetune_top1", "random_init_finetune_top1", "frozen_probe_top1"))
    assert tuned["seconds"] > 0
    # Each start's lr was chosen among the defaults on held-out images (`evaluation.finetune.choose_lr`).
    for start in ("finetune", "random_init_finetune"):
        assert tuned[f"{start}_lr"] in FinetuneSettings().lr_choices
        assert set(tuned[f"{start}_held_out_top1"]) == {str(lr) for lr in FinetuneSettings().lr_choices}
    # finetune.json is the module's, run on the backbone the run exported, on the --eval-limit splits.
    written = json.loads((tmp_path / "finetune.json").read_text())
    assert written["results"] == scores["finetune"] and written["checkpoint"] == str(tmp_path / "backbone.pt")
    assert written["eval_limit"] == 100 and written["test_images"] == 100 and written["network"]["width"] == 4
    subsets = json.loads((tmp_path / "finetune-subsets.json").read_text())["subsets"]
    assert len(subsets["50%"]["indices"]) == 50
    [final] = [line for line in result.stdout.splitlines() if line.startswith("final evaluation: ")]
    assert "linear top-1" in final and "; fine-tune 50%: " in final and "frozen probe" in final


def test_a_finished_run_lacking_the_asked_finetune_is_not_done(tmp_path):
    cfg = TrainConfig(eval_every=1, finetune=("1%", "10%"))
    (tmp_path / "backbone.pt").write_bytes(b"")
    assert not train.final_outputs_exist(cfg, tmp_path)
    (tmp_path / "eval.json").write_text(json.dumps({"knn_top1": 0.5, "finetune": {"1%": {}}}))
    assert not train.final_outputs_exist(cfg, tmp_path)  # 10% is missing: fine-tune again
    (tmp_path / "eval.json").write_text(json.dumps({"knn_top1": 0.5, "finetune": {"1%": {}, "10%": {}}}))
    assert train.final_outputs_exist(cfg, tmp_path)
    assert train.final_outputs_exist(TrainConfig(finetune=("0.1",)), tmp_path)  # 0.1 is 10%
    (tmp_path / "eval.json").write_text('{"knn_top1": 0.5, "fine')  # cut off mid-write
    assert not train.final_outputs_exist(cfg, tmp_path)


def main_error(capsys, *argv: str) -> str:
    """Run train.main in-process (it fails before starting any process) and return its one error line."""
    assert train.main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: ")
    return err[0].removeprefix("train.py: error: ")


@pytest.mark.parametrize(("argv", "expected"), [
    (("--res", "4"), "--res must be at least 8"),
    (("--gpus", "3"), "--gpus 3: only 0 GPU(s) visible"),
    (("--processes", "3"), "--batch-size 8 (global) is not divisible by the 3 processes"),
    (("--loader", "torchvision", "--data", "/no/such/folder"), "--data /no/such/folder: no such file or folder"),
    (("--steps", "0"), "--steps must be at least 1"),
    (("--processes", "2", "--no-in-memory"), "--no-in-memory (FFCV's QUASI_RANDOM order) runs in one process"),
    (("--finetune", "0%"), "--finetune 0%: give shares of the labelled training images above 0% and at most 100%"),
    (("--finetune", "1%", "150%"), "--finetune 150%: give shares"),
])
def test_bad_arguments_give_one_clear_line(capsys, tmp_path, argv, expected):
    if "--gpus" in argv and torch.cuda.is_available():
        pytest.skip("counts GPUs on a CPU-only machine")
    assert main_error(capsys, *TINY, "--out", str(tmp_path), *argv).startswith(expected)


def test_finetune_on_a_folder_needs_val_data(capsys, tmp_path):
    message = main_error(capsys, *TINY, "--data", str(tmp_path), "--finetune", "1%", "--out", str(tmp_path / "out"))
    assert message.startswith(f"--finetune with --data {tmp_path} needs --val-data")
    assert not (tmp_path / "out").exists()


def test_device_shorthand_for_gpus(capsys, tmp_path):
    assert parse_config(["--device", "cpu"]).resolved().gpus == 0
    assert parse_config(["--device", "cuda"]).resolved().gpus is None  # all visible GPUs
    assert "contradicts --gpus 0" in main_error(capsys, *TINY, "--device", "cuda", "--out", str(tmp_path))
    if not torch.cuda.is_available():
        message = main_error(capsys, *NO_GPUS_FLAG, "--device", "cuda", "--out", str(tmp_path))
        assert message.startswith("--device cuda: no CUDA device is visible")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_device_cpu_runs_the_minimal_command(finished_run):
    result, _ = finished_run  # started with --device cpu and no --gpus
    assert result.returncode == 0, result.stderr
    assert "over 1 process(es) on cpu" in result.stdout


def test_missing_loader_names_its_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime.preflight, "is_available", lambda name: False)
    message = main_error(capsys, *TINY, "--loader", "dali", "--data", str(tmp_path))
    assert message.startswith("--loader dali is not installed") and "pip install -e '.[dali" in message


def test_existing_checkpoints_need_resume(capsys, tmp_path):
    CheckpointDir(tmp_path / "checkpoints", keep=1).save(1, {"step": 1})
    assert "pass --resume" in main_error(capsys, *TINY, "--out", str(tmp_path))


def test_synthetic_loader_warns_that_it_ignores_data(capsys, tmp_path):
    assert train.main([*TINY, "--res", "8", "--steps", "1", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    assert "--loader synthetic makes random views on the device and ignores --data" in capsys.readouterr().err


@pytest.mark.parametrize(("body", "expected"), [
    ('archh = "resnet18"\n', "unknown option 'archh'"),
    ('arch = "vgg"\n', "arch must be one of resnet18, resnet34, resnet50"),
    ('epochs = "ten"\n', "epochs must be int"),
    ("epochs = \n", "not valid TOML"),
    ('finetune = "1%"\n', 'finetune must be a list of words or numbers, e.g. ["1%", "10%"]'),
])
def test_bad_config_file_gives_one_clear_line(capsys, tmp_path, body, expected):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    assert expected in main_error(capsys, "--config", str(path))


def test_time_limit_stops_saves_evaluates_and_resume_finishes_the_schedule(tmp_path, capsys):
    """--time-limit: at the first log point past the limit the run saves, writes its final outputs and
    exits 0 short of its steps; --resume (without the limit) trains on to the schedule's last step."""
    out, steps = tmp_path / "run", 40
    args = (*TINY, "--res", "8", "--steps", str(steps), "--log-every", "1", "--checkpoint-minutes", "0",
            "--checkpoint-every", "0", "--out", str(out))
    cut = run_train_here(capsys, *args, "--time-limit", "0.0001")  # 6 ms: past it at the first log point
    assert cut.returncode == 0, cut.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 1 and "--time-limit 0.0001 min reached after step 1 of 40" in cut.stdout
    assert (out / "backbone.pt").is_file()
    assert load_checkpoint(CheckpointDir(out / "checkpoints", keep=3).paths()[0])["step"] == 1
    resumed = run_train_here(capsys, *args, "--time-limit", "0", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == steps and records[-1]["lr"] < 0.01 * max(r["lr"] for r in records)  # decayed
