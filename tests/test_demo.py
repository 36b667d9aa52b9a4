"""demo.py end to end on the tiny zoo with a few steps per stage, and the report it writes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from deepgen.eval.report import (
    StageReport,
    benchmark_table,
    first_last_mean,
    read_metrics,
    reward_table,
)
from tests.conftest import TINY_SHARDS

ROOT = Path(__file__).resolve().parents[1]


def demo(out: Path, zoo, shards: Path, *extra: str) -> subprocess.CompletedProcess:
    overrides = [
        f"model.vlm_path={zoo.vlm_dir}",
        f"model.dit_path={zoo.dit_dir}",
        "model.build_tiny_zoo=false",
        f"data.shards_dir={shards}",
        "data.num_workers=0",
        "data.batch_size=2",
        *TINY_SHARDS,
        "logger=csv",
        "sampling.num_steps=1",
        "trainer.checkpoint_every_n_steps=1",
        "trainer.log_every_n_steps=1",
        "grpo:stage.grpo.prompts_per_step=1",
        "grpo:stage.grpo.group_size=2",
        "grpo:stage.grpo.num_steps=2",
        "grpo:stage.grpo.eval_num_steps=1",
    ]
    cmd = [sys.executable, "demo.py", "--out", str(out), "--align-steps", "2", "--sft-steps", "2"]
    cmd += ["--grpo-steps", "1", "--eval-limit", "1", "--eval-steps", "1", *extra, *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_demo_runs_the_three_stages_and_reports_each(tiny_zoo, tmp_path):
    out = tmp_path / "demo"
    proc = demo(out, tiny_zoo, tmp_path / "shards")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage, steps in (("align", 2), ("sft", 2), ("grpo", 1)):
        assert (out / stage / "checkpoints" / f"step_{steps:06d}.ckpt").is_dir()
        assert (out / "benchmark" / stage / "results.json").is_file()
    # Each stage started from the previous one's last checkpoint.
    sft_cfg = (out / "sft" / "config.yaml").read_text()
    assert f"init_from: {out / 'align' / 'checkpoints' / 'step_000002.ckpt'}" in sft_cfg
    assert (
        f"init_from: {out / 'sft' / 'checkpoints' / 'step_000002.ckpt'}"
        in (out / "grpo" / "config.yaml").read_text()
    )
    report = (out / "report.md").read_text()
    for name in ("untrained", "align", "sft", "grpo"):
        assert f"| {name} |" in report
    assert "held-out reward" in report and "combined" in report
    assert "](benchmark/sft/t2i_general.png)" in report
    state = json.loads((out / "demo_state.json").read_text())
    assert set(state) == {"align", "sft", "grpo"}

    # A rerun trains nothing and reuses the evaluations.
    proc = demo(out, tiny_zoo, tmp_path / "shards")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "==> " not in proc.stdout
    assert json.loads((out / "demo_state.json").read_text()) == state

    # Other benchmark settings re-evaluate every model and train nothing.
    proc = demo(out, tiny_zoo, tmp_path / "shards", "--eval-limit", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line for line in proc.stdout.splitlines() if line.startswith("==> ")] == [
        f"==> benchmark: {name}" for name in ("untrained", "align", "sft", "grpo")
    ]
    assert json.loads((out / "benchmark" / "sft" / "results.json").read_text())["settings"]["limit"] == 2


def test_demo_refuses_an_unknown_stage_prefix(tiny_zoo, tmp_path):
    proc = demo(tmp_path / "demo", tiny_zoo, tmp_path / "shards", "rl:stage.optim.lr=1")
    assert proc.returncode != 0
    assert "demo.py: error: Override 'rl:stage.optim.lr=1' names stage 'rl'" in proc.stderr
    assert not (tmp_path / "demo" / "align").exists()


def _results(scores: dict[str, float]) -> dict:
    cats = {name: {"score": s, "accuracy": s / 2, "n": 1} for name, s in scores.items()}
    mean = sum(scores.values()) / len(scores)
    return {"categories": cats, "overall": {"score": mean, "accuracy": mean / 2}}


def test_benchmark_table_has_one_row_per_model_and_the_shared_categories(tmp_path):
    stages = [
        StageReport("untrained", _results({"t2i_general": 0.0, "edit_general": 0.1}), tmp_path),
        StageReport(
            "sft", _results({"t2i_general": 0.5, "edit_general": 0.3, "t2i_reasoning": 1.0}), tmp_path
        ),
    ]
    lines = benchmark_table(stages).splitlines()
    assert lines[0] == "| model | T2I composition | Editing | overall score | overall accuracy |"
    assert lines[2] == "| untrained | 0.000 | 0.100 | **0.050** | 0.025 |"
    assert lines[3] == "| sft | 0.500 | 0.300 | **0.600** | 0.300 |"


def test_reward_table_and_loss_windows():
    table = reward_table({"combined": 0.1, "ocr": 0.0, "only_start": 1.0}, {"combined": 0.2, "ocr": 0.5})
    assert table.splitlines()[2:] == ["| combined | 0.100 | 0.200 |", "| ocr | 0.000 | 0.500 |"]
    start = {"rollout/combined": 0.3, "combined": 0.1, "ocr": 0.0}
    rows = reward_table(start, {"rollout/combined": 0.4, "combined": 0.2, "ocr": 0.5}).splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == ["| combined", "| ocr", "| rollout/combined"]
    assert first_last_mean([(i, float(i)) for i in range(10)], 3) == (1.0, 8.0)
    assert first_last_mean([(0, 4.0), (1, float("nan")), (2, 2.0)], 5) == (4.0, 2.0)
    assert all(math.isnan(v) for v in first_last_mean([], 3))  # nothing logged
    with pytest.raises(FileNotFoundError, match="no csv"):
        read_metrics(Path("/nonexistent"))
