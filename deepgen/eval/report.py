"""The demo report: how each stage of a align -> sft -> grpo pipeline scored, as Markdown.

Inputs are files the stages and the benchmark already write (``metrics.csv`` of the csv logger,
``results.json`` of the benchmark, grpo's held-out ``eval/step_N.json``), so a report can be rebuilt
from any finished pipeline without rerunning it.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from deepgen.eval.benchmark import CATEGORIES


def read_metrics(run_dir: str | Path) -> list[dict[str, str]]:
    """The rows of a run's newest ``csv/version_*/metrics.csv`` (the csv logger gets what W&B gets)."""
    files = sorted(Path(run_dir).glob("csv/version_*/metrics.csv"))
    if not files:
        raise FileNotFoundError(
            f"{run_dir}: no csv/version_*/metrics.csv (was the run started with a csv logger?)"
        )
    with files[-1].open() as f:
        return list(csv.DictReader(f))


def series(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    """(step, value) of every row that logged ``key``."""
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]


def first_last_mean(points: list[tuple[int, float]], window: int) -> tuple[float, float]:
    """Mean of the first and of the last ``window`` finite values (at most half the points each)."""
    values = [v for _, v in points if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    n = max(1, min(window, len(values) // 2))
    return sum(values[:n]) / n, sum(values[-n:]) / n


@dataclass
class StageReport:
    """What the report shows of one model: its benchmark results and, for trained stages, its run."""

    name: str
    benchmark: dict
    """``evaluate_backbone``'s results (categories, overall)."""
    benchmark_dir: Path
    """Folder holding the benchmark's per-category grids."""
    run_dir: Path | None = None
    seconds: float | None = None
    """Wall time of the stage's training run."""
    loss: tuple[float, float] | None = None
    """Training loss: mean of the first and of the last logged values."""
    reward: dict[str, dict[str, float]] = field(default_factory=dict)
    """grpo only: held-out reward metrics by moment ("start", "end")."""


def benchmark_table(stages: list[StageReport]) -> str:
    """One row per model, one column per benchmark category (score), then overall score and accuracy."""
    names = [c for c in CATEGORIES if all(c in s.benchmark["categories"] for s in stages)]
    header = ["model", *(f"{CATEGORIES[c]}" for c in names), "overall score", "overall accuracy"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in stages:
        cats = s.benchmark["categories"]
        cells = [s.name, *(f"{cats[c]['score']:.3f}" for c in names)]
        cells += [f"**{s.benchmark['overall']['score']:.3f}**", f"{s.benchmark['overall']['accuracy']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


ROLLOUT_NOTE = (
    "Rows without a prefix: images sampled as the original evaluates (Euler ODE with CFG). Rows `rollout/`: "
    "sampled as the RL rollouts are (the SDE, the rollouts' guidance), the reward RL maximises.\n"
)


def reward_table(start: dict[str, float], end: dict[str, float]) -> str:
    """grpo's held-out reward metrics before the first and after the last RL step."""
    keys = ["combined", *sorted(k for k in start if k != "combined" and k in end)]
    keys.sort(key=lambda k: k.startswith("rollout/"))  # the ODE evaluation first, then the rollout sampler's
    lines = ["| held-out reward | SFT checkpoint (grpo step 0) | after grpo |", "|---|---|---|"]
    lines += [f"| {k} | {start[k]:.3f} | {end[k]:.3f} |" for k in keys if k in start and k in end]
    return "\n".join(lines) + "\n"


def training_table(stages: list[StageReport]) -> str:
    lines = [
        "| stage | run folder | wall time | training loss (grpo: reward), first -> last |",
        "|---|---|---|---|",
    ]
    for s in stages:
        if s.run_dir is None:
            continue
        time = f"{s.seconds / 60:.1f} min" if s.seconds is not None else "-"
        loss = f"{s.loss[0]:.3f} -> {s.loss[1]:.3f}" if s.loss else "-"
        lines.append(f"| {s.name} | `{s.run_dir}` | {time} | {loss} |")
    return "\n".join(lines) + "\n"


def write_report(stages: list[StageReport], out_dir: str | Path, header: str = "") -> Path:
    """``report.md`` in ``out_dir`` with relative links to the grids, so the folder can be moved."""
    out = Path(out_dir)
    parts = ["# deepgen demo: align -> sft -> grpo on the tiny world\n", header]
    parts += ["## Tiny-world benchmark (held-out prompts)\n", benchmark_table(stages)]
    grpo = next((s for s in stages if "start" in s.reward and "end" in s.reward), None)
    if grpo is not None:
        parts += [
            "## RL reward (grpo's held-out prompts)\n",
            reward_table(grpo.reward["start"], grpo.reward["end"]),
        ]
        if "rollout/combined" in grpo.reward["end"]:
            parts.append(ROLLOUT_NOTE)
    parts += ["## Training runs\n", training_table(stages)]
    parts.append("## Samples\n")
    for s in stages:
        grids = sorted(s.benchmark_dir.glob("*.png"))
        if not grids:
            continue
        parts.append(f"### {s.name}\n")
        for grid in grids:
            rel = grid.relative_to(out) if grid.is_relative_to(out) else grid
            label = CATEGORIES.get(grid.stem, grid.stem)
            parts.append(f"{label}<br>\n![{label}]({rel.as_posix()})\n")
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def read_reward(run_dir: str | Path) -> dict[str, dict[str, float]]:
    """grpo's held-out reward at its first and last evaluation (``eval/step_N.json``), if written."""
    files = sorted((Path(run_dir) / "eval").glob("step_*.json"))
    if len(files) < 2:
        return {}
    return {"start": json.loads(files[0].read_text()), "end": json.loads(files[-1].read_text())}
