"""DeepGenDataModule: webdataset shards -> single-task micro-batches in the stage's T2I:edit cycle."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from deepgen.config import DataConfig, StageConfig
from deepgen.data.shards import TaskCycleDataset
from deepgen.data.tiny_world import write_tiny_world_shards

log = logging.getLogger(__name__)


class DeepGenDataModule(L.LightningDataModule):
    def __init__(self, data_cfg: DataConfig, stage_cfg: StageConfig) -> None:
        super().__init__()
        self.data_cfg = data_cfg
        self.stage_cfg = stage_cfg

    def shard_urls(self, pattern: str) -> list[str]:
        return sorted(str(p) for p in Path(self.data_cfg.shards_dir).glob(pattern))

    def prepare_data(self) -> None:
        """Generate the tiny-world shards on first use; a real dataset with no shards is an error."""
        cfg = self.data_cfg
        if self.shard_urls(cfg.t2i_pattern) or self.shard_urls(cfg.edit_pattern):
            return
        if cfg.tiny_world is None:
            raise FileNotFoundError(
                f"No shards matching {cfg.t2i_pattern} or {cfg.edit_pattern} in data.shards_dir={cfg.shards_dir}"
            )
        tw = cfg.tiny_world
        log.info(
            f"Generating tiny-world shards in {cfg.shards_dir} (first use: {tw.num_t2i} T2I, {tw.num_edit} edits)"
        )
        write_tiny_world_shards(
            cfg.shards_dir,
            num_t2i=tw.num_t2i,
            num_edit=tw.num_edit,
            image_size=tw.image_size,
            samples_per_shard=tw.samples_per_shard,
            seed=tw.seed,
        )

    def train_dataloader(self) -> DataLoader:
        cfg, stage = self.data_cfg, self.stage_cfg
        t2i = self.shard_urls(cfg.t2i_pattern) if stage.t2i_per_cycle else []
        edit = self.shard_urls(cfg.edit_pattern) if stage.edit_per_cycle else []
        for urls, count, pattern in (
            (t2i, stage.t2i_per_cycle, cfg.t2i_pattern),
            (edit, stage.edit_per_cycle, cfg.edit_pattern),
        ):
            if count and not urls:
                raise FileNotFoundError(
                    f"Stage '{stage.name}' needs shards matching {pattern} in {cfg.shards_dir}"
                )
        dataset = TaskCycleDataset(
            t2i_urls=t2i,
            edit_urls=edit,
            batch_size=cfg.batch_size,
            image_size=cfg.image_size,
            unit=cfg.size_unit,
            seed=cfg.seed,
            shuffle_buffer=cfg.shuffle_buffer,
            t2i_per_cycle=stage.t2i_per_cycle,
            edit_per_cycle=stage.edit_per_cycle,
        )
        return DataLoader(
            dataset, batch_size=None, num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0
        )
