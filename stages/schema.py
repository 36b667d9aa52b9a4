"""Registers the typed run schema with Hydra's ConfigStore (used by the entry points)."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from deepgen.config import RunConfig


def register_schema() -> None:
    """Make ``run_schema`` (deepgen.config.RunConfig) available to conf/train.yaml's defaults list."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
