"""Run the tiny-world benchmark (held-out prompts) on a trained stage checkpoint.

    python evaluate.py --checkpoint outputs/sft/<run> --limit 16 --steps 20 --out eval_out

Wiring only: generation and scoring live in deepgen/eval/benchmark.py, loading in deepgen/inference.py.
Writes results.json, results.md and one grid per category to --out and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from deepgen.cli import DTYPES, add_checkpoint_arguments, positive_int
from deepgen.eval.benchmark import (
    CATEGORIES,
    EvalSettings,
    eval_files,
    evaluate_backbone,
    markdown_table,
    write_results,
)
from deepgen.inference import load_model
from deepgen.model.loading import ModelLayoutError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_checkpoint_arguments(p)
    p.add_argument(
        "--eval-dir", default="data/shards/tiny_world/eval", help="folder of <task>_<category>.jsonl"
    )
    p.add_argument("--out", help="output folder (default: <run folder>/benchmark/<checkpoint name>)")
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--limit", type=positive_int, help="prompts per category (first N; default all)")
    p.add_argument("--seed", type=int, default=0, help="sample i of a category uses seed + i")
    p.add_argument("--size", type=positive_int, default=64, help="fix-pixels target side (tiny world: 64)")
    p.add_argument("--batch", type=positive_int, default=8, help="prompts sampled together")
    p.add_argument("--categories", nargs="+", choices=list(CATEGORIES), default=list(CATEGORIES))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    eval_files(args.eval_dir, args.categories)  # fail before the slow model load
    loaded = load_model(args.checkpoint, device=args.device, dtype=DTYPES.get(args.dtype))
    out = (
        Path(args.out) if args.out else loaded.checkpoint.parent.parent / "benchmark" / loaded.checkpoint.stem
    )
    settings = EvalSettings(
        num_steps=args.steps,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        size=args.size,
        limit=args.limit,
        batch_size=args.batch,
        categories=args.categories,
    )
    start = time.perf_counter()
    results = evaluate_backbone(loaded.backbone, args.eval_dir, settings, out, progress=not args.no_progress)
    write_results(results, out, {"checkpoint": str(loaded.checkpoint)})
    print(markdown_table(results))
    print(f"Wrote results.json, results.md and grids to {out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ModelLayoutError, ValueError) as e:
        sys.exit(f"evaluate.py: error: {e}")
