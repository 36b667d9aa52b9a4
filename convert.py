"""Convert a dataset to webdataset shards: `python convert.py --layout folder --input DIR --out DIR`.

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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
