import json

import pytest

from deepgen.config import DataConfig, DatasetConfig, StageConfig
from deepgen.data.tiny_world import FORMAT_VERSION as TINY_WORLD_FORMAT_VERSION
from deepgen.data.tiny_world import write_tiny_world_shards
from stages.datamodule import DeepGenDataModule


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    for name, seed in (("a", 0), ("b", 1)):
        write_tiny_world_shards(root / name, num_t2i=6, num_edit=3, samples_per_shard=3, seed=seed)
    return root


def module(**data) -> DeepGenDataModule:
    data = {"shards_dir": "unused", **data}
    cfg = DataConfig(name="d", image_size=64, batch_size=2, num_workers=0, **data)
    return DeepGenDataModule(cfg, StageConfig(name="sft", t2i_per_cycle=2, edit_per_cycle=1))


def test_mixture_sources_and_batches(shard_dirs):
    dm = module(
        datasets=[
            DatasetConfig(name="a", task="t2i", shards=str(shard_dirs / "a"), weight=2.0),
            DatasetConfig(name="b", task="t2i", shards=f"{shard_dirs}/b/t2i-*.tar"),
            DatasetConfig(name="b_edit", task="edit", shards=str(shard_dirs / "b")),
        ]
    )
    t2i = dm.sources("t2i")
    assert [(s.name, s.weight, len(s.urls)) for s in t2i] == [("a", 2.0, 2), ("b", 1.0, 2)]
    assert [s.name for s in dm.sources("edit")] == ["b_edit"]
    batches = [b for _, b in zip(range(6), dm.train_dataloader(), strict=False)]
    assert [b["task"] for b in batches] == ["t2i", "t2i", "edit"] * 2
    assert {n for b in batches if b["task"] == "t2i" for n in b["datasets"]} <= {"a", "b"}


def test_missing_task_names_the_setting(shard_dirs):
    dm = module(datasets=[DatasetConfig(name="a", task="t2i", shards=str(shard_dirs / "a"))])
    with pytest.raises(FileNotFoundError, match="needs edit shards.*data.datasets"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="task must be t2i or edit"):
        module(datasets=[DatasetConfig(name="x", task="video", shards="/x")]).sources("t2i")


def test_resume_with_other_worker_count_is_refused(shard_dirs):
    dm = module(shards_dir=str(shard_dirs / "a"))
    dm.load_state_dict({"batches": 4, "positions": {}, "layout": {"world_size": 1, "num_workers": 3}})
    with pytest.raises(ValueError, match="num_workers"):
        dm.train_dataloader()


def test_tiny_world_is_generated_and_regenerated_when_its_settings_change(tmp_path):
    from deepgen.config import TinyWorldConfig

    small = dict(
        num_t2i=6, num_edit=3, num_reasoning_t2i=2, num_text_t2i=2, num_reasoning_edit=1, num_text_edit=1
    )
    dm = module(shards_dir=str(tmp_path / "tw"), tiny_world=TinyWorldConfig(**small, num_eval_per_split=2))
    dm.prepare_data()
    manifest = (tmp_path / "tw" / "manifest.json").read_text()
    dm.prepare_data()  # same settings: kept
    assert (tmp_path / "tw" / "manifest.json").read_text() == manifest
    dm.data_cfg.tiny_world.num_t2i = 9
    dm.prepare_data()
    assert '"num_t2i": 9' in (tmp_path / "tw" / "manifest.json").read_text()
    # Shards of an older format (same arguments) are rebuilt too.
    path = tmp_path / "tw" / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"version": TINY_WORLD_FORMAT_VERSION - 1}))
    dm.prepare_data()
    assert json.loads(path.read_text())["version"] == TINY_WORLD_FORMAT_VERSION
    sizes = {
        tuple(b["images"].shape[-2:])
        for _, b in zip(range(12), dm.train_dataloader(), strict=False)
        if b["task"] == "t2i"
    }
    assert (64, 64) in sizes  # the wide text-rendering signs get their own buckets

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="holds other files"):
        module(shards_dir=str(tmp_path / "mine"), tiny_world=TinyWorldConfig(**small)).prepare_data()
