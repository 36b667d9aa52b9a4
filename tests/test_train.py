"""One smoke test of the real command line: `python train.py stage=sft` on tiny shards, a few steps."""

import csv
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY_SHARDS

ROOT = Path(__file__).resolve().parents[1]


def test_train_cli_runs_logs_samples_and_checkpoints(train_cli, tmp_path):
    run_dir = tmp_path / "run"
    result = train_cli(
        f"data.shards_dir={tmp_path / 'shards'}",
        *TINY_SHARDS,
        "trainer.max_steps=3",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.log_every_n_steps=1",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Generating tiny-world shards" in result.stdout
    assert "train/loss: mean of first" in result.stdout
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "samples" / "step_000003.png").is_file()
    # Every 2 steps, and the last step of a finished run whatever the interval.
    for step in (2, 3):
        assert (run_dir / "checkpoints" / f"step_{step:06d}.ckpt" / "weights.safetensors").is_file()
    with open(next((run_dir / "csv").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/loss") for r in rows)
    log = (run_dir / "train.log").read_text()
    assert f"Run folder: {run_dir}" in log and "train/loss: mean of first" in log


def test_compiled_sampling_refuses_a_sharded_model(train_cli, tmp_path):
    result = train_cli(
        "hardware.strategy=fsdp2", "hardware.compile_sampling=true", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode != 0
    assert "hardware.compile_sampling=true needs an unsharded model" in result.stderr


def test_mistyped_override_fails_with_the_key_name():
    result = subprocess.run(
        [sys.executable, "train.py", "trainer.max_stepz=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "max_stepz" in result.stderr
