"""BenchmarkValidation: the tiny-world benchmark (deepgen/eval/benchmark.py) as validation during training.

The same generation and scoring as evaluate.py, on the held-out eval files, every N steps and
optionally before the first and after the last step. Rank 0 writes ``<run>/validation/step_NNNNNN/``
(results.json, results.md, one grid per category) and logs ``val/...`` at the training step; a
sharded model's forward is collective, so there every rank samples (as SampleGridCallback does).
Validation leaves the training run as it found it: module modes and every random state are restored,
so a run's losses are the same with validation on or off.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from deepgen.config import ValidationConfig
from deepgen.eval.benchmark import CATEGORIES, EvalSettings, eval_files, evaluate_backbone, write_results
from stages.parallel import is_sharded

log = logging.getLogger(__name__)


@contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Restore torch's (CPU and ``device``), numpy's and Python's global random state on exit, so the
    training stream draws the same noise, timesteps and dropout whatever ran inside."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def benchmark_metrics(results: dict) -> dict[str, float]:
    """``val/<category>/<metric>`` for every summary value but the count, and ``val/overall/score|accuracy``."""
    metrics = {
        f"val/{name}/{key}": float(value)
        for name, summary in results["categories"].items()
        for key, value in summary.items()
        if key != "n"
    }
    metrics.update({f"val/overall/{key}": float(value) for key, value in results["overall"].items()})
    return metrics


class BenchmarkValidation(L.Callback):
    """Runs the tiny-world benchmark at the steps ``cfg`` names; see the module docstring."""

    def __init__(self, cfg: ValidationConfig, image_size: int, out_dir: str | Path) -> None:
        if cfg.every_n_steps < 0:
            raise ValueError(f"validation.every_n_steps={cfg.every_n_steps}: use 0 (off) or a step count")
        if cfg.limit is not None and cfg.limit < 1:
            raise ValueError(f"validation.limit={cfg.limit}: use a prompt count >= 1, or null for all")
        unknown = sorted(set(cfg.categories) - set(CATEGORIES))
        if unknown or not cfg.categories:
            raise ValueError(f"validation.categories: unknown {unknown}; choose from {list(CATEGORIES)}")
        self.cfg = cfg
        self.settings = EvalSettings(
            num_steps=cfg.num_steps,
            cfg_scale=cfg.cfg_scale,
            seed=cfg.seed,
            size=image_size,
            limit=cfg.limit,
            batch_size=cfg.batch_size,
            categories=list(cfg.categories),
        )
        self.out_dir = Path(out_dir)
        self.last_step = -1
        """The step last validated, or where this process started training: never twice per step."""
        self.history: dict[int, dict[str, float]] = {}
        """Step -> overall score and accuracy (rank 0)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        # After prepare_data, which writes the tiny-world shards and their eval files: fail before training.
        try:
            eval_files(self.cfg.eval_dir, self.settings.categories)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{e}. Validation needs the held-out tiny-world files: set validation.eval_dir, or turn "
                "validation off (validation.every_n_steps=0 validation.at_start=false validation.at_end=false)"
            ) from e

    def on_train_start(self, trainer, pl_module) -> None:
        if self.cfg.at_start and trainer.global_step == 0:
            self.run(trainer, pl_module)
        self.last_step = trainer.global_step  # a resumed run's starting step was validated (or not) before

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, every = trainer.global_step, self.cfg.every_n_steps
        # step > last_step: with gradient accumulation several micro-batches end at the same step.
        # should_stop: on pre-emption the time left goes to the checkpoint, not to sampling.
        if every and step > self.last_step and step % every == 0 and not trainer.should_stop:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if self.cfg.at_end and step >= trainer.max_steps and step > self.last_step:
            self.run(trainer, pl_module)
        if trainer.is_global_zero and len(self.history) >= 2:
            first, last = min(self.history), max(self.history)
            log.info(
                f"Benchmark overall score: step {first} {self.history[first]['score']:.3f} -> "
                f"step {last} {self.history[last]['score']:.3f}"
            )

    def run(self, trainer, pl_module) -> None:
        """Generate and score the eval prompts with the model in eval mode; rank 0 writes and logs."""
        step = trainer.global_step
        self.last_step = step
        if not (trainer.is_global_zero or is_sharded(pl_module.backbone)):
            return
        out = self.out_dir / f"step_{step:06d}" if trainer.is_global_zero else None
        start = time.perf_counter()
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        with preserved_rng(pl_module.device), trainer.precision_plugin.val_step_context():
            results = evaluate_backbone(
                pl_module.backbone, self.cfg.eval_dir, self.settings, out, progress=False
            )
        for module, training in modes.items():  # exactly as before: grpo keeps frozen parts in eval mode
            module.training = training
        seconds = time.perf_counter() - start
        if not trainer.is_global_zero:
            return
        write_results(results, out, {"step": step, "seconds": seconds})
        self.history[step] = results["overall"]
        metrics = {**benchmark_metrics(results), "val/seconds": seconds}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if self.cfg.log_images and hasattr(logger, "log_image"):
                self.log_grids(logger, out, list(results["categories"]), step)
        overall = results["overall"]
        images = sum(summary["n"] for summary in results["categories"].values())
        log.info(
            f"Benchmark at step {step} ({images} images, {seconds:.0f} s): overall score "
            f"{overall['score']:.3f}, accuracy {overall['accuracy']:.3f} -> {out}"
        )

    @staticmethod
    def log_grids(logger, out: Path, categories: list[str], step: int) -> None:
        """One image per category under its own key, so W&B's step slider compares it across steps."""
        for name in categories:
            grid = out / f"{name}.png"
            rows = "source | output | target" if name.startswith("edit") else "output | target"
            logger.log_image(
                f"val/{name}/grid",
                images=[np.asarray(Image.open(grid).convert("RGB"))],
                caption=[f"{CATEGORIES[name]}, step {step}: {rows}"],
                step=step,
            )
