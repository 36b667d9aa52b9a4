"""Callbacks shared by the stages: sample grids written to the run folder and to W&B."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch import Tensor

from deepgen.config import SamplingConfig
from deepgen.images import tile_rows, to_uint8
from stages.parallel import is_sharded

log = logging.getLogger(__name__)


class SampleGridCallback(L.Callback):
    """Samples the configured T2I prompts and a few editing triplets seen in training.

    Row 1 holds the T2I samples; each further row is (source, edited sample, ground-truth target).
    """

    def __init__(
        self, cfg: SamplingConfig, image_size: int, out_dir: str | Path, every_n_steps: int = 0
    ) -> None:
        self.cfg = cfg
        self.image_size = image_size
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.edits: list[tuple[Tensor, str, Tensor]] = []
        self.last_path: Path | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch["task"] == "edit" and len(self.edits) < self.cfg.num_edit_samples:
            for src, instruction, tgt in zip(
                batch["sources"], batch["instructions"], batch["targets"], strict=True
            ):
                if len(self.edits) < self.cfg.num_edit_samples:
                    self.edits.append((src[0].cpu(), instruction, tgt.cpu()))
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step < trainer.max_steps:
            self.write_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step >= trainer.max_steps:  # not when stopped early (pre-emption)
            self.write_grid(trainer, pl_module)

    @torch.no_grad()
    def make_grid(self, pl_module) -> Image.Image:
        bb = pl_module.backbone
        size = self.image_size
        cfg = self.cfg

        def generator() -> torch.Generator:
            return torch.Generator(device=bb.device).manual_seed(cfg.seed)

        rows = []
        if cfg.prompts:
            n = len(cfg.prompts)
            images = bb.sample(
                bb.condition_t2i(list(cfg.prompts)),
                bb.condition_t2i([""] * n),
                size,
                size,
                num_steps=cfg.num_steps,
                cfg_scale=cfg.cfg_scale,
                generator=generator(),
            )
            rows.append(list(to_uint8(images)))
        if self.edits:
            refs = [[src.to(bb.device)] for src, _, _ in self.edits]
            instructions = [instruction for _, instruction, _ in self.edits]
            images = bb.sample(
                bb.condition_edit(instructions, refs),
                bb.condition_edit([""] * len(refs), refs),
                size,
                size,
                ref_latents=bb.encode_references(refs),
                num_steps=cfg.num_steps,
                cfg_scale=cfg.cfg_scale,
                generator=generator(),
            )
            for (src, _, tgt), out in zip(self.edits, to_uint8(images), strict=True):
                rows.append([to_uint8(src[None])[0], out, to_uint8(tgt[None])[0]])
        return tile_rows(rows)

    def write_grid(self, trainer, pl_module) -> None:
        # A sharded model's forward is collective: every rank samples, rank 0 writes.
        sharded = is_sharded(pl_module.backbone)
        if not (trainer.is_global_zero or sharded) or not (self.cfg.prompts or self.edits):
            return
        was_training = pl_module.training
        pl_module.eval()
        grid = self.make_grid(pl_module)
        pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.last_path = self.out_dir / f"step_{trainer.global_step:06d}.png"
        grid.save(self.last_path)
        caption = " | ".join(self.cfg.prompts) + (" ; edits: source, sample, target" if self.edits else "")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(
                    "samples/grid", images=[np.asarray(grid)], caption=[caption], step=trainer.global_step
                )


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint every N steps, plus the last step when a run reaches ``max_steps``.

    A finished run always ends with its final weights, whatever N is, so the next stage's
    ``init_from``, export and evaluation can use them. (A pre-empted run is saved by Preemption.)
    """

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if trainer.global_step >= trainer.max_steps and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


class LossSummary(L.Callback):
    """Keeps the per-step training loss and prints how it moved over the run."""

    def __init__(self, window: int = 50) -> None:
        self.window = window
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def summary(self) -> str:
        n = min(self.window, max(1, len(self.losses) // 2))
        first, last = np.mean(self.losses[:n]), np.mean(self.losses[-n:])
        return f"train/loss: mean of first {n} steps {first:.4f} -> mean of last {n} steps {last:.4f}"

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.losses:
            log.info(self.summary())


class Preemption(L.Callback):
    """On SIGTERM or SIGUSR1 (SLURM pre-emption, `scancel --signal`), save a checkpoint and stop cleanly.

    The handler only sets a flag; the checkpoint is written after the current batch, when weights,
    optimiser and data position agree. Every rank stops at the same step (the flag is all-reduced).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.received: int | None = None
        self.saved: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():  # signals can only be set there
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        self.saved = self.checkpoint_dir / f"step_{trainer.global_step:06d}.ckpt"
        trainer.save_checkpoint(self.saved)
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        log.warning(f"Received {name}: saved {self.saved} and stopping; continue with resume=auto")
        trainer.should_stop = True


def run_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest-step complete checkpoint in one run folder, or None."""
    done = [
        c
        for c in (Path(run_dir) / "checkpoints").glob("step_*.ckpt")
        if (c / "weights.safetensors").is_file()
    ]
    return max(done, key=lambda c: c.name) if done else None


def latest_checkpoint(stage_dir: str | Path) -> Path | None:
    """The highest-step complete checkpoint of the newest run under `stage_dir` (run folders sort by time)."""
    for run in sorted((p for p in Path(stage_dir).glob("*") if p.is_dir()), reverse=True):
        found = run_checkpoint(run)
        if found:
            return found
    return None
