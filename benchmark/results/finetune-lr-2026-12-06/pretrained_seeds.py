"""One-off: the pretrained start's 1% fine-tune on the whole subset at some lrs and fine-tune seeds (crops, batch
order; the subset is the seed-0 draw), scored on the test split, with the frozen probe as its head (LP-FT, the
default then: pretrained_seeds.txt) or a new one (new_head.txt). From the repository root:

    PYTHONPATH=. .venv/bin/python benchmark/results/finetune-lr-2026-12-06/pretrained_seeds.py \
        runs/quickstart/backbone.pt probe 0.05,0.1 0,1,2
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
head_start = sys.argv[2]
lrs, seeds = [float(x) for x in sys.argv[3].split(",")], [int(x) for x in sys.argv[4].split(",")]
train_set, test_set = eval_splits("fashion-mnist", None, None, None)
settings = ft.FinetuneSettings()
idx = ft.draw_subsets(train_set, test_set, [0.01], settings)["1%"]
subset = train_set.subset(idx)
dev = torch.device("cpu")
probe = linear_probe(*extract_features(enc, subset, dev, 28), *extract_features(enc, test_set, dev, 28), 10)
print("probe", probe.top1, "head weight norm", probe.classifier.weight.norm().item(), flush=True)
for lr in lrs:
    for seed in seeds:
        t = time.time()
        model, steps = ft.finetune(copy.deepcopy(enc), info.feature_dim, subset, dev, 28,
                                   replace(settings, epochs=50, lr=lr, seed=seed),
                                   head=copy.deepcopy(probe.classifier) if head_start == "probe" else None)
        print(f"lr {lr} seed {seed}: {100*ft.top1(model, test_set, dev, 28):.1f}% ({time.time()-t:.0f} s)", flush=True)
