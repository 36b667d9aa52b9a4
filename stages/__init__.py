"""Lightning layer: the training stages and what they share."""

from stages.align import AlignmentModule
from stages.grpo import MRGRPOModule
from stages.sft import JointSFTModule

STAGES = {"align": AlignmentModule, "sft": JointSFTModule, "grpo": MRGRPOModule}
