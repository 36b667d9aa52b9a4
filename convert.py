"""Convert a dataset to webdataset shards: `python convert.py --layout folder --input DIR --out DIR`.

`python convert.py latents --shards DIR --vae SD3_DIR --image-size 512` adds cached VAE latents to
existing shards (deepgen.data.latents; train with data.vae_latents=true); `--vae` on a conversion does
the same for its output.

Wiring only: parse the flags into ConvertOptions, run deepgen.data.convert.convert, print the report.
Layouts, options, resume and skip reporting are described in data/CONVERTING.md.
"""

from __future__ import annotations

import argparse
import sys

from deepgen.data.convert import LAYOUTS, ConvertError, ConvertOptions, convert

DEFAULTS = ConvertOptions(layout="", input="", out="")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Convert an image-caption or image-edit dataset to webdataset shards (data/CONVERTING.md)."
    )
    p.add_argument("--layout", required=True, choices=LAYOUTS, help="input layout")
    p.add_argument(
        "--input", required=True, help="input file, or a folder of such files (folder layout: images)"
    )
    p.add_argument("--out", required=True, help="output folder for <task>-NNNNNN.tar and manifest.json")
    p.add_argument("--task", choices=("t2i", "edit"), help="jsonl/parquet only (default t2i)")
    p.add_argument("--image-root", help="folder that relative image paths start from (default: the input's)")
    p.add_argument(
        "--caption-root", help="caption_json: folder of the annotation files (default: image root)"
    )
    p.add_argument("--cap-source", default=DEFAULTS.cap_source, help="caption key in annotation/.json files")
    p.add_argument("--image-column", default=DEFAULTS.image_column, help="jsonl/parquet t2i image column")
    p.add_argument(
        "--caption-column", default=DEFAULTS.caption_column, help="jsonl/parquet t2i caption column"
    )
    p.add_argument(
        "--source-column", default=DEFAULTS.source_column, help="jsonl/parquet edit sources column"
    )
    p.add_argument("--target-column", default=DEFAULTS.target_column, help="jsonl/parquet edit target column")
    p.add_argument(
        "--instruction-column",
        default=DEFAULTS.instruction_column,
        help="jsonl/parquet edit instruction column",
    )
    p.add_argument(
        "--min-side",
        type=int,
        help="skip images with a side <= this (default: 80 for caption_json, else 0 = off)",
    )
    p.add_argument(
        "--max-aspect",
        type=float,
        help="skip images with an aspect ratio >= this (default: 10 for caption_json, else 0 = off)",
    )
    p.add_argument("--samples-per-shard", type=int, default=DEFAULTS.samples_per_shard)
    p.add_argument("--prefix", help="sample key prefix (default: the task)")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--vae", help="then cache this VAE's latents in the shards: an SD3 folder (vae/), as model.dit_path"
    )
    add_latent_options(p)
    return p.parse_args(argv)


def add_latent_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image-size", type=int, default=512, help="with --vae: data.image_size of the training runs"
    )
    p.add_argument(
        "--size-unit", type=int, default=32, help="with --vae: data.size_unit of the training runs"
    )
    p.add_argument("--latent-batch-size", type=int, default=16, help="with --vae: images per VAE forward")
    p.add_argument("--device", help="with --vae: where the VAE runs (default: cuda if available, else cpu)")


def parse_latents_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="convert.py latents",
        description="Cache VAE latents in existing shards, for training with data.vae_latents=true.",
    )
    p.add_argument(
        "--shards", required=True, help="folder of t2i-*.tar / edit-*.tar shards (data.shards_dir)"
    )
    p.add_argument("--vae", required=True, help="SD3 folder in the diffusers layout (vae/): model.dit_path")
    add_latent_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def cache_latents(args: argparse.Namespace, shards: str) -> int:
    """Add the VAE latents of `args.vae` to the shards in `shards`; print the report."""
    import torch

    from deepgen.data.latents import add_vae_latents
    from deepgen.model.loading import load_vae

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        vae = load_vae(args.vae, device=device)
        report = add_vae_latents(
            shards,
            vae,
            image_size=args.image_size,
            size_unit=args.size_unit,
            batch_size=args.latent_batch_size,
            vae_dir=str(args.vae),
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as exn:  # a missing folder or file, a wrong layout, a bad option
        print(f"convert.py: error: {exn}", file=sys.stderr)
        return 2
    print(
        f"VAE latents (VAE {report['vae']}, image_size {report['image_size']}, size_unit {report['size_unit']}): "
        f"{report['written']} of {report['shards']} shards written now, the rest already cached -> {shards}"
    )
    print(f"train with: data.vae_latents=true data.image_size={report['image_size']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["latents"]:
        args = parse_latents_args(argv[1:])
        return cache_latents(args, args.shards)
    args = parse_args(argv)
    opts = ConvertOptions(
        layout=args.layout,
        input=args.input,
        out=args.out,
        task=args.task,
        image_root=args.image_root,
        caption_root=args.caption_root,
        cap_source=args.cap_source,
        image_column=args.image_column,
        caption_column=args.caption_column,
        source_column=args.source_column,
        target_column=args.target_column,
        instruction_column=args.instruction_column,
        min_side=args.min_side,
        max_aspect=args.max_aspect,
        samples_per_shard=args.samples_per_shard,
        prefix=args.prefix,
    )
    try:
        report = convert(opts, workers=args.workers, progress=not args.no_progress)
    except ConvertError as exn:
        print(f"convert.py: error: {exn}", file=sys.stderr)
        return 2
    print(
        f"{report['task']}: {report['samples']} samples from {report['rows']} rows in {report['shards']} shards "
        f"({report['written']} written now, {report['shards'] - report['written']} already done) -> {args.out}"
    )
    skipped = report["skipped"]
    if skipped:
        print(f"skipped {sum(skipped.values())}: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
        for reason, examples in report["skip_examples"].items():
            for example in examples:
                print(f"  {reason}: {example}")
    print(f"report: {args.out}/manifest.json (conversions.{report['task']})")
    return cache_latents(args, args.out) if args.vae else 0


if __name__ == "__main__":
    sys.exit(main())
