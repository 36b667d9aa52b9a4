"""Inference: load a model from any source, generate and edit images, save PNGs.

Three kinds of source, told apart by what the path holds:

- a stage checkpoint (or its run folder): it holds only the weights that stage trained (plus those it
  carried from ``init_from``), so the model is rebuilt from the run's ``config.yaml`` (model directories,
  think tokens, bridge sizes, LoRA rank) and the checkpoint is copied over it;
- an exported folder (``deepgen/io/export.py``): standard VLM and diffusers folders plus the bridge;
- released DeepGen-1.0 weights (``deepgen/io/import_deepgen.py``): they hold the bridge and the DiT only,
  so the Qwen2.5-VL and SD3.5 directories must be named, and the bridge sizes are the original's unless a
  model config says otherwise.

Sampling follows the original's defaults: 50 Euler steps, CFG 4.0; editing CFG is text-only (the negative
branch sees the same reference images with the negative text). No Hydra or Lightning here, so the library
can be used from notebooks and services.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from deepgen.config import LoraConfig, ModelConfig
from deepgen.data.resolution import fix_pixels_size
from deepgen.io.checkpoints import WEIGHTS, copy_weights, load_checkpoint_dir
from deepgen.io.export import is_export, load_export_bridge, read_export_config
from deepgen.io.import_deepgen import DS_MODEL_STATES, ImportReport, import_deepgen_state, read_released_state
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
RELEASED_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
SOURCES = (
    f"a stage checkpoint ({CHECKPOINT_LAYOUT}) or its run folder, an exported folder (deepgen_export.json "
    "inside, from export.py), or released DeepGen-1.0 weights (a .pt/.pth/.safetensors state dict, a DeepSpeed "
    "or diffusers-format folder) with --vlm-path and --dit-path"
)


@dataclass
class LoadedModel:
    backbone: DeepGenBackbone
    model_cfg: ModelConfig
    checkpoint: Path
    """The source: a step_NNNNNN.ckpt directory, an exported folder or a released weights file/folder."""
    num_loaded: int
    """Backbone tensors copied from the source (the rest come from the pretrained directories)."""
    num_ignored: int
    """grpo's frozen reference DiT (``reference_dit.*``): training-only, not needed to sample."""
    kind: str = "checkpoint"
    """checkpoint, export or released."""
    import_report: ImportReport | None = None
    """For released weights: which of the file's keys matched, which of ours were missing."""

    def summary(self) -> str:
        """What came from where, for the entry points to print (with the import report for released weights)."""
        total = len(dict(self.backbone.named_parameters()))
        ignored = f" ({self.num_ignored} reference_dit weights ignored)" if self.num_ignored else ""
        text = (
            f"Loaded {self.num_loaded} weights from {self.checkpoint}{ignored}; the other "
            f"{total - self.num_loaded} from the model directories ({self.model_cfg.vlm_path}, "
            f"{self.model_cfg.dit_path}) on {self.backbone.device}"
        )
        return text if self.import_report is None else f"{text}\n{self.import_report.summary()}"


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


def _to_dataclass(schema: type, node: object, path: Path, what: str):
    """Validate ``node`` against a config dataclass; omegaconf's multi-line errors become one line."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except Exception as e:
        raise ValueError(f"{path} does not hold a valid {what}: {str(e).splitlines()[0]}") from None


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
    model_cfg: ModelConfig = _to_dataclass(ModelConfig, raw.model, path, "model config")
    lora_raw = OmegaConf.select(raw, "stage.lora")
    lora = None if lora_raw is None else _to_dataclass(LoraConfig, lora_raw, path, "LoRA config")
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


def released_model_config(
    source: Path, vlm_path: str | None, dit_path: str | None, model_config: str | Path | None
) -> ModelConfig:
    """The model to import released weights into: the original DeepGen-1.0 sizes (ModelConfig's defaults),
    or those of ``model_config`` (a model YAML such as ``conf/model/tiny.yaml``, or a run's config.yaml),
    with the model directories given as arguments taking precedence."""
    node: DictConfig = OmegaConf.create({})
    if model_config is not None:
        path = Path(model_config)
        if not path.is_file():
            raise FileNotFoundError(
                f"Model config {path} does not exist: expected a YAML like conf/model/tiny.yaml"
            )
        node = OmegaConf.load(path)
        node = node.model if "model" in node else node
    node = OmegaConf.merge(node, {k: v for k, v in (("vlm_path", vlm_path), ("dit_path", dit_path)) if v})
    if any(k not in node or OmegaConf.is_missing(node, k) for k in ("vlm_path", "dit_path")):
        raise ValueError(
            f"Released weights {source} hold the bridge and the DiT only: name the model directories with "
            "--vlm-path (Qwen2.5-VL) and --dit-path (SD3.5, diffusers layout)"
        )
    if "name" not in node or OmegaConf.is_missing(node, "name"):
        node.name = source.stem
    return _to_dataclass(ModelConfig, node, Path(model_config or source), "model config")


def _is_stage_checkpoint(path: Path) -> bool:
    return (path / WEIGHTS).is_file() or any((path / "checkpoints").glob("step_*.ckpt"))


def _is_released_folder(path: Path) -> bool:
    """The folder layouts ``read_released_state`` knows (diffusers, DeepSpeed, HF Trainer)."""
    markers = ("model_index.json", "connector/model.safetensors", "latest", DS_MODEL_STATES)
    markers += ("model.safetensors", "model.safetensors.index.json")
    return any((path / m).is_file() for m in markers) or any(path.glob(f"*/{DS_MODEL_STATES}"))


def source_kind(path: Path) -> str:
    """checkpoint, export or released, from what ``path`` holds; an error naming the three otherwise."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: expected {SOURCES}")
    if path.is_file():
        if path.suffix in RELEASED_SUFFIXES:
            return "released"
        raise ValueError(
            f"{path} is a file but not a state dict ({', '.join(RELEASED_SUFFIXES)}): expected {SOURCES}"
        )
    if is_export(path):
        return "export"
    if _is_stage_checkpoint(path):
        return "checkpoint"
    if _is_released_folder(path):
        return "released"
    if (path / "config.yaml").is_file():
        raise FileNotFoundError(f"Run folder {path} has no checkpoints yet (checkpoints/step_*.ckpt)")
    raise FileNotFoundError(f"{path} holds no model deepgen can load: expected {SOURCES}")


def load_model(
    source: str | Path,
    *,
    vlm_path: str | None = None,
    dit_path: str | None = None,
    model_config: str | Path | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load a model for sampling (eval mode, no gradients) from a stage checkpoint or run folder, an
    exported folder, or released DeepGen-1.0 weights; see the module docstring.

    ``vlm_path``/``dit_path`` are required for released weights, replace a run config's model directories
    for a stage checkpoint, and are refused for an exported folder (it carries its own). ``model_config``
    (a model YAML) sets the bridge sizes of released weights only.
    """
    path = Path(source)
    kind = source_kind(path)
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    if kind != "released" and model_config is not None:
        raise ValueError(
            f"--model-config applies to released weights only; {path} carries its own model settings"
        )
    if kind == "export":
        if vlm_path is not None or dit_path is not None:
            raise ValueError(
                f"Exported folder {path} carries its own vlm/ and transformer/: drop --vlm-path/--dit-path"
            )
        loaded = _load_export(path, device, dtype)
    elif kind == "checkpoint":
        loaded = _load_stage_checkpoint(path, vlm_path, dit_path, device, dtype)
    else:
        loaded = _load_released(
            path, released_model_config(path, vlm_path, dit_path, model_config), device, dtype
        )
    # LoRA adapters are created in fp32 and files may hold another dtype; one cast gives the requested one.
    loaded.backbone.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return loaded


def _load_stage_checkpoint(
    path: Path, vlm_path: str | None, dit_path: str | None, device: str, dtype: torch.dtype
) -> LoadedModel:
    """Rebuild the run's backbone and copy the checkpoint into it.

    LoRA is attached with the run's rank before loading, as the stage did, so the adapter names
    and shapes match; any weight the model lacks or whose shape differs is an error, never skipped.
    """
    ckpt = resolve_checkpoint(path)
    model_cfg, lora, _ = read_run_config(ckpt)
    model_cfg.vlm_path = vlm_path or model_cfg.vlm_path
    model_cfg.dit_path = dit_path or model_cfg.dit_path
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
    return LoadedModel(backbone, model_cfg, ckpt, len(ours), num_ignored)


def _load_export(path: Path, device: str, dtype: torch.dtype) -> LoadedModel:
    """The exported VLM (LoRA merged) and diffusion folders load as any model directory; the bridge is copied."""
    model_cfg = read_export_config(path)
    backbone = DeepGenBackbone.from_pretrained_dirs(model_cfg, device=device, dtype=dtype)
    weights = load_export_bridge(path, backbone)
    hint = f"bridge/config.json does not describe bridge/model.safetensors in {path}"
    copy_weights(weights, dict(backbone.named_parameters()), f"Exported folder {path}", hint)
    return LoadedModel(backbone, model_cfg, path, len(weights), 0, kind="export")


def _load_released(path: Path, model_cfg: ModelConfig, device: str, dtype: torch.dtype) -> LoadedModel:
    """Import released weights (original naming) into a backbone built from the named model directories."""
    state = read_released_state(path)
    backbone = DeepGenBackbone.from_pretrained_dirs(model_cfg, device=device, dtype=dtype)
    try:
        report = import_deepgen_state(state, backbone)
    except ValueError as e:  # a shape mismatch lists every key, one a line
        first, *rest = str(e).splitlines()
        if not rest:
            raise ValueError(f"Released weights {path}: {first}") from None
        more = f" (+{len(rest) - 1} more)" if len(rest) > 1 else ""
        raise ValueError(
            f"Released weights {path} do not fit the model: {rest[0].strip()}{more}; the bridge sizes come "
            "from --model-config (default: the original DeepGen-1.0 sizes)"
        ) from None
    lacking = [k for k in report.missing if k == "think_tokens" or k.startswith("bridge.")]
    if lacking:
        raise ValueError(
            f"{path} lacks {len(lacking)} think-token/bridge weights (e.g. {lacking[0]}; it matched "
            f"{len(report.matched)} keys): not DeepGen weights, or the DiT alone"
        )
    own = dict(backbone.named_parameters())
    num_loaded = sum(1 for k in report.matched if k in own)
    return LoadedModel(backbone, model_cfg, path, num_loaded, 0, kind="released", import_report=report)


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
