"""benchmark/quickstart.py (the README quickstart table's one command), shortened to a smoke run (a separate
process, once per session: tests/quickstart_runs.py), and the evaluation of the backbone the quickstart
exports with no flag but --checkpoint."""

from __future__ import annotations

import json
import subprocess

import pytest
from eval_sets import needs_fashion_mnist
from quickstart_runs import LIMIT, QuickstartRun

import evaluation.__main__ as evaluation_cli
from benchmark.quickstart import REPO

# The keys of the README's measured file (benchmark/results/cpu-2026-11-23-quickstart.json, made by hand before
# this command existed): the command writes the same record.
KEYS = {"what", "command", "machine", "date", "commit", "wall_s", "training_elapsed_s",
        "median_images_per_s_after_step_20", "load_average_before", "load_average_after", "knn_top1_per_epoch",
        "eval", "previous_measurement"}


@needs_fashion_mnist
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_quickstart_command_writes_its_json_and_its_backbone_evaluates_with_only_checkpoint(
        quickstart_run: QuickstartRun, capsys, monkeypatch):
    # The session's one run of the command (tests/quickstart_runs.py), also test_quickstart_configs.py's FFCV run.
    proc, run, result = quickstart_run.proc, quickstart_run.run, quickstart_run.result
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"wrote {result}: " in proc.stdout
    report = json.loads(result.read_text())
    assert set(report) == KEYS == set(json.loads((REPO / "benchmark/results/cpu-2026-11-23-quickstart.json")
                                                 .read_text()))
    assert report["eval"] == json.loads((run / "eval.json").read_text())
    assert report["wall_s"] >= report["training_elapsed_s"] > 0 and len(report["knn_top1_per_epoch"]) == 0
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert report["commit"].startswith(head.stdout.strip()) and "--steps 3" in report["what"]
    assert result.with_suffix(".png").stat().st_size > 1000

    # `python -m evaluation --checkpoint FILE`: arch, width, stem and res come from the file. Only the data is
    # cut here to the run's own --eval-limit (all 70,000 images take minutes), so the run's final kNN is the
    # independent reference: the same encoder on the same images must score the same.
    splits = evaluation_cli.eval_splits
    monkeypatch.setattr(evaluation_cli, "eval_splits", lambda data, val, *_: splits(data, val, LIMIT, LIMIT))
    assert evaluation_cli.main(["--checkpoint", str(run / "backbone.pt")]) == 0
    printed = capsys.readouterr()
    assert f"kNN (k={LIMIT // 20}) top-1 {100 * report['eval']['knn_top1']:.2f}%" in printed.out, printed
    assert "warning" not in printed.err
