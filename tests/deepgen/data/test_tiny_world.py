import io
import json
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepgen.data import tiny_world as tw
from deepgen.data.schema import SCHEMA_VERSION, check_meta
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
        "t2i": {"t2i-000000.tar": 4, "t2i-000001.tar": 4, "t2i-000002.tar": 2},
        "edit": {"edit-000000.tar": 4, "edit-000001.tar": 2},
    }
    assert m1["counts"] == {"t2i": 10, "edit": 6} and m1["seed"] == 0 and m1["image_size"] == 64
    assert m1["categories"]["t2i"] == {"general": 10, "text_rendering": 0, "reasoning": 0}
    assert m1["schema_version"] == SCHEMA_VERSION and m1["eval"]["files"] == {}
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == m1
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted([*m1["shards"]["t2i"], *m1["shards"]["edit"], "manifest.json"])
    for name in [*m1["shards"]["t2i"], *m1["shards"]["edit"]]:
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
        "category",
        "instruction",
        "source_spec",
        "target_spec",
        "edit",
        "schema_version",
    }
    assert meta["category"] == "general" and meta["schema_version"] == SCHEMA_VERSION
    src = Image.open(io.BytesIO(members["edit-000000000.src.png"]))
    assert src.tobytes() == render_scene(meta["source_spec"]).tobytes()
    tgt = Image.open(io.BytesIO(members["edit-000000000.tgt.png"]))
    assert tgt.tobytes() == render_scene(meta["target_spec"]).tobytes()


def test_interrupted_build_leaves_no_directory(tmp_path, monkeypatch):
    def boom(seed, index, image_size=64, category="general"):
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


def test_general_t2i_samples_unchanged_by_categories_and_holdout():
    """General T2I training data is what it was before categories and the holdout existed."""
    expected = [
        "a picture of a yellow square and a red square",
        "a large red triangle to the left of a small blue square on a white background",
        "a large blue circle to the right of an orange triangle on a white background",
    ]
    metas = [json.loads(tw.make_t2i_sample(0, i)["json"]) for i in range(3)]
    assert [m["caption"] for m in metas] == expected
    assert metas[0]["spec"]["objects"] == [
        {"center": [33, 27], "color": "yellow", "radius": 6, "shape": "square", "size": "small"},
        {"center": [18, 50], "color": "red", "radius": 12, "shape": "square", "size": "large"},
    ]


# ---------------------------------------------------------------------------------------------------------
# Reasoning


def png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_facts_resolve_and_give_nothing_away():
    assert tw.COLOR_FACTS["a ripe banana"] == "yellow" and tw.COLOR_FACTS["grass"] == "green"
    assert tw.COLOR_FACTS["the sky on a clear day"] == "blue" and tw.COLOR_FACTS["a stop sign"] == "red"
    assert tw.COLOR_FACTS["a carrot"] == "orange" and tw.COLOR_FACTS["an eggplant"] == "purple"
    assert tw.SHAPE_FACTS["a wheel"] == "circle" and tw.SHAPE_FACTS["one face of a die"] == "square"
    assert tw.SHAPE_FACTS["a slice of pizza"] == "triangle"
    for facts, values in ((tw.COLOR_FACTS, tw.COLORS), (tw.SHAPE_FACTS, tw.SHAPES)):
        assert all(sum(v == value for v in facts.values()) >= 2 for value in values)
        assert set(facts.values()) == set(values)
    for fact in [*tw.COLOR_FACTS, *tw.SHAPE_FACTS]:  # no colour or shape word leaks the answer
        assert not set(fact.split()) & {*tw.COLORS, *tw.SHAPES}, fact


def test_reasoning_t2i_samples_resolve_to_their_spec():
    forms = set()
    for i in range(30):
        sample = tw.make_t2i_sample(0, i, category="reasoning")
        meta = json.loads(sample["json"])
        assert sample["__key__"] == f"t2i-reasoning-{i:09d}" and meta["category"] == "reasoning"
        assert_truthful(meta["spec"])
        (obj,) = meta["spec"]["objects"]
        facts = meta["facts"]
        forms.add(tuple(sorted(facts)))
        for kind, table, field in (("color", tw.COLOR_FACTS, "color"), ("shape", tw.SHAPE_FACTS, "shape")):
            if kind in facts:
                assert table[facts[kind]] == obj[field] and facts[kind] in meta["caption"]
            else:
                assert obj[field] in meta["caption"]
        assert meta["resolved_caption"] == f"{tw._article(obj['color'])} {obj['color']} {obj['shape']}"
        img = png(sample["png"])
        assert img.getpixel(tuple(obj["center"])) == PALETTE[obj["color"]]
        assert img.tobytes() == render_scene(meta["spec"]).tobytes()
    assert forms == {("color",), ("shape",), ("color", "shape")}


def test_reasoning_edits_recolour_to_the_fact():
    for i in range(20):
        sample = tw.make_edit_sample(0, i, category="reasoning")
        meta = json.loads(sample["json"])
        info, source, target = meta["edit"], meta["source_spec"], meta["target_spec"]
        assert sample["__key__"] == f"edit-reasoning-{i:09d}" and meta["category"] == "reasoning"
        assert info["kind"] == "recolour" and tw.COLOR_FACTS[info["fact"]] == info["new_color"]
        obj = source["objects"][info["object"]]
        assert info["old_color"] == obj["color"] != info["new_color"]
        assert f"the {obj['color']} {obj['shape']} the colour of {info['fact']}" in meta["instruction"]
        assert meta["resolved_instruction"] == f"make the {obj['color']} {obj['shape']} {info['new_color']}"
        assert_truthful(target)
        assert_changes_only_inside_edited_boxes(source, target, info)
        tgt = png(sample["tgt.png"])
        assert tgt.getpixel(tuple(obj["center"])) == PALETTE[info["new_color"]]
        assert png(sample["src.png"]).tobytes() == render_scene(source).tobytes()
        assert tgt.tobytes() == render_scene(target).tobytes()


# ---------------------------------------------------------------------------------------------------------
# Text rendering


def assert_sign_truthful(spec: dict) -> None:
    """Outside the sign only background; inside it only sign and text colours, text inside text_box."""
    img = np.array(render_scene(spec))
    sign = spec["sign"]
    x0, y0, x1, y1 = sign["box"]
    tx0, ty0, tx1, ty1 = sign["text_box"]
    pad = tw.sign_padding(spec["height"])
    assert x0 + pad <= tx0 <= tx1 <= x1 - pad and y0 + pad <= ty0 <= ty1 <= y1 - pad
    inside = np.zeros(img.shape[:2], bool)
    inside[y0 : y1 + 1, x0 : x1 + 1] = True
    assert (img[~inside] == spec["background"]).all()
    text_rgb = tw.TEXT_COLORS[sign["text_color"]]
    is_sign = (img == PALETTE[sign["color"]]).all(-1)
    is_text = (img == text_rgb).all(-1) & inside
    assert (is_sign | is_text)[inside].all()
    rows, cols = np.nonzero(is_text)
    assert len(rows) > 20  # the word is drawn
    assert tx0 <= cols.min() and cols.max() <= tx1 and ty0 <= rows.min() and rows.max() <= ty1
    assert is_sign[y0, x0] and is_sign[y1, x1]


def test_text_rendering_samples_are_wide_signs():
    for i in range(20):
        sample = tw.make_t2i_sample(0, i, category="text_rendering")
        meta = json.loads(sample["json"])
        spec, sign = meta["spec"], meta["spec"]["sign"]
        assert sample["__key__"] == f"t2i-text_rendering-{i:09d}" and meta["category"] == "text_rendering"
        assert png(sample["png"]).size == (128, 64) and (spec["width"], spec["height"]) == (128, 64)
        assert spec["objects"] == [] and sign["text"] in tw.WORDS
        assert f'"{sign["text"]}"' in meta["caption"] and f"{sign['color']} sign" in meta["caption"]
        assert sign["text_color"] == tw.SIGN_TEXT_COLOR[sign["color"]]
        assert_sign_truthful(spec)
        assert png(sample["png"]).tobytes() == render_scene(json.loads(json.dumps(spec))).tobytes()
    assert tw.SIGN_TEXT_COLOR["yellow"] == "black" and tw.SIGN_TEXT_COLOR["blue"] == "white"


@pytest.mark.parametrize("size", [32, 64, 128])
def test_every_word_fits_every_sign(size):
    rng = random.Random(size)
    for word in tw.WORDS:
        spec = tw.random_sign_scene(rng, 2 * size, size)
        spec["sign"] = tw.layout_sign(
            spec["sign"]["color"], spec["sign"]["box"], word, spec["sign"]["font_size"]
        )
        assert_sign_truthful(spec)


def test_text_edits_change_only_the_word():
    for i in range(10):
        meta = json.loads(tw.make_edit_sample(0, i, category="text_rendering")["json"])
        info, src, tgt = meta["edit"], meta["source_spec"]["sign"], meta["target_spec"]["sign"]
        assert info == {"kind": "retext", "old_text": src["text"], "new_text": tgt["text"]}
        assert src["text"] != tgt["text"] and f'"{src["text"]}"' in meta["instruction"]
        assert f'"{tgt["text"]}"' in meta["instruction"]
        assert {**tgt, "text": src["text"], "text_box": src["text_box"]} == src
        assert_sign_truthful(meta["target_spec"])


# ---------------------------------------------------------------------------------------------------------
# Held-out evaluation prompts

PROMPT_FIELD = {"t2i": "caption", "edit": "instruction"}


def test_holdout_is_stable_and_every_edit_kind_has_held_out_keys():
    assert tw.holdout_split("a red circle") == tw.holdout_split("a red circle")
    objects = [f"the {c} {s}" for c in tw.COLORS for s in tw.SHAPES]
    keys = {
        "recolour": [f"make {o} {c}" for o in objects for c in tw.COLORS if c not in o],
        "remove": [f"remove {o}" for o in objects],
        "add": [f"add {tw._article(z)} {z} {o[4:]}" for o in objects for z in tw.SIZES],
        "move": [f"move {o} {d}" for o in objects for d in tw.MOVE_DIRECTIONS],
    }
    for kind, ks in keys.items():
        assert {tw.holdout_split(k) for k in ks} == {"train", "eval"}, kind
    many = [tw.holdout_split(f"prompt {i}") for i in range(4000)]
    assert 0.09 < many.count("eval") / len(many) < 0.16


@pytest.mark.parametrize(("task", "category"), list(tw.DRAWERS))
def test_eval_prompts_never_are_training_prompts(task, category):
    """Many more draws than a build uses: train and eval prompt strings stay disjoint."""
    exclude = tw.general_t2i_train_keys(0, 300) if (task, category) in tw.UNFILTERED_TRAIN else frozenset()
    train = {tw.draw_sample_meta(task, category, "train", 0, i)[PROMPT_FIELD[task]] for i in range(300)}
    held = {
        tw.draw_sample_meta(task, category, "eval", 0, i, exclude=exclude)[PROMPT_FIELD[task]]
        for i in range(60)
    }
    assert len(held) > 20 and not train & held


def read_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> member -> bytes over all shards in a directory."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, member = m.name.split(".", 1)
                samples.setdefault(key, {})[member] = tar.extractfile(m).read()
    return samples


ALL_COUNTS = dict(
    num_t2i=12,
    num_edit=8,
    num_reasoning_t2i=8,
    num_text_t2i=8,
    num_reasoning_edit=6,
    num_text_edit=6,
    num_eval_per_split=10,
    samples_per_shard=16,
)


@pytest.fixture(scope="module")
def full_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    manifest = write_tiny_world_shards(root / "a", **ALL_COUNTS)
    write_tiny_world_shards(root / "b", **ALL_COUNTS)
    return root, manifest


def test_full_build_samples_follow_the_schema(full_build):
    root, manifest = full_build
    samples = read_samples(root / "a")
    assert manifest["counts"] == {"t2i": 28, "edit": 20} and len(samples) == 48
    assert manifest["shards"]["t2i"] == {"t2i-000000.tar": 16, "t2i-000001.tar": 12}
    assert "mixed" in manifest["layout"]
    # Categories are spread through the shards, not written one after another.
    first_shard = [k for k in samples if k.startswith("t2i")][:16]
    assert {k.split("-")[1] for k in first_shard} >= {"reasoning", "text_rendering"}
    seen = {}
    for key, sample in samples.items():
        task = key.split("-")[0]
        meta = check_meta(json.loads(sample["json"]), task)
        assert meta["schema_version"] == SCHEMA_VERSION and meta["task"] == task
        assert key == tw.sample_key(task, meta["category"], int(key.rsplit("-", 1)[1]))
        seen[(task, meta["category"])] = seen.get((task, meta["category"]), 0) + 1
        specs = {
            "png": meta.get("spec"),
            "src.png": meta.get("source_spec"),
            "tgt.png": meta.get("target_spec"),
        }
        for member, spec in specs.items():
            if spec is not None:  # spec round-trips: the stored image is exactly its render
                assert png(sample[member]).tobytes() == render_scene(spec).tobytes()
    assert seen == {(t, c): n for t, cs in manifest["categories"].items() for c, n in cs.items()}


def test_full_build_eval_split_is_disjoint_from_training(full_build):
    root, manifest = full_build
    out = root / "a"
    assert sorted(p.name for p in (out / "eval").iterdir()) == sorted(manifest["eval"]["files"])
    assert len(manifest["eval"]["files"]) == 6
    train = {json.loads(s["json"])[PROMPT_FIELD[k.split("-")[0]]] for k, s in read_samples(out).items()}
    general_keys = tw.general_t2i_train_keys(0, ALL_COUNTS["num_t2i"])
    for name, count in manifest["eval"]["files"].items():
        lines = (out / "eval" / name).read_text().splitlines()
        assert len(lines) == count == ALL_COUNTS["num_eval_per_split"]
        for line in lines:
            meta = json.loads(line)
            task = meta["task"]
            check_meta(meta, task)
            assert name == f"{task}_{meta['category']}.jsonl" and meta["key"].startswith(f"eval-{task}-")
            assert meta[PROMPT_FIELD[task]] not in train
            spec = meta.get("spec") or meta["source_spec"]  # re-renderable
            assert render_scene(spec).size == (spec["width"], spec["height"])
            if (task, meta["category"]) == ("t2i", "general"):  # not even with another prefix template
                assert not any(
                    meta["caption"] == p.format(k) for p in tw.PREFIX_TEMPLATES for k in general_keys
                )


def test_full_build_is_deterministic(full_build):
    root, _ = full_build
    files_a = sorted(p.relative_to(root / "a") for p in (root / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(root / "b") for p in (root / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 4 + 1 + 6
    for rel in files_a:
        assert (root / "a" / rel).read_bytes() == (root / "b" / rel).read_bytes(), rel


def test_interleaved_spreads_every_category_evenly():
    order = tw.interleaved({"general": 8, "text_rendering": 2, "reasoning": 4})
    assert sorted(order) == sorted(
        [("general", i) for i in range(8)]
        + [("text_rendering", i) for i in range(2)]
        + [("reasoning", i) for i in range(4)]
    )
    # Within a category the order is kept; any window of 7 holds each category in proportion (+-1).
    for category in ("general", "text_rendering", "reasoning"):
        indices = [i for c, i in order if c == category]
        assert indices == sorted(indices)
    for start in range(len(order) - 6):
        window = [c for c, _ in order[start : start + 7]]
        assert 3 <= window.count("general") <= 5 and 1 <= window.count("reasoning") <= 3
    assert tw.interleaved({"general": 3}) == [("general", 0), ("general", 1), ("general", 2)]
