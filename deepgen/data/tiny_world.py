"""Tiny world: procedural scenes of flat coloured shapes, for CPU demos, tests and rule-based rewards.

Every image is drawn from a *spec*, a JSON-serialisable dict that states exactly what the image shows,
so a scorer can check a generated image against it:

    {
      "width": 64, "height": 64,              # pixels
      "background": [255, 255, 255],          # RGB
      "objects": [
        {"shape": "circle",                   # one of SHAPES
         "color": "red",                      # a key of PALETTE
         "size": "large",                     # one of SIZES
         "center": [x, y],                    # integer pixel coordinates, x to the right, y down
         "radius": r},                        # integer pixels: half the side of the bounding box
        ...
      ]
    }

Every object lies inside the square box ``[x - r, x + r] x [y - r, y + r]``, which is fully inside the
image; boxes of different objects are separated by at least ``MIN_GAP`` pixels. The pixel at each
object's centre has that object's palette colour. Rendering is deterministic and not anti-aliased, so
the spec is exactly truthful to the pixels.
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import shutil
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
# Radius ranges in pixels for a 64 px image; scaled linearly with the shorter image side.
RADIUS_RANGE_64: dict[str, tuple[int, int]] = {"small": (6, 8), "large": (10, 14)}
MIN_GAP = 3  # pixels between the bounding boxes of two objects
BORDER = 1  # pixels between a bounding box and the image edge
MAX_OBJECTS = 3


def radius_range(size: str, width: int, height: int) -> tuple[int, int]:
    """Radius bounds for a size class, scaled so scenes look alike at any resolution."""
    lo, hi = RADIUS_RANGE_64[size]
    scale = min(width, height) / 64
    return max(2, round(lo * scale)), max(2, round(hi * scale))


def _boxes_clear(a: dict, b: dict, gap: int = MIN_GAP) -> bool:
    """True when the bounding boxes of two objects are at least `gap` pixels apart on some axis."""
    (ax, ay), (bx, by) = a["center"], b["center"]
    reach = a["radius"] + b["radius"] + gap
    return abs(ax - bx) >= reach or abs(ay - by) >= reach


def _place(rng: random.Random, obj: dict, others: list[dict], width: int, height: int) -> bool:
    """Set obj["center"] to a random free position; False if none found in a bounded number of tries."""
    r = obj["radius"]
    lo_x, hi_x = r + BORDER, width - 1 - r - BORDER
    lo_y, hi_y = r + BORDER, height - 1 - r - BORDER
    if lo_x > hi_x or lo_y > hi_y:
        return False
    for _ in range(100):
        obj["center"] = [rng.randint(lo_x, hi_x), rng.randint(lo_y, hi_y)]
        if all(_boxes_clear(obj, o) for o in others):
            return True
    return False


def random_object(rng: random.Random, width: int, height: int, **fixed: str) -> dict:
    """A random object (no position yet); `fixed` pins any of shape/color/size."""
    shape = fixed.get("shape") or rng.choice(SHAPES)
    color = fixed.get("color") or rng.choice(COLORS)
    size = fixed.get("size") or rng.choice(SIZES)
    return {
        "shape": shape,
        "color": color,
        "size": size,
        "center": [0, 0],
        "radius": rng.randint(*radius_range(size, width, height)),
    }


def random_scene(rng: random.Random, width: int = 64, height: int = 64) -> dict:
    """A random scene of 1-3 non-overlapping objects; sometimes repeats a colour+shape so counting occurs."""
    num = rng.randint(1, MAX_OBJECTS)
    objects: list[dict] = []
    for _ in range(num):
        if objects and rng.random() < 0.15:
            twin = rng.choice(objects)
            obj = random_object(rng, width, height, shape=twin["shape"], color=twin["color"])
        else:
            obj = random_object(rng, width, height)
        if _place(rng, obj, objects, width, height):
            objects.append(obj)
    if not objects:  # only possible for tiny images: fall back to one small centred object
        obj = random_object(rng, width, height, size="small")
        obj["radius"] = max(1, min(obj["radius"], (min(width, height) - 1) // 2 - BORDER))
        obj["center"] = [width // 2, height // 2]
        objects.append(obj)
    return {"width": width, "height": height, "background": list(BACKGROUND), "objects": objects}


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict) -> None:
    x, y = obj["center"]
    r = obj["radius"]
    fill = PALETTE[obj["color"]]
    box = (x - r, y - r, x + r, y + r)
    if obj["shape"] == "circle":
        draw.ellipse(box, fill=fill)
    elif obj["shape"] == "square":
        draw.rectangle(box, fill=fill)
    elif obj["shape"] == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj['shape']!r}; expected one of {SHAPES}")


def render_scene(spec: dict) -> Image.Image:
    """Draw a spec as an RGB image of size (width, height); deterministic, no anti-aliasing."""
    img = Image.new("RGB", (spec["width"], spec["height"]), tuple(spec["background"]))
    draw = ImageDraw.Draw(img)
    for obj in spec["objects"]:
        _draw_object(draw, obj)
    return img


def copy_spec(spec: dict) -> dict:
    return copy.deepcopy(spec)


# ----------------------------------------------------------------------------------------------------------
# Captions


PREFIX_TEMPLATES: tuple[str, ...] = (
    "{}",
    "{}",
    "an image of {}",
    "a picture of {}",
    "a simple drawing of {}",
    "{} on a white background",
)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
REGION_MARGIN = 1 / 12  # an object's centre must be this far (fraction of the side) from a third-boundary


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: dict, *, with_size: bool = True, article: bool = True) -> str:
    """E.g. "a large red circle" or "red circle"."""
    words = ([obj["size"]] if with_size else []) + [obj["color"], obj["shape"]]
    text = " ".join(words)
    return f"{_article(text)} {text}" if article else text


def _third(value: float, side: int) -> int | None:
    """0/1/2 for the first/middle/last third of a side, None when too close to a boundary to be sure."""
    frac = (value + 0.5) / side
    if any(abs(frac - b) < REGION_MARGIN for b in (1 / 3, 2 / 3)):
        return None
    return 0 if frac < 1 / 3 else (1 if frac < 2 / 3 else 2)


def region_phrase(spec: dict, obj: dict) -> str | None:
    """Where an object sits on a 3x3 grid ("in the top left", "at the bottom"); None when borderline."""
    col = _third(obj["center"][0], spec["width"])
    row = _third(obj["center"][1], spec["height"])
    if col is None or row is None:
        return None
    vertical = ("top", None, "bottom")[row]
    horizontal = ("left", None, "right")[col]
    if vertical and horizontal:
        return f"in the {vertical} {horizontal}"
    if vertical:
        return f"at the {vertical}"
    if horizontal:
        return f"on the {horizontal}"
    return "in the center"


def relation(spec: dict, a: dict, b: dict) -> str | None:
    """Where `a` is relative to `b` ("to the left of", "above", ...), or None when the layout is ambiguous.

    A relation is stated only when one axis dominates (at least twice the other) and the centres are at
    least a sixth of the image apart along it, so a human and the rule-based scorer agree on it.
    """
    dx = b["center"][0] - a["center"][0]
    dy = b["center"][1] - a["center"][1]
    if abs(dx) >= 2 * abs(dy) and abs(dx) >= spec["width"] / 6:
        return "to the left of" if dx > 0 else "to the right of"
    if abs(dy) >= 2 * abs(dx) and abs(dy) >= spec["height"] / 6:
        return "above" if dy > 0 else "below"
    return None


def _group_phrase(objs: list[dict], rng: random.Random) -> str:
    """Describe objects sharing colour and shape: "a red circle" or "two small red circles"."""
    if len(objs) == 1:
        return object_phrase(objs[0], with_size=rng.random() < 0.5)
    same_size = len({o["size"] for o in objs}) == 1
    words = ([objs[0]["size"]] if same_size and rng.random() < 0.5 else []) + [objs[0]["color"]]
    return f"{NUMBER_WORDS[len(objs)]} {' '.join(words)} {objs[0]['shape']}s"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe_scene(spec: dict, rng: random.Random) -> str:
    """A truthful description of all objects in the scene, without a prefix template."""
    objs = spec["objects"]
    if not objs:
        return "an empty white background"
    if len(objs) == 1:
        text = object_phrase(objs[0], with_size=rng.random() < 0.7)
        where = region_phrase(spec, objs[0])
        return f"{text} {where}" if where and rng.random() < 0.5 else text
    groups: dict[tuple[str, str], list[dict]] = {}
    for o in objs:
        groups.setdefault((o["color"], o["shape"]), []).append(o)
    if len(objs) == 2 and len(groups) == 2:
        a, b = objs if rng.random() < 0.5 else objs[::-1]
        rel = relation(spec, a, b)
        pa = object_phrase(a, with_size=rng.random() < 0.5)
        pb = object_phrase(b, with_size=rng.random() < 0.5)
        return f"{pa} {rel} {pb}" if rel else f"{pa} and {pb}"
    parts = list(groups.values())
    rng.shuffle(parts)
    return _join([_group_phrase(p, rng) for p in parts])


def caption_scene(spec: dict, rng: random.Random) -> str:
    """A varied, truthful caption naming every object (colour, shape, optionally size/position/relation)."""
    return rng.choice(PREFIX_TEMPLATES).format(describe_scene(spec, rng))


# ----------------------------------------------------------------------------------------------------------
# Edits: each kind is a function (spec, rng) -> (instruction, target_spec, edit_info) or None when the
# scene does not allow it. New kinds (e.g. "change shape") are added to EDIT_KINDS.


def referable_objects(spec: dict) -> list[int]:
    """Indices of objects that "the <colour> <shape>" names uniquely."""
    keys = [(o["color"], o["shape"]) for o in spec["objects"]]
    return [i for i, k in enumerate(keys) if keys.count(k) == 1]


def _the(obj: dict) -> str:
    return f"the {obj['color']} {obj['shape']}"


def edit_recolour(spec: dict, rng: random.Random) -> tuple[str, dict, dict] | None:
    candidates = referable_objects(spec)
    if not candidates:
        return None
    idx = rng.choice(candidates)
    obj = spec["objects"][idx]
    new = rng.choice([c for c in COLORS if c != obj["color"]])
    template = rng.choice(("make {} {}", "change {} to {}", "turn {} {}", "color {} {}"))
    target = copy_spec(spec)
    target["objects"][idx]["color"] = new
    info = {"kind": "recolour", "object": idx, "old_color": obj["color"], "new_color": new}
    return template.format(_the(obj), new), target, info


def edit_remove(spec: dict, rng: random.Random) -> tuple[str, dict, dict] | None:
    candidates = referable_objects(spec) if len(spec["objects"]) >= 2 else []
    if not candidates:
        return None
    idx = rng.choice(candidates)
    template = rng.choice(("remove {}", "delete {}", "take away {}", "get rid of {}"))
    target = copy_spec(spec)
    del target["objects"][idx]
    return template.format(_the(spec["objects"][idx])), target, {"kind": "remove", "object": idx}


def edit_add(spec: dict, rng: random.Random) -> tuple[str, dict, dict] | None:
    if len(spec["objects"]) >= MAX_OBJECTS:
        return None
    for attempt in range(4):  # a large object may not fit next to big ones: fall back to small objects
        pinned = {"size": "small"} if attempt >= 2 else {}
        obj = random_object(rng, spec["width"], spec["height"], **pinned)
        if _place(rng, obj, spec["objects"], spec["width"], spec["height"]):
            break
    else:
        return None
    target = copy_spec(spec)
    target["objects"].append(obj)
    template = rng.choice(("add {}", "put {} in the picture", "draw {}"))
    info = {"kind": "add", "object": len(spec["objects"])}
    return template.format(object_phrase(obj)), target, info


MOVE_DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}


def edit_move(spec: dict, rng: random.Random) -> tuple[str, dict, dict] | None:
    """Shift one object along one axis by a clearly visible distance, to a free spot inside the image."""
    w, h = spec["width"], spec["height"]
    min_shift = max(4, round(min(w, h) / 6))
    candidates = referable_objects(spec)
    rng.shuffle(candidates)
    for idx in candidates:
        obj = spec["objects"][idx]
        others = [o for i, o in enumerate(spec["objects"]) if i != idx]
        directions = list(MOVE_DIRECTIONS)
        rng.shuffle(directions)
        for direction in directions:
            ux, uy = MOVE_DIRECTIONS[direction]
            options = []
            for dist in range(min_shift, max(w, h)):
                moved = dict(obj, center=[obj["center"][0] + ux * dist, obj["center"][1] + uy * dist])
                x, y = moved["center"]
                r = obj["radius"]
                if not (r + BORDER <= x <= w - 1 - r - BORDER and r + BORDER <= y <= h - 1 - r - BORDER):
                    break
                if all(_boxes_clear(moved, o) for o in others):
                    options.append(dist)
            if options:
                dist = rng.choice(options)
                target = copy_spec(spec)
                target["objects"][idx]["center"] = [
                    obj["center"][0] + ux * dist,
                    obj["center"][1] + uy * dist,
                ]
                phrase = direction if direction in ("up", "down") else f"to the {direction}"
                template = rng.choice(("move {} {}", "shift {} {}"))
                info = {
                    "kind": "move",
                    "object": idx,
                    "direction": direction,
                    "offset": [ux * dist, uy * dist],
                }
                return template.format(_the(obj), phrase), target, info
    return None


EDIT_KINDS = {"recolour": edit_recolour, "remove": edit_remove, "add": edit_add, "move": edit_move}


def random_edit(spec: dict, rng: random.Random) -> tuple[str, dict, dict]:
    """A random applicable edit of the scene: (instruction, target_spec, edit_info).

    edit_info always has "kind" and "object" (index into the source objects; for "add", the index of the
    new object in the target). The source spec is not modified.
    """
    kinds = list(EDIT_KINDS)
    rng.shuffle(kinds)
    for kind in kinds:
        result = EDIT_KINDS[kind](spec, rng)
        if result is not None:
            return result
    raise ValueError(f"no edit applies to scene {spec}")


# ----------------------------------------------------------------------------------------------------------
# Samples and shards (schema documented in data/README.md)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


def _sample_rng(seed: int, task: str, index: int) -> random.Random:
    """One independent stream per sample, so any sample can be regenerated alone (str seeds are stable)."""
    return random.Random(f"tiny-world/{seed}/{task}/{index}")


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast; tiny flat images compress well anyway
    return buf.getvalue()


def _json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def make_t2i_sample(seed: int, index: int, image_size: int = 64) -> dict:
    """The webdataset sample (key -> bytes) for text-to-image sample `index`."""
    rng = _sample_rng(seed, "t2i", index)
    spec = random_scene(rng, image_size, image_size)
    meta = {"task": "t2i", "caption": caption_scene(spec, rng), "spec": spec}
    return {"__key__": f"t2i-{index:09d}", "png": _png_bytes(render_scene(spec)), "json": _json_bytes(meta)}


def make_edit_sample(seed: int, index: int, image_size: int = 64) -> dict:
    """The webdataset sample (key -> bytes) for edit sample `index`."""
    rng = _sample_rng(seed, "edit", index)
    for _ in range(100):  # a few scenes admit no edit (e.g. three identical objects): draw another
        source = random_scene(rng, image_size, image_size)
        try:
            instruction, target, info = random_edit(source, rng)
            break
        except ValueError:
            continue
    else:
        raise RuntimeError(f"no editable scene found for edit sample {index} at {image_size} px")
    meta = {
        "task": "edit",
        "instruction": instruction,
        "source_spec": source,
        "target_spec": target,
        "edit": info,
    }
    return {
        "__key__": f"edit-{index:09d}",
        "src.png": _png_bytes(render_scene(source)),
        "tgt.png": _png_bytes(render_scene(target)),
        "json": _json_bytes(meta),
    }


def _write_task(out_dir: Path, task: str, count: int, per_shard: int, make) -> list[str]:
    if count == 0:
        return []
    # mtime=0 makes the tar bytes reproducible; verbose=0 keeps test output clean.
    with wds.ShardWriter(str(out_dir / f"{task}-%06d.tar"), maxcount=per_shard, verbose=0, mtime=0) as sink:
        for i in range(count):
            sink.write(make(i))
    return sorted(p.name for p in out_dir.glob(f"{task}-*.tar"))


def write_tiny_world_shards(
    out_dir: str | Path,
    *,
    num_t2i: int,
    num_edit: int,
    image_size: int = 64,
    samples_per_shard: int = 256,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write t2i-NNNNNN.tar, edit-NNNNNN.tar and manifest.json into out_dir; returns the manifest.

    Everything is built in a hidden sibling directory that is renamed into place at the end, so an
    interrupted build never leaves a directory that looks complete. The output is a pure function of
    the arguments (byte-identical tars for the same seed).
    """
    out_dir = Path(out_dir)
    if num_t2i < 0 or num_edit < 0 or samples_per_shard < 1:
        raise ValueError(
            f"need num_t2i, num_edit >= 0 and samples_per_shard >= 1, got {num_t2i}, {num_edit}, {samples_per_shard}"
        )
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; delete it or pass overwrite=True")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        t2i = _write_task(
            tmp, "t2i", num_t2i, samples_per_shard, lambda i: make_t2i_sample(seed, i, image_size)
        )
        edit = _write_task(
            tmp, "edit", num_edit, samples_per_shard, lambda i: make_edit_sample(seed, i, image_size)
        )
        manifest = {
            "format": "deepgen-tiny-world",
            "version": FORMAT_VERSION,
            "seed": seed,
            "image_size": image_size,
            "samples_per_shard": samples_per_shard,
            "counts": {"t2i": num_t2i, "edit": num_edit},
            "shards": {"t2i": t2i, "edit": edit},
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
