"""Sweeps: a local Hydra multirun of the tiny model (own folder, config and W&B run per job, one W&B
group per sweep), and the SLURM launcher config (conf/hydra/launcher/slurm.yaml) without SLURM."""

import os
import struct
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from wandb.proto import wandb_internal_pb2

from stages.schema import register_schema

ROOT = Path(__file__).resolve().parents[1]


def run_train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", *args]
    env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def write_experiment(conf_dir: Path, tiny_zoo, shards_dir: Path) -> None:
    """A tiny `experiment=sweep_test` preset, so that the jobs' override strings stay short."""
    (conf_dir / "experiment").mkdir(parents=True)
    preset = {
        "model": {
            "vlm_path": str(tiny_zoo.vlm_dir),
            "dit_path": str(tiny_zoo.dit_dir),
            "build_tiny_zoo": False,
        },
        "data": {
            "shards_dir": str(shards_dir),
            "num_workers": 0,
            "batch_size": 2,
            "tiny_world": {
                "num_t2i": 24,
                "num_edit": 12,
                "samples_per_shard": 12,
                "num_reasoning_t2i": 6,
                "num_text_t2i": 6,
                "num_reasoning_edit": 3,
                "num_text_edit": 3,
                "num_eval_per_split": 2,
            },
        },
        "trainer": {"max_steps": 2, "checkpoint_every_n_steps": 2, "log_every_n_steps": 1},
        "sampling": {"num_steps": 2},
    }
    text = "# @package _global_\n" + OmegaConf.to_yaml(preset)
    (conf_dir / "experiment" / "sweep_test.yaml").write_text(text)


def wandb_run_record(wandb_file: Path) -> wandb_internal_pb2.RunRecord:
    """The run record (group, name, ...) of a W&B transaction log: LevelDB-log framing, 32 KiB blocks."""
    data, pos, chunk, block = wandb_file.read_bytes(), 7, b"", 32 * 1024
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # no room for a record header: the rest of the block is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            if record.WhichOneof("record_type") == "run":
                return record.run
            chunk = b""
    raise AssertionError(f"no run record in {wandb_file}")


def test_local_sweep_gives_each_job_a_folder_config_and_wandb_run_in_one_group(tiny_zoo, tmp_path):
    write_experiment(tmp_path / "conf", tiny_zoo, tmp_path / "shards")
    sweep_dir = tmp_path / "sweep"
    result = run_train(
        "--multirun",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "experiment=sweep_test",
        "logger=wandb",
        f"hydra.sweep.dir={sweep_dir}",
        "stage.optim.lr=1e-4,3e-4",
        env={"WANDB_DIR": str(tmp_path / "wandb")},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    names = [
        "experiment=sweep_test,logger=wandb,stage.optim.lr=0.0001",
        "experiment=sweep_test,logger=wandb,stage.optim.lr=0.0003",
    ]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == [f"0_{names[0]}", f"1_{names[1]}"]
    runs = []
    for job, lr, name in zip(jobs, [1e-4, 3e-4], names, strict=True):
        cfg = OmegaConf.load(job / "config.yaml")
        assert cfg.stage.optim.lr == lr
        assert (cfg.loggers.wandb.group, cfg.loggers.wandb.name) == (str(sweep_dir), name)
        assert (job / "checkpoints" / "step_000002.ckpt").is_dir()
        (wandb_file,) = job.glob("wandb/offline-run-*/run-*.wandb")  # one W&B run per job
        runs.append(wandb_run_record(wandb_file))
    assert [r.run_group for r in runs] == [str(sweep_dir)] * 2
    assert [r.display_name for r in runs] == names
    assert runs[0].run_id != runs[1].run_id


def test_slurm_launcher_config_follows_hardware():
    register_schema()
    overrides = [
        "hydra/launcher=slurm",
        "hardware=gpu",
        "hardware.devices=8",
        "hardware.num_nodes=2",
        "hydra.launcher.partition=h100",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 8, 8)
    assert launcher["partition"] == "h100" and launcher["max_num_timeout"] > 0
    assert type(instantiate(cfg.hydra.launcher)).__name__ == "SlurmLauncher"


def test_slurm_sweep_submits_one_job_array(tmp_path):
    """The real launcher up to sbatch: a fake sbatch keeps the job script and fails the submission."""
    fake_bin, script = tmp_path / "bin", tmp_path / "submitted.sh"
    fake_bin.mkdir()
    for command, body in [("sbatch", f'cp "${{@: -1}}" {script}\nexit 1'), ("srun", "exit 1")]:
        (fake_bin / command).write_text(f"#!/bin/bash\n{body}\n")
        (fake_bin / command).chmod(0o755)
    result = run_train(
        "--multirun",
        "hydra/launcher=slurm",
        "hardware=gpu",
        "hardware.devices=8",
        "hardware.num_nodes=2",
        "hydra.launcher.partition=h100",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "stage.optim.lr=1e-4,3e-4",
        env={"PATH": f"{fake_bin}:{os.environ['PATH']}"},
    )
    assert result.returncode != 0 and "FailedJobError" in result.stderr, result.stderr[-3000:]
    lines = script.read_text().splitlines()
    for option in [
        "--array=0-1%2",
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=12",
        "--partition=h100",
        "--signal=USR2@120",
        "--job-name=train",
    ]:
        assert f"#SBATCH {option}" in lines
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in lines)
