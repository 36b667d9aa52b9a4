"""JointSFTModule: joint supervised fine-tuning (stage 2 of DeepGen).

Trains the think tokens, the SCB bridge, the full DiT and LoRA on the VLM's language model (original:
r64, alpha 128, dropout 0.05), on T2I and edit micro-batches in a 2:1 cycle, usually starting from
the alignment checkpoint (``init_from``). Everything else is shared with the other stages.
"""

from __future__ import annotations

from deepgen.config import StageConfig
from stages.base import StageModule


class JointSFTModule(StageModule):
    def check_stage(self, stage_cfg: StageConfig) -> None:
        if not stage_cfg.train_dit:
            raise ValueError(
                "stage sft trains the DiT (stage.train_dit=true); use stage=align to keep it frozen"
            )
