"""Session fixtures: one tiny model zoo (barely fitted VAE: tests need layouts and shapes, not quality)."""

from __future__ import annotations

import os

import pytest
import torch

from deepgen.config import BridgeConfig, ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    from deepgen.model.tiny_zoo import build_tiny_zoo

    return build_tiny_zoo(tmp_path_factory.mktemp("zoo"), vae_fit_steps=1, log=lambda *a, **k: None)


@pytest.fixture
def tiny_model_cfg(tiny_zoo) -> ModelConfig:
    torch.manual_seed(0)
    return ModelConfig(
        name="tiny",
        vlm_path=str(tiny_zoo.vlm_dir),
        dit_path=str(tiny_zoo.dit_dir),
        num_think_tokens=4,
        bridge=BridgeConfig(num_layers=1, num_heads=4, intermediate_size=64),
    )
