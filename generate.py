"""Generate or edit images with a stage checkpoint, an exported folder or released DeepGen-1.0 weights.

    python generate.py --checkpoint outputs/sft/<run>/checkpoints/step_000600.ckpt \\
        --prompt "a red circle" --prompt "a blue square" --size 64 --batch 4 --grid
    python generate.py --checkpoint outputs/sft/<run> --image source.png --prompt "make it green"
    python generate.py --checkpoint exports/sft --prompt "a red circle"
    python generate.py --checkpoint DeepGen-1.0.pt --vlm-path Qwen2.5-VL-3B-Instruct \\
        --dit-path stable-diffusion-3.5-medium --prompt "a red circle"

Wiring only: the loading, sampling and file formats live in deepgen/inference.py. Defaults are the
original's (50 Euler steps, CFG 4.0, empty negative prompt for T2I, a quality negative for edits).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from deepgen.cli import add_checkpoint_arguments, add_compile_argument, load_model_from_args, positive_int
from deepgen.images import tile_rows, to_uint8
from deepgen.inference import (
    default_negative_prompt,
    generate_images,
    image_stem,
    load_reference_image,
    output_size,
    png_info,
    read_prompts,
)
from deepgen.model.loading import ModelLayoutError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_checkpoint_arguments(p)
    add_compile_argument(p)
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt or edit instruction (repeatable)")
    prompts.add_argument("--prompt-file", help=".txt (one prompt a line) or .jsonl (prompt/caption field)")
    p.add_argument(
        "--image", nargs="+", default=[], help="source image(s): edit them (several = references of one edit)"
    )
    p.add_argument(
        "--negative-prompt", help='default: "" for T2I, the original\'s quality negative for edits'
    )
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument(
        "--size", type=positive_int, default=512, help="fix-pixels target side: area ~size^2 (tiny world: 64)"
    )
    p.add_argument("--width", type=int, help="output width (with --height; multiples of 32)")
    p.add_argument("--height", type=int, help="output height (with --width)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    p.add_argument("--batch", type=positive_int, default=1, help="images per prompt")
    p.add_argument("--grid", action="store_true", help="also write grid.png: one row per prompt")
    p.add_argument("--out", default="generated", help="output folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    prompts = read_prompts(args.prompt_file) if args.prompt_file else args.prompt
    references = [load_reference_image(path, args.size) for path in args.image]
    width, height = output_size(args.size, references, args.width, args.height)
    negative = args.negative_prompt
    if negative is None:
        negative = default_negative_prompt(editing=bool(references))

    loaded = load_model_from_args(args)
    bb = loaded.backbone
    print(loaded.summary())

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = [to_uint8(r[None])[0] for r in references]  # grid rows start with the edit's sources
    rows = []
    for i, prompt in enumerate(tqdm(prompts, desc="prompts", unit="prompt")):
        seed = args.seed + i
        images = to_uint8(
            generate_images(
                bb,
                prompt,
                negative_prompt=negative,
                references=references,
                width=width,
                height=height,
                num_images=args.batch,
                num_steps=args.steps,
                cfg_scale=args.cfg_scale,
                seed=seed,
            )
        )
        for j, pixels in enumerate(images):
            settings = {
                "prompt": prompt,
                "negative_prompt": negative,
                "seed": seed,
                "index": j,
                "steps": args.steps,
                "cfg_scale": args.cfg_scale,
                "size": f"{width}x{height}",
                "checkpoint": str(loaded.checkpoint),
                "source_images": json.dumps(args.image),
            }
            Image.fromarray(pixels).save(
                out / f"{image_stem(i, prompt)}_{j:02d}.png", pnginfo=png_info(settings)
            )
        rows.append([*sources, *images])
    if args.grid:
        tile_rows(rows).save(out / "grid.png")
    print(f"Wrote {len(prompts) * args.batch} images to {out}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ModelLayoutError, ValueError) as e:
        # Errors that teach fit on one line; a traceback would bury the path they name.
        sys.exit(f"generate.py: error: {e}")
