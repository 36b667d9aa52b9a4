"""AlignmentModule: alignment pre-training (stage 1 of DeepGen).

Only the think tokens and the SCB bridge train; the VLM and the DiT stay frozen (gradients reach the
think tokens through the frozen VLM). Original: lr 1e-4, 1% warmup, cosine, edit:T2I 1:3.
"""

from __future__ import annotations

from deepgen.config import StageConfig
from stages.base import StageModule


class AlignmentModule(StageModule):
    def check_stage(self, stage_cfg: StageConfig) -> None:
        if stage_cfg.train_dit or stage_cfg.lora is not None or not stage_cfg.train_bridge:
            raise ValueError(
                "stage align trains only the think tokens and the bridge: needs stage.train_bridge=true, "
                "stage.train_dit=false, stage.lora=null"
            )
