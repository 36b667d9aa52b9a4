"""StageModule: the plumbing every training stage shares.

Builds the backbone in ``configure_model``, decides in one place what trains (from the stage
config), makes the AdamW groups and the warmup + cosine schedule, and keeps checkpoints down to
the trainable weights.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn

from deepgen.config import ModelConfig, StageConfig
from deepgen.model.backbone import DeepGenBackbone
from deepgen.model.lora import attach_vlm_lora


def warmup_cosine(step: int, max_steps: int, warmup_ratio: float, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup over ``warmup_ratio * max_steps`` then cosine down to ``min_ratio``."""
    warmup = max(1, round(warmup_ratio * max_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay only on tensors of two or more dimensions (not biases, norms, 1-D scales)."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class StageModule(L.LightningModule):
    def __init__(self, model_cfg: ModelConfig, stage_cfg: StageConfig, max_steps: int) -> None:
        super().__init__()
        self.model_cfg = model_cfg
        self.stage_cfg = stage_cfg
        self.max_steps = max_steps
        self.backbone: DeepGenBackbone | None = None
        # Checkpoints hold only the trainable weights; on_load_checkpoint checks the key set itself.
        self.strict_loading = False

    # ---------------------------------------------------------------------- model and trainables
    def configure_model(self) -> None:
        if self.backbone is not None:
            return
        self.backbone = DeepGenBackbone.from_pretrained_dirs(self.model_cfg)
        self.apply_trainable()

    def apply_trainable(self) -> None:
        """The one place that decides what trains in a stage."""
        bb = self.backbone
        bb.requires_grad_(False)
        if self.stage_cfg.train_bridge:
            bb.think_tokens.requires_grad_(True)
            bb.bridge.requires_grad_(True)
        if self.stage_cfg.train_dit:
            bb.dit.requires_grad_(True)
        if self.stage_cfg.lora is not None:
            attach_vlm_lora(bb.vlm, self.stage_cfg.lora)  # new LoRA weights are the only trainable VLM part
        # from_pretrained leaves modules in eval mode, which would silently switch off LoRA dropout.
        bb.train()
        bb.vae.eval()
        trainable = self.trainable_names()
        if not trainable:
            raise ValueError(
                f"Stage '{self.stage_cfg.name}' trains nothing: check its train_* and lora settings"
            )

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def describe_parameters(self) -> str:
        """One line per part with total and trainable parameter counts (printed at start)."""
        bb = self.backbone
        parts = {
            "vlm": bb.vlm,
            "think_tokens": bb.think_tokens,
            "bridge": bb.bridge,
            "dit": bb.dit,
            "vae": bb.vae,
        }
        lines = []
        for name, part in parts.items():
            params = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
            total = sum(p.numel() for p in params)
            train = sum(p.numel() for p in params if p.requires_grad)
            lines.append(f"  {name:<13} {total / 1e6:10.3f} M params, {train / 1e6:10.3f} M trainable")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        opt_cfg = self.stage_cfg.optim
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            adamw_param_groups(named, opt_cfg.weight_decay),
            lr=opt_cfg.lr,
            betas=tuple(opt_cfg.betas),
            eps=opt_cfg.eps,
        )

        def multiplier(step: int) -> float:
            return warmup_cosine(step, self.max_steps, opt_cfg.warmup_ratio, opt_cfg.min_lr_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = set(self.trainable_names())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved, expected = set(checkpoint["state_dict"]), set(self.trainable_names())
        if saved != expected:
            missing, extra = sorted(expected - saved)[:3], sorted(saved - expected)[:3]
            raise ValueError(
                f"Checkpoint does not match stage '{self.stage_cfg.name}': {len(expected - saved)} trainable "
                f"weights missing (e.g. {missing}), {len(saved - expected)} unexpected (e.g. {extra})"
            )
