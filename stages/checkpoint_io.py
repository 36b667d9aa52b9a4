"""Lightning CheckpointIO that writes deepgen's checkpoint directories (see deepgen/io/checkpoints.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import CheckpointIO

from deepgen.io.checkpoints import load_checkpoint_dir, save_checkpoint_dir


class SafeCheckpointIO(CheckpointIO):
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        save_checkpoint_dir(checkpoint, path)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = "cpu", weights_only: bool | None = None
    ) -> dict:
        return load_checkpoint_dir(path, map_location=map_location or "cpu")

    def remove_checkpoint(self, path: str | Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
