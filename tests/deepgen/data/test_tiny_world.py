import io
import json
import random
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from deepgen.data import tiny_world as tw
from deepgen.data.tiny_world import (
    PALETTE,
    caption_scene,
    random_edit,
    random_scene,
    relation,
    render_scene,
    write_tiny_world_shards,
)


def assert_truthful(spec: dict) -> None:
    """The spec describes exactly what render_scene draws: colours at centres, inside, no overlap."""
    img = render_scene(spec)
    assert img.mode == "RGB" and img.size == (spec["width"], spec["height"])
    objs = spec["objects"]
    assert 1 <= len(objs) <= tw.MAX_OBJECTS
    for o in objs:
        x, y = o["center"]
        r = o["radius"]
        assert o["shape"] in tw.SHAPES and o["color"] in PALETTE and o["size"] in tw.SIZES
        lo, hi = tw.radius_range(o["size"], spec["width"], spec["height"])
        assert lo <= r <= hi
        assert x - r >= 0 and x + r < spec["width"] and y - r >= 0 and y + r < spec["height"]
        assert img.getpixel((x, y)) == PALETTE[o["color"]]
    for i, a in enumerate(objs):
        for b in objs[i + 1 :]:
            reach = a["radius"] + b["radius"] + tw.MIN_GAP
            dx, dy = abs(a["center"][0] - b["center"][0]), abs(a["center"][1] - b["center"][1])
            assert dx >= reach or dy >= reach, (a, b)
    # Nothing but the background and the objects' colours is drawn (no anti-aliasing).
    allowed = {tuple(spec["background"])} | {PALETTE[o["color"]] for o in objs}
    assert {c for _, c in img.getcolors(4096)} <= allowed


def scenes(n: int, seed: int = 0, size: tuple[int, int] = (64, 64)):
    rng = random.Random(seed)
    return [random_scene(rng, *size) for _ in range(n)], rng


def test_random_scene_is_truthful_and_json_serialisable():
    specs, _ = scenes(300)
    for spec in specs:
        assert_truthful(spec)
        assert json.loads(json.dumps(spec)) == spec
    assert {len(s["objects"]) for s in specs} == {1, 2, 3}


@pytest.mark.parametrize("size", [(32, 32), (128, 128), (160, 48)])
def test_random_scene_other_sizes(size):
    specs, _ = scenes(50, seed=1, size=size)
    for spec in specs:
        assert_truthful(spec)


def test_render_is_deterministic_and_large_objects_visible():
    rng = random.Random(5)
    spec = random_scene(rng)
    assert render_scene(spec).tobytes() == render_scene(json.loads(json.dumps(spec))).tobytes()
    big = {"width": 64, "height": 64, "background": [255, 255, 255], "objects": []}
    big["objects"].append(
        {"shape": "square", "color": "blue", "size": "large", "center": [32, 32], "radius": 12}
    )
    img = render_scene(big)
    assert {c: n for n, c in img.getcolors()}[PALETTE["blue"]] == 25 * 25


def test_same_seed_same_scene():
    assert scenes(20, seed=3)[0] == scenes(20, seed=3)[0]
    assert scenes(20, seed=3)[0] != scenes(20, seed=4)[0]


REL = re.compile(
    r"(?:a|an) (?:(?:small|large) )?(\w+) (circle|square|triangle) (to the left of|to the right of|above|below) "
    r"(?:a|an) (?:(?:small|large) )?(\w+) (circle|square|triangle)"
)


def _find(spec, color, shape):
    matches = [o for o in spec["objects"] if o["color"] == color and o["shape"] == shape]
    assert len(matches) == 1
    return matches[0]


def test_captions_mention_every_object_and_relations_agree_with_centres():
    specs, rng = scenes(600, seed=2)
    relations = 0
    for spec in specs:
        caption = caption_scene(spec, rng)
        for o in spec["objects"]:
            assert o["color"] in caption and o["shape"] in caption, (caption, spec)
        for o in spec["objects"]:  # a stated size is that object's size
            for size in tw.SIZES:
                if f"{size} {o['color']} {o['shape']}" in caption:
                    assert any(
                        p["size"] == size
                        for p in spec["objects"]
                        if (p["color"], p["shape"]) == (o["color"], o["shape"])
                    )
        m = REL.search(caption)
        if m:
            relations += 1
            a, b = _find(spec, m[1], m[2]), _find(spec, m[4], m[5])
            dx, dy = b["center"][0] - a["center"][0], b["center"][1] - a["center"][1]
            expected = {
                "to the left of": dx > 0 and abs(dx) >= 2 * abs(dy),
                "to the right of": dx < 0 and abs(dx) >= 2 * abs(dy),
                "above": dy > 0 and abs(dy) >= 2 * abs(dx),
                "below": dy < 0 and abs(dy) >= 2 * abs(dx),
            }
            assert expected[m[3]], (caption, spec)
    assert relations > 20


def test_relation_only_when_unambiguous():
    spec = {"width": 64, "height": 64}
    a = {"center": [10, 30]}
    assert relation(spec, a, {"center": [50, 34]}) == "to the left of"
    assert relation(spec, {"center": [50, 34]}, a) == "to the right of"
    assert relation(spec, a, {"center": [12, 55]}) == "above"
    assert relation(spec, a, {"center": [40, 55]}) is None  # diagonal


def test_caption_counts_identical_objects():
    objs = [
        {"shape": "circle", "color": "red", "size": "small", "center": [10, 10], "radius": 6},
        {"shape": "circle", "color": "red", "size": "large", "center": [40, 40], "radius": 12},
    ]
    spec = {"width": 64, "height": 64, "background": [255, 255, 255], "objects": objs}
    rng = random.Random(0)
    for _ in range(20):
        caption = caption_scene(spec, rng)
        assert "two red circles" in caption
        assert "small" not in caption and "large" not in caption  # sizes differ: never stated for the pair


def test_single_object_position_is_true():
    obj = {"shape": "triangle", "color": "green", "size": "small", "center": [8, 8], "radius": 6}
    spec = {"width": 64, "height": 64, "background": [255, 255, 255], "objects": [obj]}
    rng = random.Random(0)
    captions = {caption_scene(spec, rng) for _ in range(50)}
    assert any("in the top left" in c for c in captions)
    assert not any(w in c for c in captions for w in ("right", "bottom", "center"))


def assert_changes_only_inside_edited_boxes(source: dict, target: dict, info: dict) -> None:
    """Pixels that differ between the two renders lie in the edited object's box (before or after)."""
    changed = np.any(np.array(render_scene(source)) != np.array(render_scene(target)), axis=-1)
    allowed = np.zeros_like(changed)
    i = info["object"]
    edited = [target["objects"][i]] if info["kind"] == "add" else [source["objects"][i]]
    if info["kind"] in ("recolour", "move"):
        edited.append(target["objects"][i])
    for o in edited:
        (x, y), r = o["center"], o["radius"]
        allowed[y - r : y + r + 1, x - r : x + r + 1] = True
    assert changed.any() and not (changed & ~allowed).any(), info


def test_edits_change_exactly_what_edit_info_says():
    specs, rng = scenes(400, seed=7)
    kinds = set()
    for source in specs:
        before = json.dumps(source)
        try:
            instruction, target, info = random_edit(source, rng)
        except ValueError:
            continue
        assert json.dumps(source) == before  # source untouched
        kinds.add(info["kind"])
        assert_truthful(target)
        assert render_scene(source).tobytes() != render_scene(target).tobytes()
        assert_changes_only_inside_edited_boxes(source, target, info)
        src, tgt, i = source["objects"], target["objects"], info["object"]
        if info["kind"] != "add":
            obj = src[i]
            assert [(o["color"], o["shape"]) for o in src].count((obj["color"], obj["shape"])) == 1
            assert f"the {obj['color']} {obj['shape']}" in instruction
        if info["kind"] == "recolour":
            assert info["old_color"] == obj["color"] != info["new_color"] == tgt[i]["color"]
            assert info["new_color"] in instruction
            assert tgt[:i] + tgt[i + 1 :] == src[:i] + src[i + 1 :]
            assert {**tgt[i], "color": obj["color"]} == obj
        elif info["kind"] == "remove":
            assert tgt == src[:i] + src[i + 1 :]
        elif info["kind"] == "add":
            assert i == len(src) and tgt[:i] == src
            new = tgt[i]
            assert f"{new['size']} {new['color']} {new['shape']}" in instruction
        elif info["kind"] == "move":
            dx, dy = info["offset"]
            assert (dx == 0) != (dy == 0)
            direction = {(1, 0): "right", (-1, 0): "left", (0, 1): "down", (0, -1): "up"}
            assert direction[((dx > 0) - (dx < 0), (dy > 0) - (dy < 0))] == info["direction"]
            assert info["direction"] in instruction
            assert tgt[i]["center"] == [obj["center"][0] + dx, obj["center"][1] + dy]
            assert {**tgt[i], "center": obj["center"]} == obj
            assert tgt[:i] + tgt[i + 1 :] == src[:i] + src[i + 1 :]
    assert kinds == {"recolour", "remove", "add", "move"}


# ---------------------------------------------------------------------------------------------------------
# Shard writer


def _build(path, seed=0):
    return write_tiny_world_shards(path, num_t2i=10, num_edit=6, samples_per_shard=4, seed=seed)


def test_shards_manifest_and_determinism(tmp_path):
    m1 = _build(tmp_path / "a")
    _build(tmp_path / "b")
    _build(tmp_path / "c", seed=1)
    assert m1["shards"] == {
        "t2i": ["t2i-000000.tar", "t2i-000001.tar", "t2i-000002.tar"],
        "edit": ["edit-000000.tar", "edit-000001.tar"],
    }
    assert m1["counts"] == {"t2i": 10, "edit": 6} and m1["seed"] == 0 and m1["image_size"] == 64
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == m1
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(m1["shards"]["t2i"] + m1["shards"]["edit"] + ["manifest.json"])
    for name in m1["shards"]["t2i"] + m1["shards"]["edit"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "t2i-000000.tar").read_bytes() != (
        tmp_path / "c" / "t2i-000000.tar"
    ).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temporary leftovers


def test_shard_samples_match_schema(tmp_path):
    _build(tmp_path / "s")
    with tarfile.open(tmp_path / "s" / "edit-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert sorted(members)[:3] == ["edit-000000000.json", "edit-000000000.src.png", "edit-000000000.tgt.png"]
    meta = json.loads(members["edit-000000000.json"])
    assert meta["task"] == "edit" and set(meta) == {
        "task",
        "instruction",
        "source_spec",
        "target_spec",
        "edit",
    }
    src = Image.open(io.BytesIO(members["edit-000000000.src.png"]))
    assert src.tobytes() == render_scene(meta["source_spec"]).tobytes()
    tgt = Image.open(io.BytesIO(members["edit-000000000.tgt.png"]))
    assert tgt.tobytes() == render_scene(meta["target_spec"]).tobytes()


def test_interrupted_build_leaves_no_directory(tmp_path, monkeypatch):
    def boom(seed, index, image_size=64):
        raise KeyboardInterrupt

    monkeypatch.setattr(tw, "make_edit_sample", boom)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="out"):
        _build(tmp_path / "out")
    _build(tmp_path / "empty_ok")  # an existing empty directory is fine
    (tmp_path / "empty").mkdir()
    _build(tmp_path / "empty")
    assert (tmp_path / "empty" / "manifest.json").exists()
