"""StageModule: the plumbing every training stage shares.

Builds the backbone in ``configure_model`` (optionally starting from an earlier stage's checkpoint),
decides in one place what trains (from the stage config), computes the flow-matching loss of T2I and
edit micro-batches, makes the AdamW groups and the warmup + cosine schedule, and keeps checkpoints
down to the trainable weights plus the random state a bit-exact resume needs.
"""

from __future__ import annotations

import logging
import math
import random

import lightning as L
import torch
from torch import nn

from deepgen.config import ModelConfig, StageConfig
from deepgen.data.latents import vae_fingerprint
from deepgen.data.shards import LatentCacheError, latents_hint
from deepgen.io.checkpoints import copy_weights, load_checkpoint_dir
from deepgen.model.backbone import DeepGenBackbone
from deepgen.model.lora import attach_vlm_lora
from stages.parallel import shard_for_strategy

log = logging.getLogger(__name__)


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
    """A stage trains the flow-matching loss on single-task T2I / edit micro-batches; stages differ in
    what trains (``check_stage`` in each subclass) and in their settings (conf/stage/)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        stage_cfg: StageConfig,
        max_steps: int,
        *,
        seed: int = 0,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.model_cfg = model_cfg
        self.stage_cfg = stage_cfg
        self.max_steps = max_steps
        self.init_from = init_from
        self.backbone: DeepGenBackbone | None = None
        self.carried: set[str] = set()
        """Frozen weights that came from init_from (grpo's bridge and LoRA): checkpoints carry them, so a
        checkpoint is complete on its own and a resumed run needs no init_from."""
        self._dropout_rng = random.Random(seed)
        self._vae_fingerprint: str | None = None
        # Checkpoints hold only the trainable weights; on_load_checkpoint checks the key set itself.
        self.strict_loading = False
        if stage_cfg is not None:
            self.check_stage(stage_cfg)

    def check_stage(self, stage_cfg: StageConfig) -> None:
        """Refuse settings that contradict what the stage is (overridden by each stage)."""

    # ---------------------------------------------------------------------- model and trainables
    def configure_model(self) -> None:
        if self.backbone is None:
            self.backbone = DeepGenBackbone.from_pretrained_dirs(self.model_cfg)
            self.apply_trainable()
            if self.init_from:
                self.load_stage_weights(self.init_from)
            self.on_weights_ready()
        if self.device_mesh is not None:  # hardware.strategy=fsdp2: shard once, after the trainable flags
            shard_for_strategy(self.backbone, self.trainer.strategy)

    def on_weights_ready(self) -> None:
        """Hook after the starting weights are in place and before sharding (grpo copies its reference)."""

    def load_stage_weights(self, path: str) -> int:
        """Start from another stage's checkpoint (align -> sft -> grpo): copy every weight it holds.

        The checkpoint may hold fewer weights than this stage trains (sft trains the DiT that align
        left frozen) but none that this model lacks or shapes that differ. Returns the tensor count.
        """
        weights = load_checkpoint_dir(path)["state_dict"]
        hint = "was it trained with another model, bridge, think-token or LoRA setting?"
        copy_weights(weights, dict(self.named_parameters()), f"init_from={path}", hint)
        self.carried = set(weights) - set(self.required_names())
        log.info(f"Initialised {len(weights)} weights from {path}")
        return len(weights)

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

    def required_names(self) -> list[str]:
        """Weights every checkpoint of this stage holds: the trainable ones (grpo adds its reference DiT)."""
        return self.trainable_names()

    def checkpoint_names(self) -> list[str]:
        """The weights a checkpoint holds: the required ones and those carried from init_from."""
        return sorted(set(self.required_names()) | self.carried)

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

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_multiplier(self, step: int) -> float:
        """Linear warmup then cosine (align, sft); the RL stage keeps the lr constant after warmup."""
        opt_cfg = self.stage_cfg.optim
        return warmup_cosine(step, self.max_steps, opt_cfg.warmup_ratio, opt_cfg.min_lr_ratio)

    # ------------------------------------------------------------------------------- training
    def drop_captions(self, captions: list[str]) -> list[str]:
        """T2I captions become "" with probability cfg_dropout, for classifier-free guidance."""
        p = self.stage_cfg.cfg_dropout
        return ["" if self._dropout_rng.random() < p else c for c in captions]

    def task_loss(self, batch: dict) -> torch.Tensor:
        """Flow-matching loss of one micro-batch; editing keeps its text and images (as the original).

        With cached VAE posteriors in the batch (data.vae_latents) the latents are drawn from them instead
        of encoding the images: the same random draws in the same order, so the same loss.
        """
        bb = self.backbone
        cached = batch.get("vae_moments")
        if cached is not None:
            self.check_vae_moments(cached)
        if batch["task"] == "t2i":
            cond = bb.condition_t2i(self.drop_captions(batch["captions"]))
            return bb.flow_loss(cond, batch["images"], moments=None if cached is None else cached["images"])
        if batch["task"] == "edit":
            cond = bb.condition_edit(batch["instructions"], batch["sources"])
            if cached is None:
                return bb.flow_loss(cond, batch["targets"], bb.encode_references(batch["sources"]))
            refs = bb.sample_references(cached["sources"])
            return bb.flow_loss(cond, batch["targets"], refs, moments=cached["targets"])
        raise ValueError(f"Unknown task '{batch['task']}' in batch (expected 't2i' or 'edit')")

    def check_vae_moments(self, cached: dict) -> None:
        """Refuse cached posteriors that another VAE made: they would train on wrong latents."""
        if self._vae_fingerprint is None:  # hashing the VAE's weights takes a moment: once per run
            self._vae_fingerprint = vae_fingerprint(self.backbone.vae)
        for fingerprint, url in zip(cached["vae"], cached["shards"], strict=True):
            if fingerprint != self._vae_fingerprint:
                hint = latents_hint(url, cached["image_size"], cached["size_unit"], self.model_cfg.dit_path)
                raise LatentCacheError(
                    f"the VAE latents cached in {url} were made by VAE {fingerprint}, but this model's VAE "
                    f"({self.model_cfg.dit_path}/vae) is {self._vae_fingerprint}; {hint}"
                )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.task_loss(batch)
        size = len(batch.get("captions") or batch.get("instructions"))
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log(f"train/loss_{batch['task']}", loss, batch_size=size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, batch_size=size)
        return loss

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        kept = set(self.checkpoint_names())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in kept}
        checkpoint["init_from"] = self.init_from
        # Random state, so a resumed run draws the same noise, timesteps, dropout and caption drops.
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "caption_dropout": self._dropout_rng.getstate()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved, required = set(checkpoint["state_dict"]), set(self.required_names())
        missing, unknown = required - saved, saved - {n for n, _ in self.named_parameters()}
        if missing or unknown:
            raise ValueError(
                f"Checkpoint does not match stage '{self.stage_cfg.name}': {len(missing)} weights it must hold "
                f"are missing (e.g. {sorted(missing)[:3]}), {len(unknown)} are not in this model "
                f"(e.g. {sorted(unknown)[:3]})"
            )
        self.carried = saved - required
        if "rng" in checkpoint:
            torch.set_rng_state(checkpoint["rng"]["torch"])
            self._dropout_rng.setstate(checkpoint["rng"]["caption_dropout"])
