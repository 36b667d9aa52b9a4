"""Backbones built from architecture configs alone (deepgen/model/random_init.py)."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

from deepgen.config import ModelConfig
from deepgen.model.backbone import DeepGenBackbone
from deepgen.model.dit import DeepGenSD3Transformer
from deepgen.model.published_configs import write_config_only_dirs
from deepgen.model.random_init import PUBLISHED, TINY, build_random_backbone, build_random_diffusion
from deepgen.model.vlm import VLMBatch


def test_published_architecture_matches_the_config_file_build(tmp_path):
    """The file-free build has exactly the shapes of the path real runs take (config files on disk)."""
    vlm_dir, dit_dir = write_config_only_dirs(tmp_path)
    cfg = ModelConfig(name="deepgen_5b", vlm_path=str(vlm_dir), dit_path=str(dit_dir))
    from_files = DeepGenBackbone.from_pretrained_dirs(cfg, device="meta")
    built = build_random_backbone(PUBLISHED, device="meta")
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.state_dict().items()}  # noqa: E731
    assert shapes(built) == shapes(from_files)
    assert built.parameter_counts() == from_files.parameter_counts()
    assert built.fusion_layers == [35, 29, 23, 17, 11, 5] and built.tokenizer is None


def test_tiny_architecture_runs_a_training_loss_and_sampling():
    torch.manual_seed(0)
    bb = build_random_backbone(TINY)
    assert isinstance(bb.dit, DeepGenSD3Transformer)
    assert isinstance(build_random_diffusion(TINY, stock=True).transformer, SD3Transformer2DModel)
    params = dict(bb.named_parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params.values())
    assert bb.vlm.model.language_model.layers[0].self_attn.q_proj.weight.std() > 0  # initialised, not empty
    ids = torch.randint(0, 500, (2, 12))
    mask = torch.ones_like(ids)
    positions = torch.arange(12).expand(3, 2, 12)
    think = torch.zeros_like(ids, dtype=torch.bool)
    think[:, -TINY.model.num_think_tokens :] = True
    cond = bb.encode_prompts(VLMBatch(ids, mask, positions, think, None, None))
    assert cond.seq.shape == (2, 12, TINY.transformer["joint_attention_dim"])
    loss = bb.flow_loss(cond, torch.rand(2, 3, 32, 32) * 2 - 1)
    loss.backward()
    assert torch.isfinite(loss) and bb.bridge.seq_head.weight.grad is not None
    with torch.no_grad():
        images = bb.sample(cond, cond, 32, 32, num_steps=2)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
