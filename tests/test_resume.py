"""Crash-proof runs: SIGKILL mid-run, resume=auto, SIGTERM checkpoint; losses equal an uninterrupted run."""

import csv
from pathlib import Path


def losses(run_dir: Path) -> dict[int, float]:
    """train/loss per step from a run's metrics.csv (Lightning logs step = global_step - 1 after a step)."""
    with open(next(run_dir.rglob("metrics.csv"))) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def newest_run(out: Path) -> Path:
    return sorted((out / "sft").iterdir())[-1]


def test_killed_run_resumes_with_the_same_losses_and_sigterm_saves(train_cli, tmp_path):
    common = [
        f"data.shards_dir={tmp_path / 'shards'}",
        "data.tiny_world.num_t2i=24",
        "data.tiny_world.num_edit=12",
        "data.tiny_world.samples_per_shard=6",
        "data.tiny_world.num_reasoning_t2i=0",
        "data.tiny_world.num_text_t2i=0",
        "data.tiny_world.num_reasoning_edit=0",
        "data.tiny_world.num_text_edit=0",
        "data.tiny_world.num_eval_per_split=0",
        "data.num_workers=1",
        "data.shuffle_buffer=8",
        "trainer.max_steps=8",
        "trainer.checkpoint_every_n_steps=3",
        "trainer.log_every_n_steps=1",
        "sampling.prompts=[]",
    ]
    full = train_cli(*common, f"hydra.run.dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]
    expected = losses(tmp_path / "full")
    assert sorted(expected) == list(range(8))

    out = tmp_path / "out"
    killed = train_cli(*common, f"output_dir={out}", signal_at=(5, "SIGKILL"))
    assert killed.returncode == -9  # no clean-up, like a lost node
    assert (newest_run(out) / "checkpoints" / "step_000003.ckpt" / "weights.safetensors").is_file()

    # Resume the killed run; SIGTERM during step 6 saves step 7 and exits cleanly.
    resumed = train_cli(*common, f"output_dir={out}", "resume=auto", signal_at=(6, "SIGTERM"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first = newest_run(out)
    assert "step_000003.ckpt" in (first / "config.yaml").read_text()  # the run names its start
    assert "Received SIGTERM" in (first / "train.log").read_text()
    assert (first / "checkpoints" / "step_000007.ckpt" / "weights.safetensors").is_file()
    assert not (first / "samples").exists()  # no sample grid for a pre-empted run

    finished = train_cli(*common, f"output_dir={out}", "resume=auto")
    assert finished.returncode == 0, finished.stderr[-3000:]
    got = {**losses(first), **losses(newest_run(out))}
    assert sorted(got) == list(range(3, 8))  # neither repeats nor skips a step
    for step in range(3, 8):
        assert abs(got[step] - expected[step]) < 1e-6, (step, got[step], expected[step])
