"""The tiny-world scorer: exact renders of held-out specs score 1, blank and wrong images fail the
right checks, and blur plus noise (as from a small diffusion model) barely matter."""

from __future__ import annotations

import copy
from functools import cache

import numpy as np
import pytest
from PIL import Image, ImageFilter

from deepgen.data.tiny_world import COLORS, PALETTE, draw_sample_meta, relation, render_scene
from deepgen.eval.tiny_world_scorer import detect_objects, label_regions, score_edit, score_t2i

NUM = 64  # per split, as the eval files hold


@cache
def eval_samples(task: str, category: str) -> list[dict]:
    """The held-out prompts of the eval files (seed 0), regenerated: data/shards is not in git."""
    return [draw_sample_meta(task, category, "eval", 0, i) for i in range(NUM)]


def render(spec: dict) -> np.ndarray:
    return np.asarray(render_scene(spec))


def perturb(image: np.ndarray, seed: int) -> np.ndarray:
    """Slight blur and Gaussian noise of std 20/255."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float64)
    noisy = blurred + np.random.default_rng(seed).normal(0, 20, image.shape)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


def score_meta(image: np.ndarray, meta: dict) -> dict:
    if meta["task"] == "t2i":
        return score_t2i(image, meta["spec"], meta["caption"])
    return score_edit(image, meta["source_spec"], meta["target_spec"], meta["edit"])


def expected(meta: dict) -> np.ndarray:
    return render(meta["spec"] if meta["task"] == "t2i" else meta["target_spec"])


CATEGORIES = [(t, c) for t in ("t2i", "edit") for c in ("general", "reasoning", "text_rendering")]


@pytest.mark.parametrize(("task", "category"), CATEGORIES)
def test_exact_renders_score_one(task, category):
    for meta in eval_samples(task, category):
        result = score_meta(expected(meta), meta)
        assert result["score"] == 1.0 and result["correct"], (meta, result)


@pytest.mark.parametrize(("task", "category"), CATEGORIES)
def test_blank_images_score_zero(task, category):
    for meta in eval_samples(task, category)[:16]:
        blank = np.full_like(expected(meta), 255)
        result = score_meta(blank, meta)
        assert result["score"] == 0.0 and not result["correct"], (meta, result)


@pytest.mark.parametrize("category", ["general", "reasoning", "text_rendering"])
def test_returning_the_source_image_scores_zero(category):
    """Doing nothing preserves everything but must not pay: the edit part gates the score."""
    for meta in eval_samples("edit", category)[:16]:
        result = score_meta(render(meta["source_spec"]), meta)
        assert result["score"] == 0.0, (meta, result)


@pytest.mark.parametrize(("task", "category"), CATEGORIES)
def test_blurred_noisy_renders_still_score_about_one(task, category):
    """Measured over the 64 specs of each split: every T2I sample still scores 1; edits keep all their
    checks with pixel preservation >= 0.9 (mean score ~0.997: a few edge pixels flip)."""
    results = [score_meta(perturb(expected(m), i), m) for i, m in enumerate(eval_samples(task, category))]
    assert np.mean([r["correct"] for r in results]) >= 0.95
    assert np.mean([r["score"] for r in results]) >= 0.98


def test_any_image_size_is_scored_in_spec_coordinates():
    for meta in eval_samples("t2i", "general")[:16]:
        image = expected(meta)
        big = np.asarray(
            Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.BILINEAR)
        )
        assert score_meta(big, meta)["score"] == 1.0


def test_a_prompt_ignoring_image_scores_low():
    """The chance baseline: another spec's render (mean about 0.24 on general T2I, 0.42 on reasoning)."""
    metas = eval_samples("t2i", "general")
    scores = [score_meta(expected(metas[(i + 1) % NUM]), m)["score"] for i, m in enumerate(metas)]
    assert np.mean(scores) < 0.4


def two_object_scene(rel_needed: bool = True) -> dict:
    """The first held-out general T2I sample with two objects of different kinds (and a relation)."""
    for meta in eval_samples("t2i", "general"):
        objs = meta["spec"]["objects"]
        kinds = {(o["color"], o["shape"]) for o in objs}
        if len(objs) == 2 and len(kinds) == 2 and (relation(meta["spec"], *objs) or not rel_needed):
            return copy.deepcopy(meta)
    raise AssertionError("no two-object scene in the eval split")


def failed(result: dict) -> set[str]:
    return {k for k, v in result["checks"].items() if not v}


def test_recoloured_object_fails_its_colour_check():
    meta = two_object_scene()
    spec = meta["spec"]
    wrong = copy.deepcopy(spec)
    used = {o["color"] for o in spec["objects"]}
    wrong["objects"][0]["color"] = next(c for c in COLORS if c not in used)
    result = score_t2i(render(wrong), spec, meta["caption"])
    assert result["score"] < 1.0 and not result["correct"]
    assert {"object0_color", "object0_shape"} <= failed(result) and "object1_color" not in failed(result)


def test_wrong_shape_fails_its_shape_check():
    meta = two_object_scene()
    spec = meta["spec"]
    wrong = copy.deepcopy(spec)
    wrong["objects"][1]["shape"] = next(
        s for s in ("circle", "square", "triangle") if s != spec["objects"][1]["shape"]
    )
    assert failed(score_t2i(render(wrong), spec, meta["caption"])) == {"object1_shape"}


def test_a_shapeless_blob_of_the_right_colour_has_no_shape():
    """Two overlapping discs on a diagonal (as an undertrained model draws) pass colour but no shape."""
    meta = two_object_scene()
    spec = meta["spec"]
    obj = spec["objects"][0]
    image = render({**spec, "objects": spec["objects"][1:]}).copy()
    (x, y), r = obj["center"], obj["radius"]
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    blob = np.zeros(image.shape[:2], dtype=bool)
    for d in (-0.4 * r, 0.4 * r):
        blob |= (xx - x - d) ** 2 + (yy - y - d) ** 2 <= (0.6 * r) ** 2
    image[blob] = PALETTE[obj["color"]]
    assert [d.shape for d in detect_objects(image, spec) if d.color == obj["color"]] == [None]
    result = score_t2i(image, spec, meta["caption"])
    assert "object0_shape" in failed(result) and "object0_color" not in failed(result)


def test_removed_object_fails_its_check_and_the_count():
    meta = two_object_scene()
    spec = meta["spec"]
    wrong = copy.deepcopy(spec)
    del wrong["objects"][1]
    assert failed(score_t2i(render(wrong), spec, meta["caption"])) == {
        "object1_color",
        "object1_shape",
        "no_extra",
        "relation",
    }


def test_swapped_positions_fail_the_relation():
    meta = two_object_scene()
    spec = meta["spec"]
    wrong = copy.deepcopy(spec)
    a, b = wrong["objects"]
    a["center"], b["center"] = b["center"], a["center"]
    # the swap keeps the objects inside the image and apart (radii may differ: clamp to the image)
    for o in (a, b):
        o["center"] = [
            min(max(c, o["radius"] + 1), side - o["radius"] - 2)
            for c, side in zip(o["center"], (64, 64), strict=True)
        ]
    assert failed(score_t2i(render(wrong), spec, meta["caption"])) == {"relation"}


def test_extra_object_fails_no_extra():
    meta = copy.deepcopy(eval_samples("t2i", "reasoning")[0])
    spec = meta["spec"]
    wrong = copy.deepcopy(spec)
    obj = wrong["objects"][0]
    twin = dict(
        obj,
        center=[63 - obj["center"][0], 63 - obj["center"][1]],
        color="red" if obj["color"] != "red" else "blue",
    )
    wrong["objects"].append(twin)
    assert failed(score_t2i(render(wrong), spec, meta["caption"])) == {"no_extra"}


def test_size_and_region_are_checked_only_when_the_caption_states_them():
    spec = {
        "width": 64,
        "height": 64,
        "background": [255, 255, 255],
        "objects": [{"shape": "circle", "color": "red", "size": "large", "center": [12, 12], "radius": 11}],
    }
    small_elsewhere = copy.deepcopy(spec)
    small_elsewhere["objects"][0].update(size="small", radius=6, center=[50, 50])
    image = render(small_elsewhere)
    assert failed(score_t2i(image, spec, "a large red circle in the top left")) == {
        "object0_size",
        "object0_region",
    }
    assert failed(score_t2i(image, spec, "a red circle")) == set()
    assert failed(score_t2i(image, spec)) == set()


def test_wrong_sign_colour_fails_sign_color():
    meta = eval_samples("t2i", "text_rendering")[0]
    spec = meta["spec"]
    wrong = copy.deepcopy(spec)
    wrong["sign"]["color"] = next(c for c in COLORS if c != spec["sign"]["color"])
    result = score_t2i(render(wrong), spec, meta["caption"])
    assert "sign_color_ok" in failed(result) and result["score"] < 1.0
    assert result["text"] == spec["sign"]["text"] and result["sign_box"] is not None


def test_sign_colour_counts_only_on_a_sign():
    """A small patch of the sign's colour is not a sign: no check passes."""
    meta = eval_samples("t2i", "text_rendering")[0]
    spec = meta["spec"]
    image = np.full((64, 64, 3), 255, dtype=np.uint8)
    image[20:30, 20:30] = PALETTE[spec["sign"]["color"]]
    assert score_t2i(image, spec, meta["caption"])["score"] == 0.0


def test_erasing_the_word_is_not_rewriting_it():
    """A retext edit that leaves the sign blank changes the ink but fails edit_text_changed (scores 0)."""
    retexts = [m for m in eval_samples("edit", "text_rendering") if m["edit"]["kind"] == "retext"][:8]
    assert retexts
    for meta in retexts:
        sign = meta["target_spec"]["sign"]
        blank = render(meta["target_spec"]).copy()
        x0, y0, x1, y1 = sign["box"]
        blank[y0 : y1 + 1, x0 : x1 + 1] = PALETTE[sign["color"]]
        result = score_meta(blank, meta)
        assert "edit_text_changed" in failed(result) and result["score"] == 0.0, result


def test_edit_that_disturbs_an_untouched_object_loses_preservation():
    for meta in eval_samples("edit", "general"):
        if meta["edit"]["kind"] == "recolour" and len(meta["source_spec"]["objects"]) >= 2:
            break
    target = copy.deepcopy(meta["target_spec"])
    other = next(i for i in range(len(target["objects"])) if i != meta["edit"]["object"])
    target["objects"][other]["color"] = next(
        c for c in COLORS if c not in {o["color"] for o in target["objects"]}
    )
    result = score_meta(render(target), meta)
    assert f"kept{other}" in failed(result) and 0 < result["score"] < 1 and result["preserve_pixels"] < 0.9


def test_move_in_the_wrong_direction_fails_edit_moved():
    meta = next(m for m in eval_samples("edit", "general") if m["edit"]["kind"] == "move")
    source, info = meta["source_spec"], meta["edit"]
    wrong = copy.deepcopy(source)
    obj = wrong["objects"][info["object"]]
    obj["center"] = [c - d for c, d in zip(obj["center"], info["offset"], strict=True)]
    assert "edit_moved" in failed(score_meta(render(wrong), meta))


def test_label_regions_matches_flood_fill():
    classes = np.random.default_rng(0).integers(0, 3, (23, 17)).astype(np.int8)
    labels = label_regions(classes)
    seen = np.zeros(classes.shape, dtype=bool)
    for y, x in zip(*np.nonzero(classes), strict=True):
        if seen[y, x]:
            continue
        region, stack = set(), [(y, x)]
        while stack:
            p = stack.pop()
            if p in region:
                continue
            region.add(p)
            for q in ((p[0] + 1, p[1]), (p[0] - 1, p[1]), (p[0], p[1] + 1), (p[0], p[1] - 1)):
                if 0 <= q[0] < 23 and 0 <= q[1] < 17 and classes[q] == classes[y, x]:
                    stack.append(q)
        ids = {labels[p] for p in region}
        assert len(ids) == 1 and (labels == ids.pop()).sum() == len(region)
        for p in region:
            seen[p] = True
    assert (labels[classes == 0] == -1).all()


def test_extra_objects_cost_in_proportion():
    """Covering the canvas with shapes of every colour must not pay (an RL policy found that)."""
    single = next(m for m in eval_samples("t2i", "reasoning") if len(m["spec"]["objects"]) == 1)
    spec = single["spec"]
    obj = spec["objects"][0]
    corners = [(10, 10), (54, 10), (10, 54), (54, 54)]
    extras = [
        {"shape": "circle", "color": c, "size": "small", "center": list(xy), "radius": 6}
        for c, xy in zip([c for c in COLORS if c != obj["color"]], corners, strict=False)
        if abs(xy[0] - obj["center"][0]) > obj["radius"] + 10
        or abs(xy[1] - obj["center"][1]) > obj["radius"] + 10
    ]
    crowded = {**spec, "objects": [obj, *extras]}
    exact = score_t2i(render(spec), spec, single["caption"])
    result = score_t2i(render(crowded), spec, single["caption"])
    assert exact["score"] == 1.0 and result["detections"] == 1 + len(extras) >= 3
    passed = np.mean(list(result["checks"].values()))
    assert result["score"] == pytest.approx(passed / (1 + len(extras)))
