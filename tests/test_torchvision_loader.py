"""The torchvision baseline: same contract and the same view statistics as the fast loaders."""

from __future__ import annotations

from loader_contract import LoaderContract


class TestTorchvisionLoader(LoaderContract):
    module = "pipelines.torchvision_loader"
