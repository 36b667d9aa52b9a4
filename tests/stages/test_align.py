import pytest
import torch

from deepgen.config import LoraConfig, StageConfig
from stages.align import AlignmentModule
from stages.checkpoint_io import SafeCheckpointIO
from stages.sft import JointSFTModule


def align_cfg() -> StageConfig:
    return StageConfig(name="align", t2i_per_cycle=3, edit_per_cycle=1)


def sft_cfg(rank: int = 4) -> StageConfig:
    return StageConfig(name="sft", train_dit=True, lora=LoraConfig(rank=rank, alpha=2 * rank))


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_align_trains_only_think_tokens_and_bridge(tiny_model_cfg):
    module = AlignmentModule(tiny_model_cfg, align_cfg(), max_steps=10)
    module.configure_model()
    names = module.trainable_names()
    assert "backbone.think_tokens" in names
    assert all(n == "backbone.think_tokens" or n.startswith("backbone.bridge.") for n in names)
    assert not any(p.requires_grad for p in module.backbone.vlm.parameters())
    assert not any(p.requires_grad for p in module.backbone.dit.parameters())


def test_gradients_reach_the_think_tokens_through_the_frozen_vlm(tiny_model_cfg):
    module = AlignmentModule(tiny_model_cfg, align_cfg(), max_steps=10)
    module.configure_model()
    torch.nn.init.normal_(module.backbone.bridge.seq_head.weight)  # zero heads would stop the gradient
    batch = {"task": "t2i", "images": images(2), "captions": ["a red circle", "a blue square"]}
    module.task_loss(batch).backward()
    assert module.backbone.think_tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.backbone.vlm.parameters())


def test_stage_settings_that_contradict_the_stage_are_refused():
    with pytest.raises(ValueError, match="stage align trains only"):
        AlignmentModule(None, StageConfig(name="align", train_dit=True), max_steps=1)
    with pytest.raises(ValueError, match="stage sft trains the DiT"):
        JointSFTModule(None, StageConfig(name="sft"), max_steps=1)


def save_stage(module, path) -> None:
    """What the trainer writes: the trainable weights only."""
    weights = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    SafeCheckpointIO().save_checkpoint({"state_dict": weights}, path)


def test_sft_starts_from_the_alignment_checkpoint(tiny_model_cfg, tmp_path):
    align = AlignmentModule(tiny_model_cfg, align_cfg(), max_steps=10)
    align.configure_model()
    with torch.no_grad():
        align.backbone.think_tokens.add_(1.0)
        align.backbone.bridge.seq_head.weight.fill_(0.5)
    save_stage(align, tmp_path / "align.ckpt")

    sft = JointSFTModule(tiny_model_cfg, sft_cfg(), max_steps=10, init_from=str(tmp_path / "align.ckpt"))
    sft.configure_model()
    assert torch.equal(sft.backbone.think_tokens, align.backbone.think_tokens)
    assert torch.equal(sft.backbone.bridge.seq_head.weight, align.backbone.bridge.seq_head.weight)
    dit = dict(sft.backbone.dit.named_parameters())
    assert all(torch.equal(dit[n], p) for n, p in align.backbone.dit.named_parameters())  # base DiT kept


def test_a_checkpoint_of_another_model_is_refused_with_the_reason(tiny_model_cfg, tmp_path):
    sft = JointSFTModule(tiny_model_cfg, sft_cfg(rank=4), max_steps=10)
    sft.configure_model()
    save_stage(sft, tmp_path / "sft.ckpt")
    with pytest.raises(ValueError, match="weights it does not have.*lora"):
        AlignmentModule(
            tiny_model_cfg, align_cfg(), max_steps=1, init_from=str(tmp_path / "sft.ckpt")
        ).configure_model()
    with pytest.raises(ValueError, match="has shape"):
        JointSFTModule(
            tiny_model_cfg, sft_cfg(rank=8), max_steps=1, init_from=str(tmp_path / "sft.ckpt")
        ).configure_model()
    with pytest.raises(FileNotFoundError, match="not a deepgen checkpoint"):
        JointSFTModule(tiny_model_cfg, sft_cfg(), max_steps=1, init_from=str(tmp_path)).configure_model()
