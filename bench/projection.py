"""GPU-hours of the paper's schedule (alignment, SFT, RL) on H100, projected from bench/perf.py's rates.

    python -m bench.projection perf.json                 # Markdown table; --json for the numbers

The schedule is the original's (shared/reference/deepgen_original.md, sections 4 and 6): alignment
200k micro-iterations of 4 samples on each of 64 GPUs (51.2M samples, editing:T2I 1:3), SFT 400k of
them (102.4M samples, editing:T2I 1:2), RL 1,500 steps of 256 rollout images each, with one update
over those images. A sample costs one train step's seconds per image of its kind; an RL step costs
256 images at the rollout rate plus the update, scaled from the measured images to 256. The
projection assumes perfect scaling over GPUs (no communication or data-loading stalls), so it is a
lower bound on the GPU-hours of a real multi-node run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SCHEDULE = {
    "align": {"samples": 200_000 * 4 * 64, "edit_share": 1 / 4},
    "sft": {"samples": 400_000 * 4 * 64, "edit_share": 1 / 3},
    "rl": {"steps": 1_500, "images_per_step": 256},
}
SIDES = ("ours", "plain")


def seconds_per_image(result: dict, side: str) -> float:
    m = result[side]
    if "error" in m:
        raise ValueError(f"the {side} side failed in perf.json ({m['error']}): rerun bench/perf.py")
    return m["seconds"] / m["images"]


def project(results: dict) -> dict[str, dict[str, float]]:
    """stage -> side -> GPU-hours, plus ``total``; ``results`` is perf.json's ``results``."""
    needed = [
        "train_align",
        "train_align_edit",
        "train_sft_t2i",
        "train_sft_edit",
        "grpo_rollout",
        "grpo_update",
    ]
    missing = [name for name in needed if name not in results]
    if missing:
        raise ValueError(f"perf.json lacks {missing}: run bench/perf.py without --only")
    hours: dict[str, dict[str, float]] = {}
    for side in SIDES:
        t2i = seconds_per_image(results["train_sft_t2i"], side)
        edit = seconds_per_image(results["train_sft_edit"], side)
        align_t2i = seconds_per_image(results["train_align"], side)
        align_edit = seconds_per_image(results["train_align_edit"], side)
        a, s, rl = SCHEDULE["align"], SCHEDULE["sft"], SCHEDULE["rl"]
        stage_seconds = {
            "align": a["samples"] * ((1 - a["edit_share"]) * align_t2i + a["edit_share"] * align_edit),
            "sft": s["samples"] * ((1 - s["edit_share"]) * t2i + s["edit_share"] * edit),
            "rl": rl["steps"]
            * rl["images_per_step"]
            * (
                seconds_per_image(results["grpo_rollout"], side)
                + seconds_per_image(results["grpo_update"], side)
            ),
        }
        for stage, seconds in stage_seconds.items():
            hours.setdefault(stage, {})[side] = seconds / 3600
        hours.setdefault("total", {})[side] = sum(stage_seconds.values()) / 3600
    return hours


def table(hours: dict[str, dict[str, float]]) -> str:
    lines = [
        "| stage | ours (H100 GPU-hours) | plain loop | plain / ours |",
        "|---|---|---|---|",
    ]
    for stage, sides in hours.items():
        lines.append(
            f"| {stage} | {sides['ours']:,.0f} | {sides['plain']:,.0f} | {sides['plain'] / sides['ours']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("perf_json", type=Path, help="bench/perf.py's output, measured on the GPU")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    a = p.parse_args(argv)
    if not a.perf_json.is_file():
        raise SystemExit(
            f"{a.perf_json} does not exist: run `python -m bench.perf --out {a.perf_json}` first"
        )
    doc = json.loads(a.perf_json.read_text())
    try:
        hours = project(doc["results"])
    except ValueError as error:
        raise SystemExit(f"{a.perf_json}: {error}") from None
    print(json.dumps(hours, indent=2) if a.json else table(hours))
    return hours


if __name__ == "__main__":
    main()
