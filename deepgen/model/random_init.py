"""Build the backbone from architecture configs alone, with random weights: nothing is read or downloaded.

Benchmarks and memory plans need the real shapes, not the real weights; timing does not depend on
what the numbers are. ``PUBLISHED`` is the full-size DeepGen architecture (Qwen2.5-VL-3B, the SD3.5-Medium
DiT and VAE, the original connector sizes); ``TINY`` is a few-layer miniature of the same classes for
CPU smoke tests. The parts are the classes the loaders return (``deepgen.model.loading``), built
directly on the requested device so a full-size model needs no CPU copy first. There is no tokenizer:
callers feed token ids (``VLMBatch``) themselves.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from deepgen.config import BridgeConfig, ModelConfig
from deepgen.model.backbone import DeepGenBackbone
from deepgen.model.dit import DeepGenSD3Transformer
from deepgen.model.loading import DiffusionParts, VLMParts
from deepgen.model.published_configs import (
    QWEN2_5_VL_3B_INSTRUCT,
    QWEN2_5_VL_PREPROCESSOR,
    SD3_5_MEDIUM_TRANSFORMER,
    SD3_SCHEDULER,
    SD3_VAE,
)
from deepgen.model.vlm import VisionSpec

M = TypeVar("M", bound=torch.nn.Module)


@dataclass(frozen=True)
class Architecture:
    """Every config a backbone is built from: the two model directories' files plus our own sizes."""

    name: str
    vlm: dict  # Qwen2.5-VL config.json
    preprocessor: dict  # preprocessor_config.json (vision patching)
    transformer: dict  # diffusers transformer/config.json
    vae: dict  # diffusers vae/config.json
    scheduler: dict  # diffusers scheduler/scheduler_config.json
    model: ModelConfig = field(default_factory=ModelConfig)  # think tokens and connector sizes


RANDOM_PATH = "(random weights: deepgen.model.random_init)"

PUBLISHED = Architecture(
    name="deepgen_5b",
    vlm=QWEN2_5_VL_3B_INSTRUCT,
    preprocessor=QWEN2_5_VL_PREPROCESSOR,
    transformer=SD3_5_MEDIUM_TRANSFORMER,
    vae=SD3_VAE,
    scheduler=SD3_SCHEDULER,
    model=ModelConfig(name="deepgen_5b", vlm_path=RANDOM_PATH, dit_path=RANDOM_PATH),
)

# Same classes and layouts, sizes chosen for milliseconds on a CPU: six decoder layers (one per fused
# hidden state), every special token id of Qwen2.5-VL moved to the top of a 512-entry vocabulary.
_TINY_SPECIAL = {
    "bos_token_id": 500,
    "eos_token_id": 501,
    "vision_start_token_id": 502,
    "vision_end_token_id": 503,
    "vision_token_id": 504,
    "image_token_id": 505,
    "video_token_id": 506,
}
TINY = Architecture(
    name="tiny_random",
    vlm={
        **{k: v for k, v in QWEN2_5_VL_3B_INSTRUCT.items() if k != "vision_config"},
        **_TINY_SPECIAL,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2
        "vocab_size": 512,
        "torch_dtype": "float32",
        "vision_config": {
            **QWEN2_5_VL_3B_INSTRUCT["vision_config"],
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,  # the text hidden size
            "fullatt_block_indexes": [1],
        },
    },
    preprocessor=QWEN2_5_VL_PREPROCESSOR,
    transformer={
        **SD3_5_MEDIUM_TRANSFORMER,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "caption_projection_dim": 64,  # heads * head dim
        "joint_attention_dim": 64,
        "pooled_projection_dim": 64,
        "num_layers": 2,
        "dual_attention_layers": [0],
        "pos_embed_max_size": 64,  # 1024 px
    },
    vae={**SD3_VAE, "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8},
    scheduler=SD3_SCHEDULER,
    model=ModelConfig(
        name="tiny_random",
        vlm_path=RANDOM_PATH,
        dit_path=RANDOM_PATH,
        num_think_tokens=4,
        bridge=BridgeConfig(num_layers=1, num_heads=4, intermediate_size=64),
    ),
)

ARCHITECTURES = {"full": PUBLISHED, "tiny": TINY}


def _placed(module: M, device: str | torch.device) -> M:
    """Built under ``torch.device(device)``, and then moved there too: buffers made from numpy arrays (the
    DiT's sin-cos table, the noise schedule) start on the CPU whatever the default device."""
    return module if torch.device(device).type == "meta" else module.to(device)


def build_random_vlm(arch: Architecture, *, device: str | torch.device = "cpu") -> VLMParts:
    """Qwen2.5-VL with transformers' own random initialisation, in eval mode, fp32, and no tokenizer."""
    config = Qwen2_5_VLConfig.from_dict(copy.deepcopy(arch.vlm))
    with torch.device(device):
        model = _placed(Qwen2_5_VLForConditionalGeneration(config), device)
    p = arch.preprocessor
    vision = VisionSpec(
        patch_size=int(p["patch_size"]),
        merge_size=int(p["merge_size"]),
        temporal_patch_size=int(p["temporal_patch_size"]),
        image_mean=tuple(p["image_mean"]),
        image_std=tuple(p["image_std"]),
    )
    return VLMParts(model.eval(), None, vision, config.image_token_id)


def build_random_diffusion(
    arch: Architecture, *, device: str | torch.device = "cpu", stock: bool = False
) -> DiffusionParts:
    """DiT, VAE and scheduler from their configs, fp32. ``stock`` gives diffusers' own
    ``SD3Transformer2DModel`` (no reference latents, no masks) instead of ``DeepGenSD3Transformer``:
    the baseline that benchmarks compare with."""
    cls = SD3Transformer2DModel if stock else DeepGenSD3Transformer
    with torch.device(device):
        transformer = _placed(cls.from_config(copy.deepcopy(arch.transformer)), device)
        vae = _placed(AutoencoderKL.from_config(copy.deepcopy(arch.vae)), device)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(copy.deepcopy(arch.scheduler))
    return DiffusionParts(transformer, vae.eval(), scheduler)


def build_random_backbone(
    arch: Architecture, model_cfg: ModelConfig | None = None, *, device: str | torch.device = "cpu"
) -> DeepGenBackbone:
    """The whole backbone in fp32 on ``device`` (``"meta"`` builds shapes only), as a fresh run starts:
    random VLM and DiT, zero bridge heads. Which parts train is the stage's business, as always."""
    cfg = model_cfg or arch.model
    vlm = build_random_vlm(arch, device=device)
    diffusion = build_random_diffusion(arch, device=device)
    with torch.device(device):
        return _placed(DeepGenBackbone(vlm, diffusion, cfg), device)
