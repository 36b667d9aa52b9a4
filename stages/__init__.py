"""Lightning layer: the training stages and what they share."""

from stages.sft import JointSFTModule

STAGES = {"sft": JointSFTModule}
