"""One-off: SimCLRv2's fine-tune from the projector's hidden layer (encoder + the pretrained Linear/BN/ReLU +
a new head; the random-init start the same network drawn with seed 0), 1% of the labels, 50 epochs, scored on
the test split. From the repository root (RUN: a quickstart run folder with its checkpoints):

    PYTHONPATH=. .venv/bin/python benchmark/results/finetune-levers-2026-12-07/proj.py RUN 0.2,0.4,0.8 byol,random
"""
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import evaluation.finetune as ft
from evaluation.data import eval_splits
from models.export import load_backbone

torch.set_num_threads(2)
run = Path(sys.argv[1])
lrs, starts = [float(x) for x in sys.argv[2].split(",")], sys.argv[3].split(",")
encoder, info = load_backbone(run / "backbone.pt")
online = torch.load(sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1], map_location="cpu",
                    weights_only=False)["online"]


def hidden_layer() -> nn.Sequential:
    return nn.Sequential(nn.Linear(info.feature_dim, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True))


pretrained = nn.Sequential(encoder, hidden_layer())
pretrained[1].load_state_dict({k.removeprefix("projector."): v for k, v in online.items()
                               if k.startswith(("projector.0.", "projector.1."))})
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(0)
    random_init = nn.Sequential(info.new_encoder(), hidden_layer())
train_set, test_set = eval_splits("fashion-mnist", None, None, None)
subset = train_set.subset(ft.draw_subsets(train_set, test_set, [0.01], ft.FinetuneSettings())["1%"])
device = torch.device("cpu")
for start in starts:
    for lr in lrs:
        began = time.time()
        model, _ = ft.finetune(copy.deepcopy(pretrained if start == "byol" else random_init), 512, subset, device, 28,
                               ft.FinetuneSettings(epochs=50, lr=lr))
        top1 = round(100 * ft.top1(model, test_set, device, 28), 2)
        print(json.dumps({"start": start, "lr": lr, "top1": top1, "s": round(time.time() - began)}), flush=True)
