"""Export a model to standard folders: transformers VLM (LoRA merged), diffusers SD3 parts, bridge safetensors.

    python export.py --checkpoint outputs/sft/<run> --out exports/sft
    python export.py --checkpoint DeepGen-1.0.pt --vlm-path Qwen2.5-VL-3B-Instruct \\
        --dit-path stable-diffusion-3.5-medium --out exports/deepgen-1.0 --dtype bfloat16

Wiring only: the folder layout and its reading back live in deepgen/io/export.py. The export loads back
with ``from_pretrained`` part by part, and as a whole with ``generate.py --checkpoint <out>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from deepgen.cli import add_checkpoint_arguments, load_model_from_args
from deepgen.io.export import check_export_target, export_model
from deepgen.model.loading import ModelLayoutError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_checkpoint_arguments(p)
    p.add_argument("--out", required=True, help="folder to create (must not exist)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_export_target(Path(args.out))  # fail before the slow model load
    start = time.perf_counter()
    loaded = load_model_from_args(args)
    print(loaded.summary())
    summary = export_model(
        loaded.backbone, loaded.model_cfg, args.out, source=str(loaded.checkpoint.resolve()), log=print
    )
    print(f"Exported {loaded.checkpoint} to {summary.path} in {time.perf_counter() - start:.0f} s:")
    for part, size in summary.part_bytes.items():
        note = f" ({summary.merged_lora_layers} LoRA layers merged)" if part == "vlm" else ""
        print(f"  {part + '/':<13} {size / 2**20:10.1f} MiB{note}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, FileExistsError, ModelLayoutError, ValueError) as e:
        sys.exit(f"export.py: error: {e}")
