"""JointSFTModule: joint supervised fine-tuning (stage 2 of DeepGen).

Trains the think tokens, the SCB bridge, the full DiT and LoRA on the VLM's language model, with
the flow-matching loss on single-task micro-batches of T2I pairs and editing triplets (original
cycle: 2 T2I batches, then 1 edit batch). T2I captions are dropped to "" with probability
``cfg_dropout`` for classifier-free guidance; editing keeps its text and images (as the original).
"""

from __future__ import annotations

import random

import torch

from deepgen.config import ModelConfig, StageConfig
from stages.base import StageModule


class JointSFTModule(StageModule):
    def __init__(self, model_cfg: ModelConfig, stage_cfg: StageConfig, max_steps: int, seed: int = 0) -> None:
        super().__init__(model_cfg, stage_cfg, max_steps)
        self._dropout_rng = random.Random(seed)

    def drop_captions(self, captions: list[str]) -> list[str]:
        p = self.stage_cfg.cfg_dropout
        return ["" if self._dropout_rng.random() < p else c for c in captions]

    def task_loss(self, batch: dict) -> torch.Tensor:
        bb = self.backbone
        if batch["task"] == "t2i":
            cond = bb.condition_t2i(self.drop_captions(batch["captions"]))
            return bb.flow_loss(cond, batch["images"])
        if batch["task"] == "edit":
            cond = bb.condition_edit(batch["instructions"], batch["sources"])
            return bb.flow_loss(cond, batch["targets"], bb.encode_references(batch["sources"]))
        raise ValueError(f"Unknown task '{batch['task']}' in batch (expected 't2i' or 'edit')")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.task_loss(batch)
        size = len(batch.get("captions") or batch.get("instructions"))
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log(f"train/loss_{batch['task']}", loss, batch_size=size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, batch_size=size)
        return loss
