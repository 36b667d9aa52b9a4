"""Command-line pieces shared by generate.py, evaluate.py and export.py."""

from __future__ import annotations

import argparse

import torch

from deepgen.inference import LoadedModel, load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the model comes from (--checkpoint and, for released weights, the model directories) and
    where it runs (--device, --dtype); :func:`load_model_from_args` reads them."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a step_NNNNNN.ckpt directory or a run folder (newest), an exported folder (export.py), or "
        "released DeepGen-1.0 weights (.pt/.pth/.safetensors, DeepSpeed or diffusers folder; with --vlm-path, --dit-path)",
    )
    parser.add_argument(
        "--vlm-path",
        help="Qwen2.5-VL directory (HF layout): required for released weights; for a stage checkpoint it "
        "replaces the run config's model.vlm_path",
    )
    parser.add_argument(
        "--dit-path",
        help="SD3.5 directory (diffusers layout: transformer/, vae/, scheduler/): as --vlm-path",
    )
    parser.add_argument(
        "--model-config",
        help="released weights only: a model YAML with the think-token and bridge sizes (e.g. "
        "conf/model/tiny.yaml, or a run's config.yaml); default: the original DeepGen-1.0 sizes",
    )
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    """--compile for the sampling CLIs; :func:`load_model_from_args` applies it."""
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run each denoising step as one compiled graph, replayed as a CUDA graph on a GPU: faster "
        "when sampling many images; the first images wait for compilation (about a minute)",
    )


def load_model_from_args(args: argparse.Namespace) -> LoadedModel:
    """The model named by the arguments of :func:`add_checkpoint_arguments` (and --compile, if added)."""
    loaded = load_model(
        args.checkpoint,
        vlm_path=args.vlm_path,
        dit_path=args.dit_path,
        model_config=args.model_config,
        device=args.device,
        dtype=DTYPES.get(args.dtype),
    )
    if getattr(args, "compile", False):
        loaded.backbone.compile_sampling()
    return loaded
