"""The end-to-end demo: align -> sft -> grpo on the tiny world, the benchmark of every stage, a report.

    python demo.py                             # outputs/demo/<date>_<time>/report.md
    python demo.py --out outputs/demo/mine     # rerun: finished stages are kept, an interrupted one resumes

Each stage is a normal `python train.py stage=<name>` run (its own folder, config.yaml, checkpoints,
csv and W&B logs) started from the previous stage's last checkpoint. Then the untrained model and each
stage's checkpoint run the tiny-world benchmark on the held-out prompts, and `report.md` gathers the
score table, grpo's held-out reward before and after RL, the training runs and the image grids.
Wiring only: the benchmark lives in deepgen/eval/benchmark.py, the report in deepgen/eval/report.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import OmegaConf

from deepgen.cli import positive_int
from deepgen.eval.benchmark import EvalSettings, evaluate_backbone, write_results
from deepgen.eval.report import StageReport, first_last_mean, read_metrics, read_reward, series, write_report
from deepgen.inference import load_model, read_run_config
from deepgen.model.backbone import DeepGenBackbone
from stages.callbacks import run_checkpoint

STAGES = ("align", "sft", "grpo")
DEFAULT_STEPS = {"sft": 1200}
"""Twice `make train`'s 600 SFT steps (5.3 min on 2 cores); align (300 steps) and grpo (50 steps)
keep their tiny recipes (conf/recipe/)."""
STATE = "demo_state.json"
"""Per finished stage, its wall time: a rerun skips those stages."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="demo folder (default: outputs/demo/<date>_<time>)")
    for stage in STAGES:
        p.add_argument(
            f"--{stage}-steps",
            type=positive_int,
            default=DEFAULT_STEPS.get(stage),
            help=f"training steps of {stage} (default: {DEFAULT_STEPS.get(stage, 'its tiny recipe')})",
        )
    p.add_argument("--eval-limit", type=positive_int, default=32, help="benchmark prompts per category")
    p.add_argument("--eval-steps", type=positive_int, default=20, help="Euler steps per benchmark image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides for every stage (data.batch_size=4), or for one with its name first "
        "(grpo:stage.grpo.group_size=4)",
    )
    return p.parse_args(argv)


def train_stage(stage: str, run_dir: Path, init_from: Path | None, steps: int | None, args) -> None:
    """One `train.py` run in ``run_dir``; a folder that already holds checkpoints resumes from them."""
    cmd = [sys.executable, "train.py", f"stage={stage}", f"hydra.run.dir={run_dir}", f"seed={args.seed}"]
    if init_from is not None:
        cmd.append(f"init_from={init_from}")
    if steps is not None:
        cmd.append(f"trainer.max_steps={steps}")
    cmd += stage_overrides(args.overrides, stage)
    print(f"\n==> {stage}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True)


def stage_overrides(overrides: list[str], stage: str) -> list[str]:
    """The overrides for ``stage``: those without a prefix and those prefixed ``<stage>:``."""
    picked = []
    for item in overrides:
        prefix, sep, rest = item.partition(":")
        if sep and "=" not in prefix:
            if prefix not in STAGES:
                raise ValueError(f"Override {item!r} names stage {prefix!r}: choose from {list(STAGES)}")
            if prefix == stage:
                picked.append(rest)
        else:
            picked.append(item)
    return picked


def untrained_backbone(run_dir: Path, seed: int) -> DeepGenBackbone:
    """The model before any stage: pretrained VLM and DiT directories, fresh think tokens and bridge."""
    checkpoint = run_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint")
    model_cfg, _, _ = read_run_config(checkpoint)
    torch.manual_seed(seed)
    return DeepGenBackbone.from_pretrained_dirs(model_cfg).eval().requires_grad_(False)


def benchmark(backbone: DeepGenBackbone, name: str, out: Path, eval_dir: Path, args) -> tuple[dict, Path]:
    folder = out / "benchmark" / name
    settings = EvalSettings(num_steps=args.eval_steps, seed=args.seed, limit=args.eval_limit)
    if (folder / "results.json").is_file():  # a rerun reuses finished evaluations with the same settings
        results = json.loads((folder / "results.json").read_text())
        if all(results["settings"].get(k) == getattr(settings, k) for k in ("num_steps", "seed", "limit")):
            return results, folder
    print(f"\n==> benchmark: {name}", flush=True)
    results = evaluate_backbone(backbone, eval_dir, settings, folder)
    write_results(results, folder, {"model": name})
    return results, folder


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for stage in STAGES:  # a mistyped stage prefix fails before hours of training
        stage_overrides(args.overrides, stage)
    out = Path(args.out or f"outputs/demo/{datetime.now():%Y-%m-%d_%H-%M-%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    start = time.perf_counter()

    previous: Path | None = None
    for stage in STAGES:
        run_dir = out / stage
        if stage not in state:
            began = time.perf_counter()
            train_stage(stage, run_dir, previous, getattr(args, f"{stage}_steps"), args)
            state[stage] = time.perf_counter() - began
            state_path.write_text(json.dumps(state, indent=2) + "\n")
        previous = run_checkpoint(run_dir)
        if previous is None:
            raise FileNotFoundError(f"{stage} finished without a checkpoint in {run_dir / 'checkpoints'}")

    # The held-out prompts were written with the shards the stages trained on.
    eval_dir = Path(str(OmegaConf.load(out / "sft" / "config.yaml").data.shards_dir)) / "eval"
    reports = []
    results, folder = benchmark(
        untrained_backbone(out / "align", args.seed), "untrained", out, eval_dir, args
    )
    reports.append(StageReport("untrained", results, folder))
    for stage in STAGES:
        run_dir = out / stage
        loaded = load_model(run_dir, device="cpu")
        results, folder = benchmark(loaded.backbone, stage, out, eval_dir, args)
        key = "train/loss" if stage != "grpo" else "reward/combined"
        loss = first_last_mean(series(read_metrics(run_dir), key), 10)
        reports.append(StageReport(stage, results, folder, run_dir, state[stage], loss, read_reward(run_dir)))
        del loaded

    total = time.perf_counter() - start
    header = (
        f"Command: `python demo.py {' '.join(argv if argv is not None else sys.argv[1:])}`. "
        f"Benchmark: {args.eval_limit} held-out prompts per category, {args.eval_steps} Euler steps, CFG 4.0. "
        "The training table shows the mean of the first and of the last 10 logged values of the loss "
        f"(grpo: of the training reward). This invocation took {total / 60:.1f} min "
        f"(training {sum(state.values()) / 60:.1f} min).\n"
    )
    path = write_report(reports, out, header)
    print(f"\nReport: {path}")
    print(path.read_text().split("## Training runs")[0])


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:
        sys.exit(f"demo.py: error: a training stage failed (exit {e.returncode}): see its output above")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"demo.py: error: {e}")
