"""Run the tiny-world benchmark (held-out prompts) on a stage checkpoint, an export or released weights,
or generate a benchmark of the original's evaluation in the layout its official scorer reads.

    python evaluate.py --checkpoint outputs/sft/<run> --limit 16 --steps 20 --out eval_out
    python evaluate.py --checkpoint <model> --suite geneval --prompts evaluation_metadata.jsonl --out geneval_out

Wiring only: the tiny world lives in deepgen/eval/benchmark.py, the benchmark suites in
deepgen/eval/suites.py, FID and CLIP score in deepgen/eval/metrics.py, loading in deepgen/inference.py.
The tiny world writes results.json, results.md and one grid per category to --out and prints the Markdown
table; a suite writes its images to --out (resuming: existing images are kept) and an eval_report.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from deepgen.cli import add_checkpoint_arguments, add_compile_argument, load_model_from_args, positive_int
from deepgen.eval.benchmark import (
    CATEGORIES,
    EvalSettings,
    eval_files,
    evaluate_backbone,
    markdown_table,
    write_results,
)
from deepgen.eval.metrics import (
    FID_WEIGHTS,
    check_clip_dir,
    check_fid_weights,
    clip_score,
    frechet_distance,
    image_files,
    load_fid_features,
    read_images,
)
from deepgen.eval.suites import (
    SUITES,
    SuiteSettings,
    generate_suite,
    job_images,
    plan_suite,
    score_cvtg,
    write_report,
)
from deepgen.inference import default_device
from deepgen.model.loading import ModelLayoutError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_checkpoint_arguments(p)
    add_compile_argument(p)
    p.add_argument(
        "--eval-dir", default="data/shards/tiny_world/eval", help="folder of <task>_<category>.jsonl"
    )
    p.add_argument(
        "--out",
        help="output folder (default: <run folder, or the export's/weights' folder>/benchmark/<name>; "
        "required with --suite: the folder the benchmark's official scorer reads)",
    )
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--cfg-scale", type=float, help="default 4.0 (the original's; dpg: 7.5)")
    p.add_argument("--limit", type=positive_int, help="prompts per category or suite (first N; default all)")
    p.add_argument(
        "--seed", type=int, help="image i uses seed + i (default: tiny world 0, suites 42 as the original)"
    )
    p.add_argument(
        "--size",
        type=positive_int,
        help="tiny world: fix-pixels target side (default 64); suites: square side (512)",
    )
    p.add_argument("--batch", type=positive_int, default=8, help="images sampled together")
    p.add_argument("--categories", nargs="+", choices=list(CATEGORIES), default=list(CATEGORIES))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    suite = p.add_argument_group("benchmark suites (deepgen/eval/suites.py)")
    suite.add_argument("--suite", choices=["tiny_world", *SUITES], default="tiny_world")
    suite.add_argument(
        "--prompts", help="the benchmark's prompt file or folder: " + "; ".join(SUITES.values())
    )
    suite.add_argument(
        "--source-root", help="imgedit: folder of the source images (default: the JSON's folder)"
    )
    suite.add_argument(
        "--negative-prompt", help='default: the original\'s ("" for T2I, the quality negative for edits)'
    )
    suite.add_argument("--fid-reference", help="folder of reference images: report FID against them")
    suite.add_argument("--fid-weights", help=f"FID feature extractor: {FID_WEIGHTS}")
    suite.add_argument(
        "--clip-weights", help="local CLIP directory: report the CLIP score of image and prompt"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.suite != "tiny_world":
        run_suite(args)
        return
    if args.prompts or args.fid_reference or args.fid_weights or args.clip_weights:
        raise ValueError("--prompts, --fid-reference, --fid-weights and --clip-weights need a --suite")
    args.cfg_scale = 4.0 if args.cfg_scale is None else args.cfg_scale
    args.seed = 0 if args.seed is None else args.seed
    args.size = 64 if args.size is None else args.size
    eval_files(args.eval_dir, args.categories)  # fail before the slow model load
    loaded = load_model_from_args(args)
    print(loaded.summary())
    source = loaded.checkpoint
    home = source.parent.parent if loaded.kind == "checkpoint" else source.parent
    out = Path(args.out) if args.out else home / "benchmark" / source.stem
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


def run_suite(args: argparse.Namespace) -> None:
    """Plan (fail fast on the inputs), load the model only if images are missing, generate, then score."""
    for flag, value in (("--prompts", args.prompts), ("--out", args.out)):
        if not value:
            raise ValueError(f"{flag} is required with --suite {args.suite} ({SUITES[args.suite]})")
    if bool(args.fid_reference) != bool(args.fid_weights):
        raise ValueError("--fid-reference and --fid-weights go together")
    settings = SuiteSettings(
        num_steps=args.steps,
        cfg_scale=args.cfg_scale,
        negative_prompt=args.negative_prompt,
        seed=42 if args.seed is None else args.seed,
        size=512 if args.size is None else args.size,
        batch_size=args.batch,
        limit=args.limit,
    )
    plan = plan_suite(args.suite, args.prompts, args.out, settings, args.source_root)
    # The metrics' inputs are checked now, not after hours of generation.
    reference = image_files(args.fid_reference) if args.fid_reference else None
    if args.fid_weights:
        check_fid_weights(args.fid_weights)
    if args.clip_weights:
        check_clip_dir(args.clip_weights)
    pending = plan.pending()
    print(f"{args.suite}: {len(plan.jobs)} images, {len(plan.jobs) - len(pending)} already in {plan.out}")
    backbone, info = None, {}
    if pending:
        loaded = load_model_from_args(args)
        print(loaded.summary())
        backbone, info = loaded.backbone, {"checkpoint": str(loaded.checkpoint)}
    start = time.perf_counter()
    written = generate_suite(backbone, plan, args.batch, progress=not args.no_progress, info=info)
    print(f"Wrote {len(written)} images to {plan.out} in {time.perf_counter() - start:.0f} s")
    report: dict = {"images": len(plan.jobs), "generated": len(written), **info}
    if args.suite == "cvtg":
        report["cvtg"] = score_cvtg(plan)
        overall = report["cvtg"]["overall"]
        print(f"CVTG-2K OCR: word accuracy {overall['word_accuracy']:.4f}, NED {overall['ned']:.4f}")
    device = args.device or default_device()
    if reference is not None:
        feature = load_fid_features(args.fid_weights, device)
        generated = (image for image, _ in job_images(plan))
        report["fid"] = frechet_distance(generated, read_images(reference), feature, args.batch)
        report |= {"fid_weights": args.fid_weights, "fid_reference": args.fid_reference}
        print(f"FID {report['fid']:.4f} against {len(reference)} images of {args.fid_reference}")
    if args.clip_weights:
        report["clip_score"] = clip_score(job_images(plan), args.clip_weights, args.batch, device)
        report["clip_weights"] = args.clip_weights
        print(f"CLIP score {report['clip_score']:.4f}")
    print(f"Wrote {write_report(plan, report)}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ModelLayoutError, ValueError) as e:
        sys.exit(f"evaluate.py: error: {e}")
