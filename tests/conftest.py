"""Session fixtures: one tiny model zoo (barely fitted VAE and VLM: tests need layouts and shapes, not quality)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepgen.config import BridgeConfig, ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    from deepgen.model.tiny_zoo import build_tiny_zoo

    return build_tiny_zoo(
        tmp_path_factory.mktemp("zoo"), vae_fit_steps=1, vlm_pretrain_steps=1, log=lambda *a, **k: None
    )


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


# Runs train.py with a signal sent to itself from inside training step `kill_at` (argv: kill_at signal args...).
SIGNAL_AT_STEP = """
import os, runpy, signal, sys
import stages.base
kill_at, sig = int(sys.argv[1]), getattr(signal, sys.argv[2])
step = stages.base.StageModule.training_step
def signalling_step(self, batch, batch_idx):
    if self.global_step == kill_at:
        os.kill(os.getpid(), sig)
    return step(self, batch, batch_idx)
stages.base.StageModule.training_step = signalling_step
sys.argv = ["train.py", *sys.argv[3:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.fixture
def train_cli(tiny_zoo):
    """Run `python train.py` on the tiny zoo with small, fast settings; later overrides win.

    With `signal_at=(step, "SIGKILL")` the process sends itself that signal during that training step.
    """

    def run(
        *overrides: str, timeout: int = 600, signal_at: tuple[int, str] | None = None
    ) -> subprocess.CompletedProcess:
        base = [
            "stage=sft",
            "logger=csv",
            f"model.vlm_path={tiny_zoo.vlm_dir}",
            f"model.dit_path={tiny_zoo.dit_dir}",
            "model.build_tiny_zoo=false",
            "data.num_workers=0",
            "data.batch_size=2",
            "sampling.num_steps=2",
        ]
        entry = ["-c", SIGNAL_AT_STEP, str(signal_at[0]), signal_at[1]] if signal_at else ["train.py"]
        cmd = [sys.executable, *entry, *base, *overrides]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    return run
