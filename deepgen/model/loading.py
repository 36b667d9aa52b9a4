"""Load the VLM and the diffusion parts from local directories in the standard hub layouts.

Any directory in the Hugging Face layout loads, not only those this project writes: the chat
template may sit in ``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``, and
the vision settings come from ``preprocessor_config.json``. ``AutoProcessor`` is avoided on purpose:
without torchvision it fails on Qwen2.5-VL directories, and the project needs only the tokenizer
and the vision settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from deepgen.model.dit import DeepGenSD3Transformer
from deepgen.model.vlm import IMAGE_PAD, VisionSpec


def sd3_model_index() -> dict:
    """``model_index.json`` of an SD3 diffusers folder without text encoders (the VLM and bridge replace
    them): what the tiny zoo and exports write, so diffusers reads the folder as an SD3 pipeline."""
    import diffusers

    index: dict = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__}
    absent = ("feature_extractor", "image_encoder", "text_encoder", "text_encoder_2", "text_encoder_3")
    for part in (*absent, "tokenizer", "tokenizer_2", "tokenizer_3"):
        index[part] = [None, None]
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    index["transformer"] = ["diffusers", "SD3Transformer2DModel"]
    index["vae"] = ["diffusers", "AutoencoderKL"]
    return index


VLM_LAYOUT = "the Hugging Face Qwen2.5-VL layout (config.json, tokenizer files, preprocessor_config.json, *.safetensors)"
DIT_LAYOUT = "the diffusers SD3 layout (transformer/, vae/, scheduler/)"


class ModelLayoutError(FileNotFoundError):
    """A model directory is missing or lacks a file of its expected layout."""


def _require(path: Path, relative: str, layout: str) -> Path:
    if not path.is_dir():
        raise ModelLayoutError(f"Model directory {path} does not exist: expected {layout}")
    target = path / relative
    if not target.exists():
        raise ModelLayoutError(f"Model directory {path} has no {relative}: expected {layout}")
    return target


@dataclass
class VLMParts:
    model: Qwen2_5_VLForConditionalGeneration
    tokenizer: object
    vision: VisionSpec
    image_token_id: int


@dataclass
class DiffusionParts:
    transformer: DeepGenSD3Transformer
    vae: AutoencoderKL
    scheduler: FlowMatchEulerDiscreteScheduler


def read_vision_spec(vlm_dir: Path) -> VisionSpec:
    cfg = json.loads(_require(vlm_dir, "preprocessor_config.json", VLM_LAYOUT).read_text())
    try:
        return VisionSpec(
            patch_size=int(cfg["patch_size"]),
            merge_size=int(cfg["merge_size"]),
            temporal_patch_size=int(cfg["temporal_patch_size"]),
            image_mean=tuple(cfg["image_mean"]),
            image_std=tuple(cfg["image_std"]),
        )
    except KeyError as missing:
        raise ModelLayoutError(f"{vlm_dir / 'preprocessor_config.json'} lacks the key {missing}") from None


def load_tokenizer(vlm_dir: Path):
    """The tokenizer, with the chat template attached wherever the directory keeps it."""
    _require(vlm_dir, "tokenizer_config.json", VLM_LAYOUT)
    if not (vlm_dir / "tokenizer.json").exists() and not (vlm_dir / "vocab.json").exists():
        raise ModelLayoutError(
            f"Model directory {vlm_dir} has no tokenizer.json or vocab.json: expected {VLM_LAYOUT}"
        )
    tokenizer = AutoTokenizer.from_pretrained(vlm_dir)
    if not getattr(tokenizer, "chat_template", None):
        if (vlm_dir / "chat_template.jinja").exists():
            tokenizer.chat_template = (vlm_dir / "chat_template.jinja").read_text()
        elif (vlm_dir / "chat_template.json").exists():
            tokenizer.chat_template = json.loads((vlm_dir / "chat_template.json").read_text())[
                "chat_template"
            ]
    if tokenizer.pad_token_id is None:
        raise ModelLayoutError(
            f"The tokenizer in {vlm_dir} defines no pad token (Qwen2.5-VL uses <|endoftext|>)"
        )
    return tokenizer


def load_vlm(
    vlm_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> VLMParts:
    """Load Qwen2.5-VL weights, tokenizer and vision settings; ``device="meta"`` builds without weights."""
    vlm_dir = Path(vlm_dir)
    config = Qwen2_5_VLConfig.from_pretrained(_require(vlm_dir, "config.json", VLM_LAYOUT).parent)
    vision = read_vision_spec(vlm_dir)
    if str(device) == "meta":
        # Architecture only: a config-only directory (no tokenizer) is enough.
        has_tokenizer = (vlm_dir / "tokenizer_config.json").exists()
        tokenizer = load_tokenizer(vlm_dir) if has_tokenizer else None
        return VLMParts(build_vlm_on_meta(config), tokenizer, vision, config.image_token_id)
    tokenizer = load_tokenizer(vlm_dir)
    if not any(vlm_dir.glob("*.safetensors")) and not any(vlm_dir.glob("*.bin")):
        raise ModelLayoutError(
            f"Model directory {vlm_dir} has no weights (*.safetensors): expected {VLM_LAYOUT}"
        )
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(vlm_dir, dtype=dtype).to(device)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    if image_token_id != config.image_token_id:
        raise ModelLayoutError(
            f"{vlm_dir}: tokenizer id of {IMAGE_PAD} is {image_token_id} but config.json says image_token_id="
            f"{config.image_token_id}; the tokenizer and the model do not belong together"
        )
    return VLMParts(model.eval(), tokenizer, vision, image_token_id)


def load_diffusion(
    dit_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DiffusionParts:
    """Load the DiT (with reference-image support), VAE and scheduler; ``device="meta"`` builds without weights."""
    dit_dir = Path(dit_dir)
    for part in ("transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        _require(dit_dir, part, DIT_LAYOUT)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(dit_dir, subfolder="scheduler")
    if str(device) == "meta":
        with torch.device("meta"):
            transformer = DeepGenSD3Transformer.from_config(
                DeepGenSD3Transformer.load_config(dit_dir / "transformer")
            )
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(dit_dir / "vae"))
    else:
        transformer = DeepGenSD3Transformer.from_pretrained(
            dit_dir, subfolder="transformer", torch_dtype=dtype
        ).to(device)
        vae = load_vae(dit_dir, device=device, dtype=dtype)
    return DiffusionParts(transformer, vae.eval(), scheduler)


def load_vae(
    dit_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """The VAE of an SD3 folder alone (``vae/``), in eval mode: what caching latents needs, without the DiT."""
    dit_dir = Path(dit_dir)
    if not (dit_dir / "vae" / "config.json").is_file():
        raise ModelLayoutError(f"Model directory {dit_dir} has no vae/config.json: expected {DIT_LAYOUT}")
    return AutoencoderKL.from_pretrained(dit_dir, subfolder="vae", torch_dtype=dtype).to(device).eval()


def build_vlm_on_meta(config: Qwen2_5_VLConfig) -> Qwen2_5_VLForConditionalGeneration:
    """The architecture without memory: for parameter counts and sharding plans of full-size models."""
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(config)
