import io
import json
import logging
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from deepgen.data.shards import (
    SkipCounter,
    TaskCycleDataset,
    cycle_tasks,
    edit_batches,
    shard_urls,
    t2i_batches,
)
from deepgen.data.tiny_world import PALETTE, write_tiny_world_shards

NUM_T2I, NUM_EDIT = 10, 7
READ = dict(image_size=64, unit=32, seed=0, shuffle_buffer=8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("tw") / "shards"
    write_tiny_world_shards(out, num_t2i=NUM_T2I, num_edit=NUM_EDIT, samples_per_shard=4, seed=0)
    return {"t2i": shard_urls(out, "t2i-*.tar"), "edit": shard_urls(out, "edit-*.tar")}


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "WORKER", "NUM_WORKERS"):
        monkeypatch.delenv(var, raising=False)


def all_keys(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def test_t2i_batch_format(shards):
    batches = list(t2i_batches(shards["t2i"], batch_size=4, resampled=False, **READ))
    assert [len(b["keys"]) for b in batches] == [4, 4, 2]  # finite mode keeps the short last batch
    b = batches[0]
    assert b["task"] == "t2i"
    assert b["images"].shape == (4, 3, 64, 64) and b["images"].dtype == torch.float32
    assert b["images"].min() >= -1 and b["images"].max() <= 1 and b["images"].max() == 1  # white background
    assert all(isinstance(c, str) and c for c in b["captions"]) and len(b["specs"]) == 4
    for img, spec in zip(
        b["images"], b["specs"], strict=True
    ):  # pixels agree with the spec, axes not swapped
        for obj in spec["objects"]:
            x, y = obj["center"]
            expected = torch.tensor(PALETTE[obj["color"]], dtype=torch.float32) / 127.5 - 1
            assert torch.allclose(img[:, y, x], expected)
    assert sorted(all_keys(batches)) == [f"t2i-{i:09d}" for i in range(NUM_T2I)]


def test_edit_batch_format(shards):
    batches = list(edit_batches(shards["edit"], batch_size=3, resampled=False, **READ))
    b = batches[0]
    assert b["task"] == "edit" and b["targets"].shape == (3, 3, 64, 64)
    assert len(b["sources"]) == 3 and all(len(s) == 1 and s[0].shape == (3, 64, 64) for s in b["sources"])
    assert all(s[0].min() >= -1 and s[0].max() <= 1 for s in b["sources"])
    assert all(isinstance(t, str) and t for t in b["instructions"])
    assert all(spec["task"] == "edit" and "edit" in spec and "source_spec" in spec for spec in b["specs"])
    assert not torch.equal(b["sources"][0][0], b["targets"][0])
    assert sorted(all_keys(batches)) == [f"edit-{i:09d}" for i in range(NUM_EDIT)]


def test_resampled_is_infinite_and_seeded(shards):
    def take(seed):
        it = t2i_batches(shards["t2i"], batch_size=4, **{**READ, "seed": seed})
        return [next(it)["keys"] for _ in range(6)]  # 24 samples out of 10: must resample

    assert take(0) == take(0)
    assert take(0) != take(1)


def test_cycle_tasks_pattern():
    tasks = [
        b["task"]
        for _, b in zip(
            range(7), cycle_tasks(iter([{"task": "t"}] * 99), iter([{"task": "e"}] * 99), 2, 1), strict=False
        )
    ]
    assert tasks == ["t", "t", "e", "t", "t", "e", "t"]
    three_to_one = cycle_tasks(iter([{"task": "t"}] * 99), iter([{"task": "e"}] * 99), 3, 1)
    assert [b["task"] for _, b in zip(range(8), three_to_one, strict=False)] == [
        "t",
        "t",
        "t",
        "e",
        "t",
        "t",
        "t",
        "e",
    ]
    every_other = cycle_tasks(iter([{"task": "t"}] * 99), iter([{"task": "e"}] * 99), 2, 1, start=1, step=2)
    assert [b["task"] for _, b in zip(range(4), every_other, strict=False)] == ["t", "t", "e", "t"]  # 1,3,5,7
    only_edit = cycle_tasks(None, iter([{"task": "e"}] * 3), 0, 2)
    assert [b["task"] for b in only_edit] == ["e", "e", "e"]  # stops when the stream ends
    with pytest.raises(ValueError, match="not both 0"):
        next(cycle_tasks(None, None, 0, 0))


def test_task_cycle_dataset_pattern(shards):
    ds = TaskCycleDataset(shards["t2i"], shards["edit"], 2, 64, 32, 0, 8, t2i_per_cycle=2, edit_per_cycle=1)
    tasks = [b["task"] for _, b in zip(range(6), ds, strict=False)]
    assert tasks == ["t2i", "t2i", "edit", "t2i", "t2i", "edit"]


def test_task_cycle_survives_dataloader_workers(shards):
    """The loader interleaves workers batch by batch; the global order must still be the exact cycle."""
    ds = TaskCycleDataset(shards["t2i"], shards["edit"], 2, 64, 32, 0, 8, t2i_per_cycle=2, edit_per_cycle=1)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    tasks = [b["task"] for _, b in zip(range(9), loader, strict=False)]
    assert tasks == ["t2i", "t2i", "edit"] * 3


def test_node_split_is_disjoint_and_complete(shards, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        per_rank.append(set(all_keys(t2i_batches(shards["t2i"], batch_size=3, resampled=False, **READ))))
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == {f"t2i-{i:09d}" for i in range(NUM_T2I)}


def test_dataloader_workers_cover_each_sample_once(shards):
    ds = TaskCycleDataset(
        shards["t2i"], [], 3, 64, 32, 0, 8, t2i_per_cycle=1, edit_per_cycle=0, resampled=False
    )
    keys = all_keys(DataLoader(ds, batch_size=None, num_workers=2))
    assert sorted(keys) == [f"t2i-{i:09d}" for i in range(NUM_T2I)]


def _png(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (255, 255, 255)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return [str(path)]


def test_corrupt_samples_are_skipped_and_counted(tmp_path, caplog):
    meta = json.dumps({"task": "t2i", "caption": "a red circle"}).encode()
    urls = _tar(
        tmp_path / "t2i-000000.tar",
        [
            {"__key__": "good1", "png": _png(), "json": meta},
            {"__key__": "badimage", "png": b"not a png", "json": meta},
            {"__key__": "badjson", "png": _png(), "json": b"{nope"},
            {"__key__": "nocaption", "png": _png(), "json": b'{"task": "t2i"}'},
            {"__key__": "noimage", "json": meta},
            {"__key__": "good2", "png": _png(), "json": meta},
        ],
    )
    skips = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="deepgen.data.shards"):
        batches = list(t2i_batches(urls, batch_size=8, resampled=False, skips=skips, **READ))
    assert sorted(all_keys(batches)) == ["good1", "good2"]
    assert skips.count == 4
    assert skips.reasons == {"bad_image": 1, "bad_json": 2, "missing_key": 1}
    for key in ("badimage", "badjson", "nocaption", "noimage"):
        assert key in caplog.text


def test_truncated_shard_is_not_fatal(tmp_path, shards):
    data = Path(shards["t2i"][0]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    skips = SkipCounter()
    batches = list(
        t2i_batches(
            [str(tmp_path / "cut.tar"), shards["t2i"][1]], batch_size=4, resampled=False, skips=skips, **READ
        )
    )
    keys = all_keys(batches)
    assert {f"t2i-{i:09d}" for i in range(4, 8)} <= set(keys)  # the intact shard is read in full
    assert skips.count >= 1


def test_mixed_target_sizes_raise(tmp_path):
    meta = json.dumps({"task": "t2i", "caption": "x"}).encode()
    urls = _tar(
        tmp_path / "t2i-000000.tar",
        [
            {"__key__": "a", "png": _png((64, 64)), "json": meta},
            {"__key__": "b", "png": _png((128, 32)), "json": meta},
        ],
    )
    with pytest.raises(ValueError, match="differ in size"):
        list(t2i_batches(urls, batch_size=2, resampled=False, **{**READ, "shuffle_buffer": 0}))


def test_user_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        shard_urls(tmp_path / "missing_dir", "t2i-*.tar")
    with pytest.raises(FileNotFoundError, match="no shards matching"):
        shard_urls(tmp_path, "t2i-*.tar")
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        t2i_batches([str(tmp_path / "nope.tar")], batch_size=2, **READ)
    with pytest.raises(ValueError, match="no edit shard urls"):
        TaskCycleDataset([], [], 2, 64, 32, 0, 8, t2i_per_cycle=0, edit_per_cycle=1)
