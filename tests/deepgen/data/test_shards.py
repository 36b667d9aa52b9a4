import io
import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from deepgen.config import DataConfig
from deepgen.data.shards import (
    BadDataError,
    DataHealth,
    ReadOptions,
    Source,
    TaskCycleDataset,
    cycle_tasks,
    edit_batches,
    resolve_shards,
    shard_urls,
    t2i_batches,
)
from deepgen.data.tiny_world import PALETTE, write_tiny_world_shards
from deepgen.data.writer import json_bytes

NUM_T2I, NUM_EDIT = 10, 7
INFINITE = ReadOptions.from_config(DataConfig(name="t", shards_dir="-", image_size=64, shuffle_buffer=8))
FINITE = replace(INFINITE, resampled=False)


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


def cycle_dataset(shards, *, batch_size=2, opts=INFINITE, resume=None, **cycle) -> TaskCycleDataset:
    t2i, edit = [Source("tw", shards["t2i"])], [Source("tw", shards["edit"])]
    return TaskCycleDataset(t2i, edit, batch_size=batch_size, opts=opts, resume=resume, **cycle)


def test_t2i_batch_format(shards):
    batches = list(t2i_batches(shards["t2i"], batch_size=4, opts=FINITE))
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
    batches = list(edit_batches(shards["edit"], batch_size=3, opts=FINITE))
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
        it = t2i_batches(shards["t2i"], batch_size=4, opts=replace(INFINITE, seed=seed))
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
    ds = cycle_dataset(shards, t2i_per_cycle=2, edit_per_cycle=1)
    tasks = [b["task"] for _, b in zip(range(6), ds, strict=False)]
    assert tasks == ["t2i", "t2i", "edit", "t2i", "t2i", "edit"]


def test_task_cycle_survives_dataloader_workers(shards):
    """The loader interleaves workers batch by batch; the global order must still be the exact cycle."""
    loader = DataLoader(
        cycle_dataset(shards, t2i_per_cycle=2, edit_per_cycle=1), batch_size=None, num_workers=2
    )
    tasks = [b["task"] for _, b in zip(range(9), loader, strict=False)]
    assert tasks == ["t2i", "t2i", "edit"] * 3


def test_node_split_is_disjoint_and_complete(shards, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        per_rank.append(set(all_keys(t2i_batches(shards["t2i"], batch_size=3, opts=FINITE))))
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == {f"t2i-{i:09d}" for i in range(NUM_T2I)}


def test_dataloader_workers_cover_each_sample_once(shards):
    ds = cycle_dataset(shards, t2i_per_cycle=1, edit_per_cycle=0, batch_size=3, opts=FINITE)
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


def _jpeg_truncated() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()[:300]  # a valid header, pixel data cut off


META = json_bytes({"task": "t2i", "caption": "a red circle"})


def test_each_kind_of_bad_sample_is_skipped_and_counted(tmp_path, caplog):
    urls = _tar(
        tmp_path / "t2i-000000.tar",
        [
            {"__key__": "good1", "png": _png(), "json": META},
            {"__key__": "notimage", "png": b"not a png", "json": META},
            {"__key__": "truncated", "jpg": _jpeg_truncated(), "json": META},
            {"__key__": "badjson", "png": _png(), "json": b"{nope"},
            {"__key__": "latin1", "png": _png(), "json": '{"caption": "caf\xe9"}'.encode("latin-1")},
            {"__key__": "nocaption", "png": _png(), "json": b'{"task": "t2i"}'},
            {"__key__": "noimage", "json": META},
            {"__key__": "zerosize", "png": _png((1, 64)), "json": META},
            {"__key__": "elongated", "png": _png((640, 32)), "json": META},
            {"__key__": "good2", "png": _png(), "json": META},
        ],
    )
    health = DataHealth(max_bad_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="deepgen.data.shards"):
        batches = list(t2i_batches(urls, batch_size=8, opts=replace(FINITE, min_side=8), health=health))
    assert sorted(all_keys(batches)) == ["good1", "good2"]
    assert health.reasons == {"bad_image": 2, "bad_json": 1, "bad_text": 1, "missing_field": 2, "bad_size": 2}
    assert health.seen[urls[0]] == 10 and health.bad[urls[0]] == 8
    for key in (
        "notimage",
        "truncated",
        "badjson",
        "latin1",
        "nocaption",
        "noimage",
        "zerosize",
        "elongated",
    ):
        assert key in caplog.text


def test_zero_size_image_is_skipped(tmp_path):
    # PIL cannot write a 0-px PNG; a header claiming 0x64 is what a broken writer leaves.
    png = bytearray(_png((1, 64)))
    png[16:20] = (0).to_bytes(4, "big")  # IHDR width
    urls = _tar(tmp_path / "t2i-000000.tar", [{"__key__": "z", "png": bytes(png), "json": META}])
    health = DataHealth(max_bad_fraction=1.0)
    assert list(t2i_batches(urls, batch_size=2, opts=FINITE, health=health)) == []
    assert health.count == 1 and set(health.reasons) <= {"bad_image", "bad_size"}


def test_too_many_bad_samples_stop_the_run_naming_the_shard(tmp_path):
    samples = [{"__key__": f"k{i}", "png": b"junk" if i % 2 else _png(), "json": META} for i in range(40)]
    urls = _tar(tmp_path / "t2i-000007.tar", samples)
    with pytest.raises(BadDataError, match=r"t2i-000007\.tar.*max_bad_fraction=0\.1"):
        list(t2i_batches(urls, batch_size=4, opts=FINITE))


def test_newer_schema_version_is_refused_naming_the_shard(tmp_path):
    meta = json.dumps({"task": "t2i", "caption": "x", "schema_version": 99}).encode()
    urls = _tar(tmp_path / "t2i-000000.tar", [{"__key__": "a", "png": _png(), "json": meta}])
    with pytest.raises(ValueError, match=r"t2i-000000\.tar.*schema_version 99"):
        list(t2i_batches(urls, batch_size=1, opts=FINITE))


def test_truncated_shard_is_not_fatal(tmp_path, shards):
    data = Path(shards["t2i"][0]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    health = DataHealth()
    urls = [str(tmp_path / "cut.tar"), shards["t2i"][1]]
    keys = all_keys(t2i_batches(urls, batch_size=4, opts=FINITE, health=health))
    assert {f"t2i-{i:09d}" for i in range(4, 8)} <= set(keys)  # the intact shard is read in full
    assert health.count >= 1  # the cut-off sample (missing members) or a tar read error


def test_bucketing_makes_dense_batches_of_one_size(tmp_path):
    sizes = [(64, 64), (128, 32), (64, 64), (128, 32), (64, 64), (128, 32)]
    samples = [{"__key__": f"k{i}", "png": _png(s), "json": META} for i, s in enumerate(sizes)]
    urls = _tar(tmp_path / "t2i-000000.tar", samples)
    opts = replace(FINITE, shuffle_buffer=0)
    batches = list(t2i_batches(urls, batch_size=2, opts=opts))
    assert [tuple(b["images"].shape[-2:]) for b in batches] == [(64, 64), (32, 128)] * 2  # 2 short leftovers
    assert batches[0]["keys"] == ["k0", "k2"] and batches[1]["keys"] == ["k1", "k3"]
    with pytest.raises(ValueError, match="differ in size.*data.bucketing=true"):
        list(t2i_batches(urls, batch_size=2, opts=replace(opts, bucketing=False)))


def test_edit_sources_are_resized_independently(tmp_path):
    meta = json_bytes({"task": "edit", "instruction": "merge them"})
    sample = {
        "__key__": "e",
        "src.png": _png((128, 32)),
        "src1.png": _png((64, 64)),
        "tgt.png": _png(),
        "json": meta,
    }
    urls = _tar(tmp_path / "edit-000000.tar", [sample])
    (batch,) = edit_batches(urls, batch_size=1, opts=FINITE)
    assert [tuple(s.shape) for s in batch["sources"][0]] == [(3, 32, 128), (3, 64, 64)]
    assert batch["targets"].shape == (1, 3, 64, 64)


def _dataset(tmp_path, name, n):
    samples = [{"__key__": f"{name}{i}", "png": _png(), "json": META} for i in range(n)]
    return Source(name, _tar(tmp_path / f"{name}.tar", samples))


def test_mixture_follows_the_weights(tmp_path):
    big, small = _dataset(tmp_path, "big", 30), _dataset(tmp_path, "small", 30)
    ds = TaskCycleDataset(
        [replace(big, weight=3.0), small], [], batch_size=4, opts=INFINITE, t2i_per_cycle=1, edit_per_cycle=0
    )
    names = [n for _, b in zip(range(100), ds, strict=False) for n in b["datasets"]]
    assert 0.68 < names.count("big") / len(names) < 0.82  # 400 draws of p = 0.75
    for _, batch in zip(range(5), ds, strict=False):
        assert all(k.startswith(n) for k, n in zip(batch["keys"], batch["datasets"], strict=True))


def test_finite_mixture_reads_every_sample_once(tmp_path):
    a, b = _dataset(tmp_path, "a", 7), _dataset(tmp_path, "b", 5)
    ds = TaskCycleDataset([a, b], [], batch_size=3, opts=FINITE, t2i_per_cycle=1, edit_per_cycle=0)
    keys = all_keys(ds)
    assert sorted(keys) == sorted([f"a{i}" for i in range(7)] + [f"b{i}" for i in range(5)])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly(shards, num_workers):
    """Stop after k batches, rebuild from the last positions: the same batches as one uninterrupted run."""

    def loader(resume=None):
        ds = cycle_dataset(shards, t2i_per_cycle=2, edit_per_cycle=1, resume=resume)
        return DataLoader(ds, batch_size=None, num_workers=num_workers)

    full = [b["keys"] for _, b in zip(range(12), loader(), strict=False)]
    positions = {}
    for _, b in zip(range(5), loader(), strict=False):
        position = dict(b["position"])
        positions[position.pop("stream")] = position
    resumed = [
        b["keys"] for _, b in zip(range(7), loader({"batches": 5, "positions": positions}), strict=False)
    ]
    assert full[5:] == resumed


def test_resolve_shards_handles_dirs_globs_and_remote_urls(shards, tmp_path):
    shard_dir = str(Path(shards["t2i"][0]).parent)
    assert resolve_shards(shard_dir, "t2i") == shards["t2i"]
    assert resolve_shards(f"{shard_dir}/t2i-00000[01].tar", "t2i") == shards["t2i"][:2]
    remote = resolve_shards("pipe:curl -s https://host/t2i-{000000..000002}.tar", "t2i")
    assert remote == [f"pipe:curl -s https://host/t2i-00000{i}.tar" for i in range(3)]
    # A pipe: url streams like a file (here `cat`; `aws s3 cp ... -` or `curl` in practice).
    piped = [f"pipe:cat {u}" for u in shards["t2i"]]
    assert sorted(all_keys(t2i_batches(piped, batch_size=4, opts=FINITE))) == [
        f"t2i-{i:09d}" for i in range(NUM_T2I)
    ]


def test_user_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        shard_urls(tmp_path / "missing_dir", "t2i-*.tar")
    with pytest.raises(FileNotFoundError, match="no shards matching"):
        shard_urls(tmp_path, "t2i-*.tar")
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        t2i_batches([str(tmp_path / "nope.tar")], batch_size=2, opts=FINITE)
    with pytest.raises(ValueError, match="no edit shard urls"):
        TaskCycleDataset([], [], batch_size=2, opts=FINITE, t2i_per_cycle=0, edit_per_cycle=1)
