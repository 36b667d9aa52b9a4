"""Command-line pieces shared by generate.py and evaluate.py."""

from __future__ import annotations

import argparse

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --device and --dtype: where the model comes from and where it runs."""
    parser.add_argument(
        "--checkpoint", required=True, help="a step_NNNNNN.ckpt directory, or a run folder (newest)"
    )
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
