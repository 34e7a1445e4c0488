"""One-off: the 1% subset's random-init fine-tune at more lrs, with both initialisations (oracle on test: the
baseline's best case). From the repository root:

    PYTHONPATH=. .venv/bin/python benchmark/results/finetune-lr-2026-12-06/lr_check.py
"""
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import evaluation.finetune as ft
from evaluation.data import eval_splits
from models.export import BackboneInfo

train_set, test_set = eval_splits("fashion-mnist", None, None, None)
settings = ft.FinetuneSettings()
subsets = ft.draw_subsets(train_set, test_set, [0.01], settings)
indices = subsets["1%"]
subset = train_set.subset(indices)
fixed = replace(settings, epochs=ft.default_epochs(len(indices)))
out = {}
for zero in (True, False):
    info = BackboneInfo.of("resnet18", 8, True, 28, zero)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        start = info.new_encoder()
    for lr in (0.05, 0.1, 0.2, 0.4, 0.8):
        t = time.time()
        model, steps = ft.finetune(copy.deepcopy(start), info.feature_dim, subset, torch.device("cpu"), 28,
                                   replace(fixed, lr=lr))
        acc = ft.top1(model, test_set, torch.device("cpu"), 28)
        out[f"zero_init={zero} lr={lr}"] = acc
        print(f"zero_init_residual={zero} lr={lr}: test top-1 {100*acc:.1f}% ({time.time()-t:.0f} s)", flush=True)
Path(__file__).with_name("test_top1.json").write_text(json.dumps(out, indent=1))
