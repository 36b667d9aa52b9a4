"""Inference from a stage checkpoint: load the model a run trained, generate and edit images, save PNGs.

A stage checkpoint holds only the weights that stage trained (plus those it carried from ``init_from``),
so the model is rebuilt from the run's ``config.yaml`` (model directories, think tokens, bridge sizes,
LoRA rank) and the checkpoint is copied over it. Sampling follows the original's defaults: 50 Euler
steps, CFG 4.0; editing CFG is text-only (the negative branch sees the same reference images with the
negative text). No Hydra or Lightning here, so the library can be used from notebooks and services.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from deepgen.config import LoraConfig, ModelConfig
from deepgen.data.resolution import fix_pixels_size
from deepgen.io.checkpoints import WEIGHTS, copy_weights, load_checkpoint_dir
from deepgen.model.backbone import Conditioning, DeepGenBackbone
from deepgen.model.lora import attach_vlm_lora
from deepgen.rl.prompts import read_prompt_records

# The negative prompt of the original's editing evaluation scripts (ImgEdit, GEdit, RISE, UniREditBench).
EDIT_NEGATIVE_PROMPT = (
    "blurry, low quality, low resolution, distorted, deformed, broken content, missing parts, "
    "damaged details, artifacts, glitch, noise, pixelated, grainy, compression artifacts, "
    "bad composition, wrong proportion, incomplete editing, unfinished, unedited areas."
)
SIZE_UNIT = 32
"""Image sides are multiples of this (VAE factor 8 x DiT patch 2 x VLM merge 2), as in training."""
CHECKPOINT_LAYOUT = (
    "outputs/<stage>/<run>/checkpoints/step_NNNNNN.ckpt with the run's config.yaml two levels up"
)


@dataclass
class LoadedModel:
    backbone: DeepGenBackbone
    model_cfg: ModelConfig
    checkpoint: Path
    num_loaded: int
    """Backbone tensors copied from the checkpoint (the rest come from the pretrained directories)."""
    num_ignored: int
    """grpo's frozen reference DiT (``reference_dit.*``): training-only, not needed to sample."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """bf16 on GPU (the original's inference dtype); fp32 on CPU, where bf16 is slow and less exact."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run folder (its newest ``checkpoints/step_*.ckpt``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {path} does not exist: expected {CHECKPOINT_LAYOUT}")
    steps = sorted((path / "checkpoints").glob("step_*.ckpt"))
    checkpoint = steps[-1] if steps else path
    if not (checkpoint / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{path} is neither a deepgen checkpoint ({WEIGHTS} inside) nor a run folder: expected {CHECKPOINT_LAYOUT}"
        )
    return checkpoint


def read_run_config(checkpoint: Path) -> tuple[ModelConfig, LoraConfig | None, Path]:
    """The model and LoRA settings of the run that wrote ``checkpoint``, and the run folder.

    Relative model paths are those of the training working directory, found from ``output_dir``
    (the run folder is ``<cwd>/<output_dir>/<stage>/<run>``), so inference works from anywhere.
    """
    run_dir = checkpoint.resolve().parent.parent
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"No config.yaml at {path}: expected {CHECKPOINT_LAYOUT}")
    raw = OmegaConf.load(path)
    if "model" not in raw:
        raise ValueError(f"{path} has no 'model' section: is it a deepgen run config?")
    try:
        model_cfg: ModelConfig = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(ModelConfig), raw.model)
        )
        lora_raw = OmegaConf.select(raw, "stage.lora")
        lora = (
            None
            if lora_raw is None
            else OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LoraConfig), lora_raw))
        )
    except Exception as e:  # omegaconf's validation errors span several lines
        raise ValueError(f"{path} does not hold a valid model config: {str(e).splitlines()[0]}") from None
    train_root = run_dir.parent.parent
    output_dir = Path(str(raw.get("output_dir", "outputs")))
    if not output_dir.is_absolute():
        for _ in output_dir.parts:
            train_root = train_root.parent
    for name in ("vlm_path", "dit_path"):
        value = Path(getattr(model_cfg, name))
        if not value.is_absolute() and not value.exists() and (train_root / value).exists():
            setattr(model_cfg, name, str(train_root / value))
    return model_cfg, lora, run_dir


def load_model(
    checkpoint: str | Path, *, device: str | None = None, dtype: torch.dtype | None = None
) -> LoadedModel:
    """Rebuild the backbone of a run and copy a stage checkpoint into it (eval mode, no gradients).

    LoRA is attached with the run's rank before loading, as the stage did, so the adapter names
    and shapes match; any weight the model lacks or whose shape differs is an error, never skipped.
    """
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    ckpt = resolve_checkpoint(checkpoint)
    model_cfg, lora, _ = read_run_config(ckpt)
    weights = load_checkpoint_dir(ckpt)["state_dict"]
    backbone = DeepGenBackbone.from_pretrained_dirs(model_cfg, device=device, dtype=dtype)
    if lora is not None:
        attach_vlm_lora(backbone.vlm, lora)
    own = dict(backbone.named_parameters())
    ours: dict[str, Tensor] = {}
    unknown, num_ignored = [], 0
    for key, value in weights.items():
        if key.startswith("reference_dit."):
            num_ignored += 1
        elif key.startswith("backbone.") and key.removeprefix("backbone.") in own:
            ours[key.removeprefix("backbone.")] = value
        else:
            unknown.append(key)
    if unknown:
        hint = " (LoRA weights, but the run config has no stage.lora)" if "lora_" in unknown[0] else ""
        raise ValueError(
            f"Checkpoint {ckpt} does not match its run config: {len(unknown)} weights the model does not "
            f"have, e.g. {unknown[0]}{hint}"
        )
    if not ours:
        raise ValueError(f"Checkpoint {ckpt} holds no backbone weights (keys must start with 'backbone.')")
    # The think tokens and the bridge exist only in stage checkpoints (the model directories lack them);
    # without them the model would run with a fresh random bridge.
    if "think_tokens" not in ours or not any(k.startswith("bridge.") for k in ours):
        raise ValueError(
            f"Checkpoint {ckpt} lacks the think tokens or the bridge, so it cannot be used alone "
            "(grpo checkpoints written before they carried their starting weights): use a newer one"
        )
    hint = "check model.bridge, num_think_tokens and stage.lora.rank in config.yaml"
    copy_weights(ours, own, f"Checkpoint {ckpt}", hint)
    # LoRA adapters are created in fp32; one cast keeps every weight in the requested dtype.
    backbone.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LoadedModel(backbone, model_cfg, ckpt, len(ours), num_ignored)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a ``.txt`` file (one a line) or ``.jsonl`` file (``prompt`` or ``caption`` field)."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"Prompt file {path} must be .txt (one prompt a line) or .jsonl (prompt/caption)")
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {path} does not exist")
    prompts = [r["prompt"] for r in read_prompt_records(str(path))]
    if not prompts:
        raise ValueError(f"Prompt file {path} holds no prompts")
    return prompts


def load_reference_image(path: str | Path, size: int, unit: int = SIZE_UNIT) -> Tensor:
    """An image file -> ``[3, H, W]`` in [-1, 1] at its fix-pixels size, as training reads sources."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Source image {path} does not exist")
    with Image.open(path) as img:
        return image_to_reference(img, size, unit)


def image_to_reference(image: Image.Image, size: int, unit: int = SIZE_UNIT) -> Tensor:
    """A PIL image -> ``[3, H, W]`` in [-1, 1] at its fix-pixels size."""
    rgb = image.convert("RGB")
    width, height = fix_pixels_size(*rgb.size, size, unit)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 127.5 - 1.0


def output_size(
    size: int,
    references: list[Tensor],
    width: int | None = None,
    height: int | None = None,
    unit: int = SIZE_UNIT,
) -> tuple[int, int]:
    """(width, height) to generate: the override if given, the source's size for a single-image edit
    (as the original demo), else a square of about ``size**2`` pixels."""
    if (width is None) != (height is None):
        raise ValueError("Give both width and height, or neither")
    if width is not None and height is not None:
        if width % unit or height % unit or width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive multiples of {unit}, got {width}x{height}")
        return width, height
    if len(references) == 1:
        return references[0].shape[2], references[0].shape[1]
    return fix_pixels_size(size, size, size, unit)


def default_negative_prompt(editing: bool) -> str:
    """The original's defaults: empty for text-to-image, a quality negative prompt for editing."""
    return EDIT_NEGATIVE_PROMPT if editing else ""


def _repeat(cond: Conditioning, n: int) -> Conditioning:
    mask = cond.mask.repeat(n, 1) if cond.mask is not None else None
    return Conditioning(cond.seq.repeat(n, 1, 1), cond.pooled.repeat(n, 1), mask)


@torch.no_grad()
def generate_images(
    backbone: DeepGenBackbone,
    prompt: str,
    *,
    negative_prompt: str = "",
    references: list[Tensor] | None = None,
    width: int = 512,
    height: int = 512,
    num_images: int = 1,
    num_steps: int = 50,
    cfg_scale: float = 4.0,
    seed: int = 0,
) -> Tensor:
    """``num_images`` samples ``[N, 3, height, width]`` in [-1, 1] for one prompt (an edit when
    ``references`` are given); the same arguments give the same images.

    The prompt is encoded once and repeated, so N images cost one VLM pass. Editing CFG is text-only:
    the negative branch gets the same references with the negative text (as the original).
    """
    bb = backbone
    generator = torch.Generator(device=bb.device).manual_seed(seed)
    refs = [r.to(bb.device) for r in references or []]
    dtype = next(bb.dit.parameters()).dtype
    # Weights may be bf16 while the sampler's latents are fp32: autocast reconciles them, as in training.
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(bb.device.type, dtype=dtype)
    with autocast:
        if refs:
            cond = bb.condition_edit([prompt], [refs])
            uncond = bb.condition_edit([negative_prompt], [refs])
            # Seeded VAE posterior samples, so the reference latents are part of the determinism too.
            latents = [bb.encode_images(r[None], generator)[0] for r in refs]
            ref_latents = [latents] * num_images
        else:
            cond, uncond = bb.condition_t2i([prompt]), bb.condition_t2i([negative_prompt])
            ref_latents = None
        return bb.sample(
            _repeat(cond, num_images),
            _repeat(uncond, num_images),
            height,
            width,
            ref_latents=ref_latents,
            num_steps=num_steps,
            cfg_scale=cfg_scale,
            generator=generator,
        ).float()


def png_info(settings: dict[str, object]) -> PngInfo:
    """PNG text chunks, one per setting, so an image says how it was made."""
    info = PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    return info


def image_stem(index: int, prompt: str, max_chars: int = 40) -> str:
    """``0003_a-red-circle``: the prompt's order first (files sort like the prompt list), then a readable slug."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_chars].rstrip("-")
    return f"{index:04d}_{slug or 'empty'}"
