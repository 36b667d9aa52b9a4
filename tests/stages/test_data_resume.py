"""Kill a training process mid-run, resume it from its last checkpoint, and compare the samples seen."""

import json
import subprocess
import sys
import textwrap

import pytest

from deepgen.data.tiny_world import write_tiny_world_shards

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from deepgen.config import DataConfig, StageConfig
    from stages.checkpoint_io import SafeCheckpointIO
    from stages.datamodule import DataProgress, DeepGenDataModule

    shards, workers, max_steps, kill_at, resume, log_path, ckpt_dir = sys.argv[1:]
    kill_at = int(kill_at)

    class KeyRecorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            if self.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, like a lost node
            with open(log_path, "a") as f:
                f.write(json.dumps([self.global_step, batch["keys"]]) + "\\n")
            return (self.w * batch["images" if batch["task"] == "t2i" else "targets"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DeepGenDataModule(
        DataConfig(name="tw", shards_dir=shards, image_size=64, batch_size=3, num_workers=int(workers),
                   shuffle_buffer=16),
        StageConfig(name="sft", t2i_per_cycle=2, edit_per_cycle=1),
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=int(max_steps), logger=False, enable_progress_bar=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=4, save_top_k=-1,
                                   filename="{step}"), DataProgress(data)],
        plugins=[SafeCheckpointIO()],
    )
    trainer.fit(KeyRecorder(), datamodule=data, ckpt_path=None if resume == "-" else resume)
    """
)


def run(tmp_path, shards, workers, max_steps, kill_at=-1, resume="-", name="log"):
    script = tmp_path / "train_keys.py"
    script.write_text(SCRIPT)
    log = tmp_path / f"{name}.jsonl"
    cmd = [
        sys.executable,
        str(script),
        str(shards),
        str(workers),
        str(max_steps),
        str(kill_at),
        resume,
        str(log),
        str(tmp_path / f"ckpt-{name}"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    steps = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, {step: keys for step, keys in steps}


@pytest.mark.parametrize("workers", [2])  # workers=0 is the same path with one stream
def test_killed_and_resumed_run_sees_the_same_samples(tmp_path, workers):
    shards = tmp_path / "shards"
    write_tiny_world_shards(shards, num_t2i=40, num_edit=20, samples_per_shard=5, seed=0)

    full_result, full = run(tmp_path, shards, workers, 12, name="full")
    assert full_result.returncode == 0, full_result.stderr[-2000:]
    assert sorted(full) == list(range(12))

    killed_result, killed = run(tmp_path, shards, workers, 12, kill_at=10, name="killed")
    assert killed_result.returncode == -9  # SIGKILL
    assert [killed[s] for s in range(10)] == [full[s] for s in range(10)]

    last = tmp_path / "ckpt-killed" / "step=8.ckpt"
    assert last.is_dir()
    resumed_result, resumed = run(tmp_path, shards, workers, 12, resume=str(last), name="resumed")
    assert resumed_result.returncode == 0, resumed_result.stderr[-2000:]
    assert sorted(resumed) == [8, 9, 10, 11]  # neither repeats steps 0-7 nor skips any
    assert [resumed[s] for s in range(8, 12)] == [full[s] for s in range(8, 12)]
