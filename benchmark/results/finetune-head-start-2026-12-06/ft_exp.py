"""LP-FT and lr experiments at 1% for a backbone: python ft_exp.py BACKBONE variant..."""
import copy, sys, time, dataclasses
import sys; sys.path.insert(0, "/work/main")
import torch, torch.nn as nn
from evaluation import finetune as ft
from evaluation.data import eval_splits
from evaluation.features import extract_features
from evaluation.linear_probe import fit_logistic, linear_probe
from models.export import load_backbone

torch.set_num_threads(2)
encoder, info = load_backbone(sys.argv[1])
res = info.res
train_set, test_set = eval_splits("fashion-mnist", None)
frac = float(sys.argv[2])
subsets = ft.draw_subsets(train_set, test_set, [frac], 0)
(name, idx), = subsets.items()
subset = train_set.subset(idx)
dev = torch.device("cpu")
pre, _ = ft.build_backbone(info.arch, small_images=info.small_images, width=info.width)
pre.load_state_dict(encoder.state_dict())
tr_x, tr_y = extract_features(pre, subset, dev, res)
te_x, te_y = extract_features(pre, test_set, dev, res)
probe = linear_probe(tr_x, tr_y, te_x, te_y, 10)
print("frozen probe", probe.top1, probe.weight_decay, flush=True)
mean, std = tr_x.mean(0), tr_x.std(0).clamp_min(1e-6)
sx = (tr_x - mean) / std
lin = fit_logistic(sx, tr_y, 10, probe.weight_decay)
head = nn.Linear(tr_x.shape[1], 10)
with torch.no_grad():
    head.weight.copy_(lin.weight / std)
    head.bias.copy_(lin.bias - (lin.weight / std) @ mean)
print("folded head on test:", ((head(te_x).argmax(1) == te_y).float().mean().item()), flush=True)
for v in sys.argv[3:]:
    kind, lr = v.split(":"); lr = float(lr)
    s = dataclasses.replace(ft.FinetuneSettings(), lr=lr)
    t = time.perf_counter()
    enc = ft.rescale_to_init_norms(copy.deepcopy(pre)) if "rescale" in kind else copy.deepcopy(pre)
    h = copy.deepcopy(head) if "lpft" in kind else None
    if "random" in kind:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            enc, _ = ft.build_backbone(info.arch, small_images=info.small_images, width=info.width)
    model, steps = ft.finetune(enc, info.feature_dim, subset, dev, res, s, head=h)
    print(v, "top1", round(100 * ft.top1(model, test_set, dev, res), 2), steps, "steps", round(time.perf_counter() - t), "s", flush=True)
