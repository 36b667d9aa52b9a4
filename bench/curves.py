"""Summarise a run's logged curves as windowed means, for RESULTS.md and quick looks without W&B.

    .venv/bin/python bench/curves.py outputs/grpo/<run> reward/combined kl --window 10

Reads ``<run>/csv/version_0/metrics.csv`` (the csv logger writes the same metrics W&B gets) and
prints one line per metric: the mean of each window of ``--window`` logged steps, then the
held-out ``eval/*`` values when the run logged them.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from deepgen.eval.report import read_metrics, series


def windows(points: list[tuple[int, float]], size: int) -> list[tuple[int, int, float]]:
    out = []
    for k in range(0, len(points), size):
        chunk = points[k : k + size]
        finite = [v for _, v in chunk if math.isfinite(v)]
        out.append((chunk[0][0], chunk[-1][0], sum(finite) / max(1, len(finite))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("metrics", nargs="+")
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args()
    try:
        rows = read_metrics(args.run_dir)
    except FileNotFoundError as e:
        sys.exit(str(e))
    for key in args.metrics:
        points = series(rows, key)
        if not points:
            print(f"{key}: not logged")
            continue
        parts = [f"{a}-{b}: {v:.4g}" for a, b, v in windows(points, args.window)]
        print(f"{key} (mean per {args.window} steps): " + " | ".join(parts))
    evals = sorted({k for r in rows for k, v in r.items() if k.startswith("eval/") and v})
    for key in evals:
        print(f"{key}: " + ", ".join(f"step {s}: {v:.4f}" for s, v in series(rows, key)))


if __name__ == "__main__":
    main()
