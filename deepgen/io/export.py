"""Export a loaded model to standard folders that ``from_pretrained`` reads, and read such a folder back.

    <out>/
      deepgen_export.json       format name and version, the source checkpoint, dtype, library versions
      model_index.json          with transformer/, vae/, scheduler/: a diffusers SD3 folder
      transformer/              SD3Transformer2DModel (stock class name and weight names)
      vae/  scheduler/          AutoencoderKL, FlowMatchEulerDiscreteScheduler
      vlm/                      Qwen2_5_VLForConditionalGeneration with LoRA merged, tokenizer and
                                preprocessor files copied from the source VLM directory
      bridge/model.safetensors  think_tokens and bridge.* (the backbone's names)
      bridge/config.json        sizes needed to rebuild the bridge, fusion layer indices

The folder is itself the ``dit_path`` and ``vlm/`` the ``vlm_path`` of a :class:`ModelConfig`, so loading
it back runs the project's ordinary loaders; no training run or config.yaml is needed. LoRA is merged
because a standalone VLM folder should load without peft and without knowing the adapter rank.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from deepgen.config import BridgeConfig, ModelConfig
from deepgen.model.backbone import DeepGenBackbone
from deepgen.model.loading import sd3_model_index

EXPORT_MANIFEST = "deepgen_export.json"
EXPORT_FORMAT = "deepgen-export"
EXPORT_FORMAT_VERSION = 1
BRIDGE_WEIGHTS = "bridge/model.safetensors"
BRIDGE_CONFIG = "bridge/config.json"
EXPORT_LAYOUT = f"an exported folder ({EXPORT_MANIFEST}, vlm/, transformer/, vae/, scheduler/, bridge/) written by export.py"
# Weight files of the source VLM directory are not copied: the merged weights replace them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


@dataclass
class ExportSummary:
    path: Path
    merged_lora_layers: int
    part_bytes: dict[str, int]
    """Bytes on disk per part folder (vlm, transformer, vae, scheduler, bridge)."""


def merged_vlm_state_dict(vlm: nn.Module) -> tuple[dict[str, Tensor], int]:
    """The VLM's state dict with every peft LoRA layer folded into its base weight, under the plain names.

    Works on the state dict, not the modules, so the loaded model keeps its adapters and is not copied
    (a 3B VLM twice in memory). peft's ``get_delta_weight`` supplies ``scale * B @ A`` per adapter; the sum
    is taken in fp32 and cast back to the base weight's dtype. Returns the state and the merged layer count.
    """
    state = dict(vlm.state_dict())
    merged = 0
    for name, module in vlm.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        weight = base.weight.detach().float()
        for adapter in module.active_adapters:
            weight = weight + module.get_delta_weight(adapter).float()
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        state[f"{name}.weight"] = weight.to(base.weight.dtype)
        if getattr(base, "bias", None) is not None:
            state[f"{name}.bias"] = base.bias.detach()
        merged += 1
    leftover = [k for k in state if "lora_" in k or ".base_layer." in k]
    if leftover:
        raise RuntimeError(f"LoRA weights left after merging, e.g. {leftover[0]}: unsupported adapter type")
    return state, merged


def _copy_vlm_side_files(source: Path, target: Path) -> None:
    """Tokenizer, chat template, preprocessor and licence files travel with the weights."""
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.startswith(".") and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, target / path.name)


def _save_diffusion(backbone: DeepGenBackbone, out: Path) -> None:
    backbone.dit.save_pretrained(out / "transformer")
    # Our subclass only adds reference latents to the forward pass (same config, same weight names), so
    # the folder names the stock class: diffusers pipelines and tools then load it without our code.
    config_path = out / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "SD3Transformer2DModel"
    config.pop("_name_or_path", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    backbone.vae.save_pretrained(out / "vae")
    backbone.scheduler.save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(sd3_model_index(), indent=2) + "\n")


def is_bridge_weight(name: str) -> bool:
    """``think_tokens`` and ``bridge.*``: the weights that exist in no pretrained model directory."""
    return name == "think_tokens" or name.startswith("bridge.")


def _save_bridge(backbone: DeepGenBackbone, model_cfg: ModelConfig, out: Path) -> None:
    (out / "bridge").mkdir()
    weights = {
        k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items() if is_bridge_weight(k)
    }
    save_file(weights, out / BRIDGE_WEIGHTS, metadata={"format": "pt"})
    dit_cfg = backbone.dit.config
    config = {
        "num_think_tokens": model_cfg.num_think_tokens,
        "max_prompt_tokens": model_cfg.max_prompt_tokens,
        "bridge": dataclasses.asdict(model_cfg.bridge),
        # Derived sizes, written so the folder describes itself to readers without this project.
        "vlm_hidden_size": backbone.think_tokens.shape[1],
        "fusion_layers": list(backbone.fusion_layers),
        "joint_attention_dim": dit_cfg.joint_attention_dim,
        "pooled_projection_dim": dit_cfg.pooled_projection_dim,
    }
    (out / BRIDGE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_export_target(out: Path) -> None:
    """An export never overwrites: a folder that exists may be another export or a user's files."""
    if out.exists():
        raise FileExistsError(f"Export folder {out} already exists: choose another --out or remove it")


def export_model(
    backbone: DeepGenBackbone,
    model_cfg: ModelConfig,
    out_dir: str | Path,
    *,
    source: str,
    log: Callable[[str], None] = lambda message: None,
) -> ExportSummary:
    """Write ``backbone`` to ``out_dir`` in the layout of the module docstring; weights keep their dtype.

    ``model_cfg.vlm_path`` must be the directory the VLM was loaded from (its tokenizer files are copied).
    The folder is written under ``<out_dir>.tmp`` and renamed at the end, so a crash never leaves a
    half-written export under the final name; an existing ``out_dir`` is never overwritten.
    """
    out = Path(out_dir)
    check_export_target(out)
    vlm_source = Path(model_cfg.vlm_path)
    if not vlm_source.is_dir():
        raise FileNotFoundError(f"VLM directory {vlm_source} does not exist: its tokenizer files are needed")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        log("vlm/: merging LoRA and writing the VLM")
        vlm_state, merged = merged_vlm_state_dict(backbone.vlm)
        (tmp / "vlm").mkdir()
        _copy_vlm_side_files(vlm_source, tmp / "vlm")
        backbone.vlm.save_pretrained(tmp / "vlm", state_dict=vlm_state)
        del vlm_state
        log("transformer/, vae/, scheduler/: writing the diffusion parts")
        _save_diffusion(backbone, tmp)
        log("bridge/: writing the think tokens and the bridge")
        _save_bridge(backbone, model_cfg, tmp)
        manifest = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_FORMAT_VERSION,
            "source": source,
            "model_name": model_cfg.name,
            "dtype": str(backbone.think_tokens.dtype).removeprefix("torch."),
            "merged_lora_layers": merged,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "diffusers": diffusers.__version__,
            },
        }
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out)
    parts = ("vlm", "transformer", "vae", "scheduler", "bridge")
    return ExportSummary(out, merged, {part: _folder_bytes(out / part) for part in parts})


# ------------------------------------------------------------------------------------- reading back
def is_export(path: Path) -> bool:
    return path.is_dir() and (path / EXPORT_MANIFEST).is_file()


def read_export_config(path: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of an exported folder: its own ``vlm/`` and diffusion folders, its bridge sizes."""
    path = Path(path)
    manifest = json.loads((path / EXPORT_MANIFEST).read_text())
    if manifest.get("format") != EXPORT_FORMAT:
        raise ValueError(
            f"{path / EXPORT_MANIFEST} is not a deepgen export (format {manifest.get('format')!r})"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > EXPORT_FORMAT_VERSION:
        raise ValueError(
            f"{path} has export format version {version}; this deepgen reads up to {EXPORT_FORMAT_VERSION}: update it"
        )
    config_path = path / BRIDGE_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"Exported folder {path} has no {BRIDGE_CONFIG}: expected {EXPORT_LAYOUT}")
    config = json.loads(config_path.read_text())
    try:
        return ModelConfig(
            name=str(manifest.get("model_name", path.name)),
            vlm_path=str(path / "vlm"),
            dit_path=str(path),
            num_think_tokens=int(config["num_think_tokens"]),
            max_prompt_tokens=int(config["max_prompt_tokens"]),
            bridge=BridgeConfig(**config["bridge"]),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"{config_path} is not a valid bridge config: {e}") from None


def load_export_bridge(path: str | Path, backbone: DeepGenBackbone) -> dict[str, Tensor]:
    """The think tokens and bridge weights of an exported folder, checked against ``backbone``'s names."""
    path = Path(path)
    weights_path = path / BRIDGE_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"Exported folder {path} has no {BRIDGE_WEIGHTS}: expected {EXPORT_LAYOUT}")
    config = json.loads((path / BRIDGE_CONFIG).read_text())
    if list(config.get("fusion_layers", [])) != list(backbone.fusion_layers):
        raise ValueError(
            f"{path / BRIDGE_CONFIG} says fusion_layers {config.get('fusion_layers')} but its VLM gives "
            f"{list(backbone.fusion_layers)}: vlm/ and bridge/ come from different models"
        )
    weights = load_file(weights_path)
    missing = sorted(k for k in backbone.state_dict() if is_bridge_weight(k) and k not in weights)
    if missing:
        raise ValueError(f"{weights_path} lacks {len(missing)} bridge weights, e.g. {missing[0]}")
    return weights
