"""How the pretrained fine-tune starts, at one label share:

    PYTHONPATH=<tree> python ft_exp.py BACKBONE FRACTION kind:lr ...

A one-off experiment (see README.md beside it): the run's lines are in log.txt.
"""
import copy
import dataclasses
import sys
import time

import torch
import torch.nn as nn

from evaluation import finetune as ft
from evaluation.data import eval_splits
from evaluation.features import extract_features
from evaluation.linear_probe import fit_logistic, linear_probe
from models.export import load_backbone

torch.set_num_threads(2)
encoder, info = load_backbone(sys.argv[1])
res = info.res
train_set, test_set = eval_splits("fashion-mnist", None)
((name, indices),) = ft.draw_subsets(train_set, test_set, [float(sys.argv[2])], 0).items()
subset = train_set.subset(indices)
device = torch.device("cpu")
pretrained, _ = ft.build_backbone(info.arch, small_images=info.small_images, width=info.width)
pretrained.load_state_dict(encoder.state_dict())
train_x, train_y = extract_features(pretrained, subset, device, res)
test_x, test_y = extract_features(pretrained, test_set, device, res)
probe = linear_probe(train_x, train_y, test_x, test_y, 10)
print("frozen probe", probe.top1, probe.weight_decay, flush=True)
mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
fitted = fit_logistic((train_x - mean) / std, train_y, 10, probe.weight_decay)
head = nn.Linear(train_x.shape[1], 10)
with torch.no_grad():
    head.weight.copy_(fitted.weight / std)
    head.bias.copy_(fitted.bias - (fitted.weight / std) @ mean)
print("folded head on test:", (head(test_x).argmax(1) == test_y).float().mean().item(), flush=True)
for variant in sys.argv[3:]:
    kind, lr = variant.split(":")
    settings = dataclasses.replace(ft.FinetuneSettings(), lr=float(lr))
    start = time.perf_counter()
    start_from = ft.rescale_to_init_norms(copy.deepcopy(pretrained)) if "rescale" in kind else copy.deepcopy(pretrained)
    if "random" in kind:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            start_from, _ = ft.build_backbone(info.arch, small_images=info.small_images, width=info.width)
    model, steps = ft.finetune(start_from, info.feature_dim, subset, device, res, settings,
                               head=copy.deepcopy(head) if "lpft" in kind else None)
    top1 = round(100 * ft.top1(model, test_set, device, res), 2)
    print(variant, "top1", top1, steps, "steps", round(time.perf_counter() - start), "s", flush=True)
