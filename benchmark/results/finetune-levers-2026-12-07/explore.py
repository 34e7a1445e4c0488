"""One-off: the 1% fine-tune (the seed-0 subset of 600 labels) of the pretrained or the random-init start under
variants of the protocol, each scored on the test split; one JSON line per run to OUT. From the repository root:

    PYTHONPATH=. .venv/bin/python benchmark/results/finetune-levers-2026-12-07/explore.py BACKBONE \\
        '[{"start": "byol", "lr": 0.4}, {"start": "random", "lr": 0.1, "head_mult": 10}]' OUT

Keys of a variant: start (byol | random), lr (the encoder's peak lr), head_mult (the head's lr as a multiple
of it), min_scale (crop area), epochs, seed (crops, batch order, head init), bs; others (name) are copied to
the output. The random-init start is the backbone's network drawn with seed 0, as evaluation.finetune draws it.
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
from evaluation.features import prepare
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


def run(start: nn.Module, lr: float, head_mult: float = 1.0, min_scale: float = 0.25, epochs: int = 50,
        seed: int = 0, bs: int = 64) -> float:
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(info.feature_dim, 10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
    model = nn.Sequential(start, head).to(device, memory_format=torch.channels_last)
    groups = [{"params": list(start.parameters()), "mult": 1.0},
              {"params": list(head.parameters()), "mult": head_mult}]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(subset) // bs
    total, step = epochs * steps_per_epoch, 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(subset), generator=generator)[:steps_per_epoch * bs]
        for images, labels in subset.subset(order).batches(bs, 28):
            x = prepare(images, images.shape[-1], ft.BYOL_VIEWS, device)
            x = ft.random_resized_crop_flip(x, 28, min_scale, generator).contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, lr, warmup_steps=0) * group["mult"]
            with ft.autocast_for(device):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return ft.top1(model, test_set, device, 28)


for variant in variants:
    began = time.time()
    start = encoder if variant.get("start", "byol") == "byol" else random_init
    options = {k: variant[k] for k in ("lr", "head_mult", "min_scale", "epochs", "seed", "bs") if k in variant}
    result = variant | {"top1": round(100 * run(copy.deepcopy(start), **options), 2),
                        "s": round(time.time() - began, 1)}
    print(json.dumps(result), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(result) + "\n")
