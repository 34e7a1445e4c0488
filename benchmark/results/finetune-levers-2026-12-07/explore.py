"""One-off: the 1% fine-tune (the seed-0 subset of 600 labels) of the pretrained or the random-init start under
variants of the protocol, each scored on the test split; one JSON line per run to OUT. From the repository root:

    PYTHONPATH=. .venv/bin/python benchmark/results/finetune-levers-2026-12-07/explore.py BACKBONE \\
        '[{"start": "byol", "lr": 0.4}, {"start": "random", "lr": 0.1, "head_mult": 10}]' OUT

Keys of a variant: start (byol | random), lr (the encoder's peak lr), head_mult (the head's lr as a multiple
of it), min_scale (crop area), epochs, seed (crops, batch order, head init), bs, llrd (layer-wise lr decay: the
head at lr, layer4 at lr * llrd, layer3 at lr * llrd^2, ... the stem at lr * llrd^5), bn_eval (batch norms keep
the backbone's running statistics and normalise with them while training), smoothing (label smoothing),
probe_head (start the head from the frozen probe fit on the same 600 images: LP-FT); others
(name) are copied to the output. The random-init start is the backbone's network drawn with seed 0, as
evaluation.finetune draws it.
"""
import copy
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluation.finetune as ft
from evaluation.data import eval_splits
from evaluation.features import extract_features, prepare
from evaluation.linear_probe import linear_probe
from models.export import load_backbone
from optim.schedules import lr_at

torch.set_num_threads(2)
encoder, info = load_backbone(sys.argv[1])
variants, out = json.loads(sys.argv[2]), sys.argv[3]
train_set, test_set = eval_splits("fashion-mnist", None, None, None)
subset = train_set.subset(ft.draw_subsets(train_set, test_set, [0.01], ft.FinetuneSettings())["1%"])
device = torch.device("cpu")
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(0)
    random_init = info.new_encoder()


STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


def run(start: nn.Module, lr: float, head_mult: float = 1.0, min_scale: float = 0.25, epochs: int = 50,
        seed: int = 0, bs: int = 64, llrd: float = 1.0, bn_eval: bool = False, smoothing: float = 0.0,
        probe_head: bool = False) -> float:
    generator = torch.Generator().manual_seed(seed)
    if probe_head:
        features = extract_features(start, subset, device, 28), extract_features(start, test_set, device, 28)
        head = linear_probe(*features[0], *features[1], 10).classifier.requires_grad_(True)
    else:
        head = nn.Linear(info.feature_dim, 10)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
    model = nn.Sequential(start, head).to(device, memory_format=torch.channels_last)
    groups = [{"params": [p for name in names for p in getattr(start, name).parameters()],
               "mult": llrd ** (len(STAGES) - depth)} for depth, names in enumerate(STAGES)]
    groups.append({"params": list(head.parameters()), "mult": head_mult})
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(subset) // bs
    total, step = epochs * steps_per_epoch, 0
    model.train()
    if bn_eval:
        for module in start.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
    for _ in range(epochs):
        order = torch.randperm(len(subset), generator=generator)[:steps_per_epoch * bs]
        for images, labels in subset.subset(order).batches(bs, 28):
            x = prepare(images, images.shape[-1], ft.BYOL_VIEWS, device)
            x = ft.random_resized_crop_flip(x, 28, min_scale, generator).contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, lr, warmup_steps=0) * group["mult"]
            with ft.autocast_for(device):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return ft.top1(model, test_set, device, 28)


for variant in variants:
    began = time.time()
    start = encoder if variant.get("start", "byol") == "byol" else random_init
    options = {k: variant[k] for k in ("lr", "head_mult", "min_scale", "epochs", "seed", "bs", "llrd",
                                                "bn_eval", "smoothing", "probe_head") if k in variant}
    result = variant | {"top1": round(100 * run(copy.deepcopy(start), **options), 2),
                        "s": round(time.time() - began, 1)}
    print(json.dumps(result), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(result) + "\n")
