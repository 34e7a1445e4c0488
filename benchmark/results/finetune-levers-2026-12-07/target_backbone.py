"""One-off: the run's target (EMA) encoder as a backbone file, for explore.py. From the repository root:

    PYTHONPATH=. .venv/bin/python benchmark/results/finetune-levers-2026-12-07/target_backbone.py \
        runs/quickstart runs/quickstart/target-backbone.pt
"""
import dataclasses
import sys
from pathlib import Path

import torch

from models.export import load_backbone, save_backbone

run, out = Path(sys.argv[1]), sys.argv[2]
last = sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1]
state = torch.load(last, map_location="cpu", weights_only=False)["target"]
encoder, info = load_backbone(run / "backbone.pt")
encoder.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("0.")})  # target = (encoder, projector)
save_backbone(out, encoder, **{k: v for k, v in dataclasses.asdict(info).items() if k != "feature_dim"})
