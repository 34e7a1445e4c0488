"""One-off: the pretrained start's 1% fine-tune (the probe as its head, LP-FT) on the whole subset at lr 0.05 and 0.1,
three fine-tune seeds each (crops, batch order; the subset is the seed-0 draw), scored on the test split. From the
repository root, with the quickstart's backbone:

    PYTHONPATH=. .venv/bin/python benchmark/results/finetune-lr-2026-12-06/pretrained_seeds.py \
        runs/quickstart/backbone.pt
"""
import copy
import sys
import time
from dataclasses import replace

import torch

import evaluation.finetune as ft
from evaluation.data import eval_splits
from evaluation.features import extract_features
from evaluation.linear_probe import linear_probe
from models.export import load_backbone

enc, info = load_backbone(sys.argv[1])
train_set, test_set = eval_splits("fashion-mnist", None, None, None)
settings = ft.FinetuneSettings()
idx = ft.draw_subsets(train_set, test_set, [0.01], settings)["1%"]
subset = train_set.subset(idx)
dev = torch.device("cpu")
probe = linear_probe(*extract_features(enc, subset, dev, 28), *extract_features(enc, test_set, dev, 28), 10)
print("probe", probe.top1, "head weight norm", probe.classifier.weight.norm().item(), flush=True)
for lr in (0.05, 0.1):
    for seed in (0, 1, 2):
        t = time.time()
        model, steps = ft.finetune(copy.deepcopy(enc), info.feature_dim, subset, dev, 28,
                                   replace(settings, epochs=50, lr=lr, seed=seed), head=copy.deepcopy(probe.classifier))
        print(f"lr {lr} seed {seed}: {100*ft.top1(model, test_set, dev, 28):.1f}% ({time.time()-t:.0f} s)", flush=True)
