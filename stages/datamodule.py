"""DeepGenDataModule: webdataset shards -> single-task micro-batches in the stage's T2I:edit cycle.

The data position (per rank and DataLoader worker: the cycle position and the batches consumed per
task) is part of every checkpoint, so a resumed run neither repeats nor skips samples.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from deepgen.config import DataConfig, StageConfig
from deepgen.data.shards import ReadOptions, Source, TaskCycleDataset, resolve_shards
from deepgen.data.tiny_world import FORMAT_VERSION as TINY_WORLD_FORMAT_VERSION
from deepgen.data.tiny_world import write_tiny_world_shards
from deepgen.data.writer import MANIFEST_NAME

log = logging.getLogger(__name__)


class DeepGenDataModule(L.LightningDataModule):
    def __init__(self, data_cfg: DataConfig, stage_cfg: StageConfig) -> None:
        super().__init__()
        self.data_cfg = data_cfg
        self.stage_cfg = stage_cfg
        self.batches = 0
        """Batches the model trained on (this rank)."""
        self.positions: dict[str, dict[str, int]] = {}
        """Per "rank/slot" stream: its position after the last batch the model trained on."""
        self.resume: dict | None = None
        self.resume_layout: dict[str, int] | None = None

    # ------------------------------------------------------------------------------- datasets
    def shard_urls(self, pattern: str) -> list[str]:
        return sorted(str(p) for p in Path(self.data_cfg.shards_dir).glob(pattern))

    def prepare_data(self) -> None:
        """Generate the tiny-world shards on first use (or when data.tiny_world changed); a real dataset
        with no shards is an error."""
        cfg = self.data_cfg
        if cfg.datasets:
            return
        found = self.shard_urls(cfg.t2i_pattern) or self.shard_urls(cfg.edit_pattern)
        if cfg.tiny_world is None:
            if not found:
                raise FileNotFoundError(
                    f"No shards matching {cfg.t2i_pattern} or {cfg.edit_pattern} in data.shards_dir={cfg.shards_dir}"
                )
            return
        wanted = asdict(cfg.tiny_world)
        manifest_path = Path(cfg.shards_dir) / MANIFEST_NAME
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        if manifest.get("format") != "deepgen-tiny-world":
            if found:
                return  # someone else's shards: never overwrite them
            if Path(cfg.shards_dir).is_dir() and any(Path(cfg.shards_dir).iterdir()):
                raise FileExistsError(
                    f"data.shards_dir={cfg.shards_dir} holds other files and no shards; point it to an empty "
                    "or new directory for the tiny world"
                )
        current = manifest.get("version") == TINY_WORLD_FORMAT_VERSION
        if found and current and manifest.get("arguments") == wanted:
            return
        if not found:
            why = "first use"
        elif not current:
            why = "its format changed"
        else:
            why = "its settings changed"
        log.info(f"Generating tiny-world shards in {cfg.shards_dir} ({why}): {wanted}")
        write_tiny_world_shards(cfg.shards_dir, **wanted, overwrite=True)

    def sources(self, task: str) -> list[Source]:
        """The task's mixture: data.datasets when given, else the one dataset in data.shards_dir."""
        cfg = self.data_cfg
        if cfg.datasets:
            unknown = [d.task for d in cfg.datasets if d.task not in ("t2i", "edit")]
            if unknown:
                raise ValueError(f"data.datasets: task must be t2i or edit, got {unknown[0]!r}")
            return [
                Source(d.name, resolve_shards(d.shards, task), d.weight)
                for d in cfg.datasets
                if d.task == task
            ]
        pattern = cfg.t2i_pattern if task == "t2i" else cfg.edit_pattern
        urls = self.shard_urls(pattern)
        return [Source(Path(cfg.shards_dir).name, urls)] if urls else []

    def layout(self) -> dict[str, int]:
        """What a data position depends on besides the config: ranks and workers."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return {"world_size": world, "num_workers": self.data_cfg.num_workers}

    def train_dataloader(self) -> DataLoader:
        stage = self.stage_cfg
        sources = {}
        for task, count in (("t2i", stage.t2i_per_cycle), ("edit", stage.edit_per_cycle)):
            sources[task] = self.sources(task) if count else []
            if count and not sources[task]:
                where = (
                    "data.datasets"
                    if self.data_cfg.datasets
                    else f"data.shards_dir={self.data_cfg.shards_dir}"
                )
                raise FileNotFoundError(f"Stage '{stage.name}' needs {task} shards; none found in {where}")
        if self.resume_layout is not None and self.resume_layout != self.layout():
            raise ValueError(
                f"The checkpoint's data position was saved with {self.resume_layout}, this run has "
                f"{self.layout()}; resume with the same devices and data.num_workers to continue exactly"
            )
        dataset = TaskCycleDataset(
            sources["t2i"],
            sources["edit"],
            batch_size=self.data_cfg.batch_size,
            opts=ReadOptions.from_config(self.data_cfg),
            t2i_per_cycle=stage.t2i_per_cycle,
            edit_per_cycle=stage.edit_per_cycle,
            resume=self.resume,
        )
        workers = self.data_cfg.num_workers
        # Its own generator: creating worker processes must not draw from the global RNG, which a
        # resumed run restores and which must then match the uninterrupted run's.
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(self.data_cfg.seed),
        )

    # -------------------------------------------------------------------------- data position
    def record(self, batch: dict) -> None:
        """Called for every batch the model trained on (see DataProgress)."""
        position = dict(batch["position"])
        self.positions[position.pop("stream")] = position
        self.batches += 1

    def state_dict(self) -> dict:
        positions = self.positions
        if torch.distributed.is_initialized():  # every rank's workers, not only rank 0's
            gathered: list[dict] = [{} for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(gathered, positions)
            positions = {k: v for part in gathered for k, v in part.items()}
        return {"batches": self.batches, "positions": positions, "layout": self.layout()}

    def load_state_dict(self, state: dict) -> None:
        self.batches = state["batches"]
        self.positions = dict(state["positions"])
        self.resume = {"batches": self.batches, "positions": dict(self.positions)}
        self.resume_layout = dict(state["layout"])


class DataProgress(L.Callback):
    """Records the data position of each trained batch, and logs the realised mix and skipped samples."""

    def __init__(self, datamodule: DeepGenDataModule) -> None:
        self.datamodule = datamodule
        self.mix: dict[str, dict[str, int]] = {"t2i": {}, "edit": {}}
        self.skipped: dict[str, dict[str, int]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.datamodule.record(batch)
        counts = self.mix[batch["task"]]
        for name in batch["datasets"]:
            counts[name] = counts.get(name, 0) + 1
        self.skipped[batch["position"]["stream"]] = batch["skipped"]
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            metrics = {
                f"data/mix/{task}/{name}": n / sum(counts.values())
                for task, counts in self.mix.items()
                for name, n in counts.items()
            }
            reasons: dict[str, int] = {}
            for counts in self.skipped.values():
                for reason, n in counts.items():
                    reasons[reason] = reasons.get(reason, 0) + n
            metrics.update({f"data/skipped/{r}": float(n) for r, n in reasons.items()})
            pl_module.log_dict(metrics, batch_size=len(batch["keys"]))
