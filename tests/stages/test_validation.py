"""BenchmarkValidation (stages/validation.py): the tiny-world benchmark during training.

Through train.py: files and csv metrics at the configured steps, and the same training losses as a run
without validation. In process: module modes and random state restored, grids sent to image loggers.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.plugins.precision import Precision
from omegaconf import OmegaConf

from deepgen.config import RunConfig, ValidationConfig
from deepgen.data.tiny_world import EVAL_DIR
from stages.schema import register_schema
from stages.validation import BenchmarkValidation, benchmark_metrics, preserved_rng
from tests.conftest import TINY_SHARDS

ROOT = Path(__file__).resolve().parents[2]
# One T2I and one editing category (no OCR to load), one prompt each, two sampling steps.
FAST = ["validation.categories=[t2i_general,edit_general]", "validation.limit=1", "validation.num_steps=2"]


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(next((run_dir / "csv").rglob("metrics.csv"))) as f:
        return list(csv.DictReader(f))


def test_off_by_default():
    register_schema()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        run: RunConfig = OmegaConf.to_object(compose("train"))
    v = run.validation
    assert (v.every_n_steps, v.at_start, v.at_end) == (0, False, False)
    assert v.eval_dir == f"{run.data.shards_dir}/{EVAL_DIR}"


def test_train_validates_at_its_steps_with_the_same_losses(train_cli, tmp_path):
    common = [
        f"data.shards_dir={tmp_path / 'shards'}",
        *TINY_SHARDS,
        "trainer.max_steps=3",
        "trainer.checkpoint_every_n_steps=3",
        "trainer.log_every_n_steps=1",
    ]
    plain = train_cli(*common, f"hydra.run.dir={tmp_path / 'plain'}")
    assert plain.returncode == 0, plain.stderr[-3000:]
    validated = train_cli(
        *common,
        *FAST,
        "validation.every_n_steps=2",
        "validation.at_start=true",
        "validation.at_end=true",
        f"hydra.run.dir={tmp_path / 'validated'}",
    )
    assert validated.returncode == 0, validated.stderr[-3000:]

    assert not (tmp_path / "plain" / "validation").exists()
    assert not any(k.startswith("val/") for k in metrics_rows(tmp_path / "plain")[0])
    bench = tmp_path / "validated" / "validation"
    assert sorted(p.name for p in bench.iterdir()) == ["step_000000", "step_000002", "step_000003"]
    for folder in bench.iterdir():
        results = json.loads((folder / "results.json").read_text())
        assert results["step"] == int(folder.name[5:]) and results["settings"]["num_steps"] == 2
        assert {name: s["n"] for name, s in results["categories"].items()} == {
            "t2i_general": 1,
            "edit_general": 1,
        }
        assert (folder / "results.md").is_file() and (folder / "edit_general.png").is_file()
    rows = metrics_rows(tmp_path / "validated")
    val_steps = [int(r["step"]) for r in rows if r.get("val/overall/score")]
    assert val_steps == [0, 2, 3]
    assert all(0 <= float(r["val/t2i_general/accuracy"]) <= 1 for r in rows if r.get("val/overall/score"))
    assert "Benchmark overall score: step 0" in (tmp_path / "validated" / "train.log").read_text()

    def losses(run_dir: Path) -> list[str]:
        return [r["train/loss"] for r in metrics_rows(run_dir) if r.get("train/loss")]

    assert len(losses(tmp_path / "plain")) == 3
    assert losses(tmp_path / "validated") == losses(tmp_path / "plain")


class ImageLogger:
    """Records what a W&B-like logger receives."""

    def __init__(self) -> None:
        self.metrics: list[tuple[dict, int]] = []
        self.images: list[tuple[str, int]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.metrics.append((metrics, step))

    def log_image(self, key: str, images: list, caption: list, step: int) -> None:
        assert images[0].ndim == 3 and len(caption) == 1
        self.images.append((key, step))


def test_run_restores_modes_and_random_state_and_logs_grids(tiny_sft_run, tiny_eval_dir, tmp_path):
    module = tiny_sft_run[2]
    module.train()
    module.backbone.vae.eval()  # frozen parts in eval mode, as training keeps them
    modes = {name: m.training for name, m in module.named_modules()}
    logger = ImageLogger()
    trainer = SimpleNamespace(
        global_step=7, is_global_zero=True, loggers=[logger], precision_plugin=Precision(), should_stop=False
    )
    categories = ["t2i_text_rendering", "edit_general"]  # T2I with OCR, and editing
    cfg = ValidationConfig(
        every_n_steps=7, eval_dir=str(tiny_eval_dir), categories=categories, limit=1, num_steps=2
    )
    callback = BenchmarkValidation(cfg, image_size=64, out_dir=tmp_path)

    def draws_after(validate: bool) -> tuple[float, float, float]:
        torch.manual_seed(3)
        np.random.seed(3)
        random.seed(3)
        if validate:
            callback.on_train_batch_end(trainer, module, None, None, 0)
        return float(torch.rand(1)), float(np.random.rand()), random.random()

    assert draws_after(validate=True) == draws_after(validate=False)
    assert {name: m.training for name, m in module.named_modules()} == modes
    ((metrics, step),) = logger.metrics
    expected = {"val/overall/score", "val/t2i_text_rendering/ocr", "val/edit_general/preserve_score"}
    assert step == 7 and expected <= set(metrics)
    assert sorted(logger.images) == [("val/edit_general/grid", 7), ("val/t2i_text_rendering/grid", 7)]
    assert (tmp_path / "step_000007" / "results.json").is_file()
    callback.on_train_batch_end(trainer, module, None, None, 1)  # a second micro-batch of the same step
    assert len(logger.metrics) == 1


def test_preserved_rng_restores_every_global_stream():
    # evaluate_backbone draws from its own generators today; this keeps the guarantee if that changes.
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    with preserved_rng(torch.device("cpu")):
        torch.rand(3)
        np.random.rand(3)
        random.random()
    assert torch.equal(before[0], torch.get_rng_state())
    assert (before[1] == np.random.get_state()[1]).all() and before[2] == random.getstate()


def test_benchmark_metrics_names():
    results = {
        "categories": {"t2i_general": {"score": 0.5, "accuracy": 0.0, "n": 2}},
        "overall": {"score": 0.5, "accuracy": 0.0},
    }
    assert benchmark_metrics(results) == {
        "val/t2i_general/score": 0.5,
        "val/t2i_general/accuracy": 0.0,
        "val/overall/score": 0.5,
        "val/overall/accuracy": 0.0,
    }


def test_bad_settings_fail_by_name(tmp_path):
    with pytest.raises(ValueError, match="validation.categories"):
        BenchmarkValidation(ValidationConfig(categories=["t2i_genral"]), 64, tmp_path)
    with pytest.raises(ValueError, match="validation.limit"):
        BenchmarkValidation(ValidationConfig(limit=0), 64, tmp_path)
    callback = BenchmarkValidation(ValidationConfig(eval_dir=str(tmp_path / "nowhere")), 64, tmp_path)
    with pytest.raises(FileNotFoundError, match="validation.eval_dir"):
        callback.setup(None, None, "fit")
