import json

import pytest
import webdataset as wds

from deepgen.data.schema import SCHEMA_VERSION, SchemaError, check_meta, source_members
from deepgen.data.writer import count_samples, json_bytes, shard_name, write_manifest, write_shard


def samples(n, bad_at=None):
    for i in range(n):
        if i == bad_at:
            raise RuntimeError("source broke")
        yield {"__key__": f"s{i:03d}", "png": b"\x89PNG fake", "json": json_bytes({"caption": f"c{i}"})}


def test_shard_round_trips_and_is_reproducible(tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    assert write_shard(a, samples(5)) == write_shard(b, samples(5)) == 5
    assert a.read_bytes() == b.read_bytes()
    read = list(wds.WebDataset(str(a), shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in read] == [f"s{i:03d}" for i in range(5)]
    assert json.loads(read[0]["json"]) == {"caption": "c0", "schema_version": SCHEMA_VERSION}
    assert count_samples(a) == 5


def test_interrupted_write_leaves_nothing(tmp_path):
    path = tmp_path / shard_name("t2i", 3)
    with pytest.raises(RuntimeError):
        write_shard(path, samples(5, bad_at=2))
    assert list(tmp_path.iterdir()) == []


def test_bad_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="a.b"):
        write_shard(tmp_path / "x.tar", [{"__key__": "a.b", "png": b""}])
    with pytest.raises(ValueError, match="duplicate"):
        write_shard(tmp_path / "x.tar", [{"__key__": "k", "png": b""}, {"__key__": "k", "png": b""}])


def test_manifest_counts_every_shard(tmp_path):
    write_shard(tmp_path / shard_name("t2i", 0), samples(4))
    write_shard(tmp_path / shard_name("t2i", 1), samples(2))
    write_shard(tmp_path / shard_name("edit", 0), samples(3))
    manifest = write_manifest(tmp_path, {"source": "test"})
    assert manifest["counts"] == {"t2i": 6, "edit": 3}
    assert manifest["shards"]["t2i"] == {"t2i-000000.tar": 4, "t2i-000001.tar": 2}
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert manifest["source"] == "test" and manifest["schema_version"] == SCHEMA_VERSION


def test_schema_checks():
    assert check_meta({"caption": "x"}, "t2i") == {"caption": "x"}
    for meta, message in [
        ({"instruction": "x"}, "caption"),
        ({"caption": 3}, "caption"),
        ({"caption": "x", "task": "edit"}, "task"),
        ({"caption": "x", "category": "poetry"}, "category"),
        ({"caption": "x", "schema_version": SCHEMA_VERSION + 1}, "newer"),
        (["caption"], "object"),
    ]:
        with pytest.raises(SchemaError, match=message):
            check_meta(meta, "t2i")
    assert source_members(["src2.png", "tgt.png", "src.jpg", "src1.webp", "json"]) == [
        "src.jpg",
        "src1.webp",
        "src2.png",
    ]
