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

Text-rendering scenes have no objects but a ``"sign"``: a filled rectangle with one word written in a
contrasting colour (PIL's built-in font, drawn without anti-aliasing), on an image twice as wide as high:

    "sign": {"color": "red",                  # sign colour, a key of PALETTE
             "box": [x0, y0, x1, y1],         # inclusive pixel bounds of the rectangle
             "text": "CAT",                   # one of WORDS
             "text_color": "white",           # a key of TEXT_COLORS, fixed per sign colour
             "font_size": 26,                 # of ImageFont.load_default(size=...)
             "text_box": [x0, y0, x1, y1]}    # inclusive bounds of the laid-out text; all ink is inside

Three sample categories (deepgen.data.schema.CATEGORIES): ``general`` (scenes, captions, edits),
``reasoning`` (colours and shapes named through FACTS: "a circle the colour of a ripe banana") and
``text_rendering`` (signs). Held-out evaluation prompts are kept apart from training prompts by
``holdout_split``; the shard and eval layouts are documented in data/README.md.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import random
import shutil
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from itertools import islice
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from deepgen.data.schema import CATEGORIES
from deepgen.data.writer import json_bytes, shard_name, write_manifest, write_shard

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


# ----------------------------------------------------------------------------------------------------------
# Signs (text rendering)

# fmt: off
WORDS: tuple[str, ...] = (
    "CAT", "DOG", "SUN", "SKY", "BUS", "CAR", "TEA", "MAP", "BOX", "KEY", "HAT", "CUP",
    "MOON", "STAR", "TREE", "FISH", "BIRD", "BOOK", "CAKE", "LAMP", "FROG", "BEAR", "WOLF", "RAIN",
    "SNOW", "WIND", "FIRE", "SHIP", "OPEN", "STOP", "EXIT", "SALE", "PARK", "CAFE", "MILK", "LEAF",
    "HELLO", "HOUSE", "APPLE", "RIVER", "CLOUD", "TRAIN", "PLANT", "BREAD",
)
# fmt: on
TEXT_COLORS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
SIGN_TEXT_COLOR: dict[str, str] = {
    # Black on light signs, white on dark ones (ITU-R 601 luma), so OCR and people read them alike.
    name: "black" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white"
    for name, (r, g, b) in PALETTE.items()
}
SIGN_ASPECT = 2  # text-rendering images are SIGN_ASPECT * image_size wide and image_size high


def sign_padding(height: int) -> int:
    """Minimum pixels between the text and the edge of its sign."""
    return max(2, round(height / 16))


def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow's embedded font: no font file needed, identical glyphs wherever this Pillow runs.
    return ImageFont.load_default(size=size)


@cache
def _text_extent(font_size: int) -> tuple[int, int]:
    """Width and height of the largest text box over WORDS."""
    font = _font(font_size)
    boxes = [font.getbbox(w) for w in WORDS]
    return max(b[2] - b[0] for b in boxes), max(b[3] - b[1] for b in boxes)


@cache
def sign_font_size(width: int, height: int) -> int:
    """The largest font size (at most 0.4 * height) at which every word of WORDS fits a sign in the image.

    The size depends only on the image size, so changing a sign's word never needs a bigger sign.
    """
    room = 2 * sign_padding(height) + 2 * BORDER
    for size in range(max(6, round(0.4 * height)), 5, -1):
        text_w, text_h = _text_extent(size)
        if text_w + room <= width and text_h + room <= height:
            return size
    raise ValueError(f"a {width}x{height} image is too small for a sign")


def _text_origin(sign: dict, font: ImageFont.FreeTypeFont) -> tuple[int, int]:
    """Where to draw the text so its box is centred in the sign (rounded towards the top left)."""
    x0, y0, x1, y1 = sign["box"]
    bx0, by0, bx1, by1 = font.getbbox(sign["text"])
    return x0 + (x1 - x0 + 1 - (bx1 - bx0)) // 2 - bx0, y0 + (y1 - y0 + 1 - (by1 - by0)) // 2 - by0


def layout_sign(color: str, box: list[int], text: str, font_size: int) -> dict:
    """A sign dict with its text colour and text box filled in."""
    sign = {
        "color": color,
        "box": list(box),
        "text": text,
        "text_color": SIGN_TEXT_COLOR[color],
        "font_size": font_size,
    }
    font = _font(font_size)
    ox, oy = _text_origin(sign, font)
    bx0, by0, bx1, by1 = font.getbbox(text)
    sign["text_box"] = [ox + bx0, oy + by0, ox + bx1 - 1, oy + by1 - 1]  # getbbox's end is exclusive
    return sign


def random_sign_scene(rng: random.Random, width: int, height: int) -> dict:
    """A scene with one sign of random colour, word, size and position, big enough for any word."""
    font_size = sign_font_size(width, height)
    text_w, text_h = _text_extent(font_size)
    pad = sign_padding(height)
    w = rng.randint(text_w + 2 * pad, width - 2 * BORDER)
    h = rng.randint(text_h + 2 * pad, height - 2 * BORDER)
    x0 = rng.randint(BORDER, width - BORDER - w)
    y0 = rng.randint(BORDER, height - BORDER - h)
    sign = layout_sign(rng.choice(COLORS), [x0, y0, x0 + w - 1, y0 + h - 1], rng.choice(WORDS), font_size)
    return {"width": width, "height": height, "background": list(BACKGROUND), "objects": [], "sign": sign}


def _draw_sign(draw: ImageDraw.ImageDraw, sign: dict) -> None:
    draw.rectangle(sign["box"], fill=PALETTE[sign["color"]])
    font = _font(sign["font_size"])
    draw.text(_text_origin(sign, font), sign["text"], font=font, fill=TEXT_COLORS[sign["text_color"]])


def render_scene(spec: dict) -> Image.Image:
    """Draw a spec as an RGB image of size (width, height); deterministic, no anti-aliasing."""
    img = Image.new("RGB", (spec["width"], spec["height"]), tuple(spec["background"]))
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"  # binary glyphs: only the sign and text colours inside a sign
    if "sign" in spec:
        _draw_sign(draw, spec["sign"])
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


# Reasoning: everyday things whose colour or shape everyone knows. No entry contains a colour or shape
# word, so a prompt naming one can only be drawn right by knowing the fact.
COLOR_FACTS: dict[str, str] = {
    "a stop sign": "red",
    "a ripe strawberry": "red",
    "a ripe tomato": "red",
    "grass": "green",
    "a fresh lime": "green",
    "a four-leaf clover": "green",
    "the sky on a clear day": "blue",
    "a sapphire": "blue",
    "the deep sea": "blue",
    "a ripe banana": "yellow",
    "a lemon": "yellow",
    "a rubber duck": "yellow",
    "an eggplant": "purple",
    "lavender flowers": "purple",
    "an amethyst": "purple",
    "a carrot": "orange",
    "a pumpkin": "orange",
    "a tangerine": "orange",
}
SHAPE_FACTS: dict[str, str] = {
    "a wheel": "circle",
    "a coin": "circle",
    "the full moon": "circle",
    "one face of a die": "square",
    "a sticky note": "square",
    "a chessboard tile": "square",
    "a slice of pizza": "triangle",
    "a warning road sign": "triangle",
    "a pyramid seen from the side": "triangle",
}


def reasoning_description(color: str, shape: str, color_fact: str | None, shape_fact: str | None) -> str:
    """E.g. "a circle the colour of a ripe banana", "something blue shaped like a wheel"."""
    if color_fact and shape_fact:
        return f"something the colour of {color_fact} shaped like {shape_fact}"
    if color_fact:
        return f"{_article(shape)} {shape} the colour of {color_fact}"
    if shape_fact:
        return f"something {color} shaped like {shape_fact}"
    raise ValueError("a reasoning description needs a colour fact, a shape fact or both")


SIGN_TEMPLATES: tuple[str, ...] = (
    '{} {} sign that says "{}"',  # the first is the canonical wording (holdout key)
    '{} {} sign with the word "{}"',
    '{} {} sign reading "{}"',
)


def sign_description(sign: dict, template: str = SIGN_TEMPLATES[0]) -> str:
    """E.g. 'a red sign that says "CAT"' (the text colour follows from the sign colour)."""
    return template.format(_article(sign["color"]), sign["color"], sign["text"])


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


def edit_recolour_by_fact(spec: dict, rng: random.Random) -> tuple[str, dict, dict] | None:
    """Reasoning recolour: "make the red square the colour of grass"; edit_info adds the "fact"."""
    candidates = referable_objects(spec)
    if not candidates:
        return None
    idx = rng.choice(candidates)
    obj = spec["objects"][idx]
    fact = rng.choice([f for f, c in COLOR_FACTS.items() if c != obj["color"]])
    new = COLOR_FACTS[fact]
    template = rng.choice(
        ("make {} the colour of {}", "paint {} the colour of {}", "turn {} the colour of {}")
    )
    target = copy_spec(spec)
    target["objects"][idx]["color"] = new
    info = {"kind": "recolour", "object": idx, "old_color": obj["color"], "new_color": new, "fact": fact}
    return template.format(_the(obj), fact), target, info


RETEXT_TEMPLATES: tuple[str, ...] = (
    'change "{}" to "{}"',  # the first is the canonical wording (holdout key)
    'replace "{}" with "{}"',
    'make the sign say "{1}" instead of "{0}"',
)


def edit_retext(spec: dict, rng: random.Random) -> tuple[str, dict, dict]:
    """Change the word on the sign; the sign keeps its colour and box (any word fits it)."""
    sign = spec["sign"]
    new = rng.choice([w for w in WORDS if w != sign["text"]])
    target = copy_spec(spec)
    target["sign"] = layout_sign(sign["color"], sign["box"], new, sign["font_size"])
    info = {"kind": "retext", "old_text": sign["text"], "new_text": new}
    return rng.choice(RETEXT_TEMPLATES).format(sign["text"], new), target, info


def edit_key(source: dict, target: dict, info: dict) -> str:
    """The edit in one canonical wording ("make the red circle blue"): every template of the edit's kind
    yields the same key, and different keys mean different instructions (see holdout_split)."""
    kind = info["kind"]
    if kind == "retext":
        return RETEXT_TEMPLATES[0].format(info["old_text"], info["new_text"])
    if kind == "add":
        return f"add {object_phrase(target['objects'][info['object']])}"
    obj = _the(source["objects"][info["object"]])
    if kind == "recolour":
        return (
            f"make {obj} the colour of {info['fact']}"
            if "fact" in info
            else f"make {obj} {info['new_color']}"
        )
    if kind == "remove":
        return f"remove {obj}"
    if kind == "move":
        return f"move {obj} {info['direction']}"
    raise ValueError(f"unknown edit kind {kind!r}")


# ----------------------------------------------------------------------------------------------------------
# Held-out prompts. Every prompt has a holdout key: its content in one canonical wording (a caption
# without its prefix template, an edit via edit_key). The key is a function of the prompt text, so two
# equal prompts have equal keys; a hash of the key puts it on the train or the eval side, and each
# generator redraws until its prompt is on its own side. Hence no eval prompt is ever a training
# prompt, and held-out keys are whole compositions ("make the red circle blue" in any wording).

HOLDOUT_MODULUS = 8  # about 1 key in 8 is held out for evaluation
# Fixed forever (changing it moves prompts between train and eval). Chosen among a few so that every
# edit kind has held-out keys: there are only 18 "remove" keys (a test checks this).
HOLDOUT_SALT = "tiny-world/eval/"


def holdout_split(key: str) -> str:
    """Which side a holdout key is on, "train" or "eval"; the same on every machine and Python version."""
    digest = hashlib.sha256(f"{HOLDOUT_SALT}{key}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % HOLDOUT_MODULUS == 0 else "train"


# ----------------------------------------------------------------------------------------------------------
# Samples and shards (schema documented in data/README.md). A drawer turns a random stream into
# (holdout key, json fields) for one task and category.

FORMAT_VERSION = 3  # 3: categories spread evenly through each task's shards
EVAL_DIR = "eval"
MAX_DRAWS = 1000  # redraws to find a prompt on the wanted side of the holdout (about 1 in 8 are eval)


def _sample_rng(seed: int, stream: str, index: int) -> random.Random:
    """One independent stream per sample, so any sample can be regenerated alone (str seeds are stable)."""
    return random.Random(f"tiny-world/{seed}/{stream}/{index}")


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast; tiny flat images compress well anyway
    return buf.getvalue()


def _t2i_general(rng: random.Random, image_size: int) -> tuple[str, dict]:
    spec = random_scene(rng, image_size, image_size)
    prefix = rng.choice(PREFIX_TEMPLATES)  # the same draws, in the same order, as caption_scene
    description = describe_scene(spec, rng)
    return description, {"caption": prefix.format(description), "spec": spec}


def _t2i_reasoning(rng: random.Random, image_size: int) -> tuple[str, dict]:
    form = rng.choice(("color", "shape", "both"))
    color_fact = rng.choice(list(COLOR_FACTS)) if form != "shape" else None
    shape_fact = rng.choice(list(SHAPE_FACTS)) if form != "color" else None
    obj = random_object(
        rng,
        image_size,
        image_size,
        color=COLOR_FACTS[color_fact] if color_fact else rng.choice(COLORS),
        shape=SHAPE_FACTS[shape_fact] if shape_fact else rng.choice(SHAPES),
    )
    if not _place(rng, obj, [], image_size, image_size):
        raise ValueError(f"image_size {image_size} is too small for a reasoning scene")
    spec = {"width": image_size, "height": image_size, "background": list(BACKGROUND), "objects": [obj]}
    description = reasoning_description(obj["color"], obj["shape"], color_fact, shape_fact)
    facts = {k: v for k, v in (("color", color_fact), ("shape", shape_fact)) if v}
    meta = {
        "caption": rng.choice(PREFIX_TEMPLATES).format(description),
        "resolved_caption": object_phrase(obj, with_size=False),
        "facts": facts,
        "spec": spec,
    }
    return description, meta


def _t2i_text(rng: random.Random, image_size: int) -> tuple[str, dict]:
    spec = random_sign_scene(rng, SIGN_ASPECT * image_size, image_size)
    phrase = sign_description(spec["sign"], rng.choice(SIGN_TEMPLATES))
    caption = rng.choice(PREFIX_TEMPLATES).format(phrase)
    return sign_description(spec["sign"]), {"caption": caption, "spec": spec}


def _edit_meta(source: dict, edit: tuple[str, dict, dict]) -> tuple[str, dict]:
    instruction, target, info = edit
    meta = {"instruction": instruction, "source_spec": source, "target_spec": target, "edit": info}
    return edit_key(source, target, info), meta


def _edit_general(rng: random.Random, image_size: int) -> tuple[str, dict]:
    for _ in range(100):  # a few scenes admit no edit (e.g. three identical objects): draw another
        source = random_scene(rng, image_size, image_size)
        try:
            return _edit_meta(source, random_edit(source, rng))
        except ValueError:
            continue
    raise RuntimeError(f"no editable scene found at {image_size} px")


def _edit_reasoning(rng: random.Random, image_size: int) -> tuple[str, dict]:
    for _ in range(100):  # scenes of identical objects have nothing to name uniquely: draw another
        source = random_scene(rng, image_size, image_size)
        edit = edit_recolour_by_fact(source, rng)
        if edit is not None:
            key, meta = _edit_meta(source, edit)
            info = meta["edit"]
            meta["resolved_instruction"] = (
                f"make {_the(source['objects'][info['object']])} {info['new_color']}"
            )
            return key, meta
    raise RuntimeError(f"no editable scene found at {image_size} px")


def _edit_text(rng: random.Random, image_size: int) -> tuple[str, dict]:
    source = random_sign_scene(rng, SIGN_ASPECT * image_size, image_size)
    return _edit_meta(source, edit_retext(source, rng))


DRAWERS: dict[tuple[str, str], Callable[[random.Random, int], tuple[str, dict]]] = {
    ("t2i", "general"): _t2i_general,
    ("t2i", "reasoning"): _t2i_reasoning,
    ("t2i", "text_rendering"): _t2i_text,
    ("edit", "general"): _edit_general,
    ("edit", "reasoning"): _edit_reasoning,
    ("edit", "text_rendering"): _edit_text,
}
# General T2I training captions are not filtered, so their data stays what it was before the holdout
# existed; the general T2I eval split instead also excludes the build's training descriptions.
UNFILTERED_TRAIN = {("t2i", "general")}


def _stream(task: str, category: str, split: str) -> str:
    base = task if category == "general" else f"{task}/{category}"  # general: the pre-category streams
    return base if split == "train" else f"eval/{base}"


def draw_sample_meta(
    task: str,
    category: str,
    split: str,
    seed: int,
    index: int,
    image_size: int = 64,
    exclude: frozenset[str] = frozenset(),
) -> dict:
    """The json fields of sample `index` of a task, category and split ("train" or "eval").

    The prompt is on the split's side of holdout_split; an eval prompt's key is also not in `exclude`.
    """
    rng = _sample_rng(seed, _stream(task, category, split), index)
    for _ in range(MAX_DRAWS):
        key, meta = DRAWERS[(task, category)](rng, image_size)
        if split == "train" and ((task, category) in UNFILTERED_TRAIN or holdout_split(key) == "train"):
            break
        if split == "eval" and holdout_split(key) == "eval" and key not in exclude:
            break
    else:
        raise RuntimeError(f"no {split} prompt for {task}/{category} sample {index} in {MAX_DRAWS} draws")
    return {"task": task, "category": category, **meta}


def general_t2i_train_keys(seed: int, num: int, image_size: int = 64) -> frozenset[str]:
    """Holdout keys (descriptions) of the first `num` general T2I training samples, without rendering."""
    return frozenset(_t2i_general(_sample_rng(seed, "t2i", i), image_size)[0] for i in range(num))


def sample_key(task: str, category: str, index: int) -> str:
    """Webdataset key: "t2i-000000042" for general samples, "t2i-reasoning-000000042" otherwise."""
    return f"{task}-{index:09d}" if category == "general" else f"{task}-{category}-{index:09d}"


def make_t2i_sample(seed: int, index: int, image_size: int = 64, category: str = "general") -> dict:
    """The webdataset sample (key -> bytes) for text-to-image training sample `index` of a category."""
    meta = draw_sample_meta("t2i", category, "train", seed, index, image_size)
    return {
        "__key__": sample_key("t2i", category, index),
        "png": _png_bytes(render_scene(meta["spec"])),
        "json": json_bytes(meta),
    }


def make_edit_sample(seed: int, index: int, image_size: int = 64, category: str = "general") -> dict:
    """The webdataset sample (key -> bytes) for edit training sample `index` of a category."""
    meta = draw_sample_meta("edit", category, "train", seed, index, image_size)
    return {
        "__key__": sample_key("edit", category, index),
        "src.png": _png_bytes(render_scene(meta["source_spec"])),
        "tgt.png": _png_bytes(render_scene(meta["target_spec"])),
        "json": json_bytes(meta),
    }


def interleaved(per_category: dict[str, int]) -> list[tuple[str, int]]:
    """(category, index) of a task's samples in shard order: every category spread evenly.

    Sample i of a category with n samples sits at (i + 0.5) / n of the way through, so every stretch of
    every shard, and so every shuffle buffer reading it, holds the categories in proportion. Writing
    them one after another made training stream a single category for a whole shard at a time.
    """
    order = []
    for rank, category in enumerate(CATEGORIES):
        n = per_category.get(category, 0)
        order += [((i + 0.5) / n, rank, category, i) for i in range(n)]
    return [(category, i) for _, _, category, i in sorted(order)]


def _write_shards(out_dir: Path, task: str, samples: Iterable[dict], per_shard: int) -> dict[str, int]:
    """Write samples into consecutive shards of `per_shard`; returns shard name -> sample count."""
    counts: dict[str, int] = {}
    it: Iterator[dict] = iter(samples)
    while chunk := list(islice(it, per_shard)):
        name = shard_name(task, len(counts))
        counts[name] = write_shard(out_dir / name, chunk)
    return counts


def _write_eval(eval_dir: Path, seed: int, per_split: int, image_size: int, num_t2i: int) -> dict[str, int]:
    """One JSONL file per task and category, each line a sample json plus its "key"."""
    eval_dir.mkdir()
    general_train = general_t2i_train_keys(seed, num_t2i, image_size)
    files = {}
    for task, category in DRAWERS:
        exclude = general_train if (task, category) in UNFILTERED_TRAIN else frozenset()
        lines = [
            json_bytes(
                {
                    **draw_sample_meta(task, category, "eval", seed, i, image_size, exclude),
                    "key": f"eval-{sample_key(task, category, i)}",
                }
            )
            for i in range(per_split)
        ]
        name = f"{task}_{category}.jsonl"
        (eval_dir / name).write_bytes(b"".join(line + b"\n" for line in lines))
        files[name] = per_split
    return files


def write_tiny_world_shards(
    out_dir: str | Path,
    *,
    num_t2i: int,
    num_edit: int,
    num_reasoning_t2i: int = 0,
    num_text_t2i: int = 0,
    num_reasoning_edit: int = 0,
    num_text_edit: int = 0,
    num_eval_per_split: int = 0,
    image_size: int = 64,
    samples_per_shard: int = 256,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write t2i-NNNNNN.tar, edit-NNNNNN.tar, manifest.json and (with num_eval_per_split) eval/*.jsonl.

    Each task's shards hold its categories spread evenly (:func:`interleaved`).
    Everything is built in a hidden sibling directory that is renamed into place at the end, so an
    interrupted build never leaves a directory that looks complete. The output is a pure function of
    the arguments (byte-identical files for the same arguments). Returns the manifest.
    """
    out_dir = Path(out_dir)
    counts = {
        "t2i": {"general": num_t2i, "text_rendering": num_text_t2i, "reasoning": num_reasoning_t2i},
        "edit": {"general": num_edit, "text_rendering": num_text_edit, "reasoning": num_reasoning_edit},
    }
    if min(min(c.values()) for c in counts.values()) < 0 or num_eval_per_split < 0 or samples_per_shard < 1:
        raise ValueError(
            f"need sample counts >= 0 and samples_per_shard >= 1, got {counts}, "
            f"num_eval_per_split={num_eval_per_split}, samples_per_shard={samples_per_shard}"
        )
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; delete it or pass overwrite=True")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    makers = {"t2i": make_t2i_sample, "edit": make_edit_sample}
    try:
        shard_counts: dict[str, int] = {}
        for task, per_category in counts.items():
            samples = (
                makers[task](seed, i, image_size, category) for category, i in interleaved(per_category)
            )
            shard_counts.update(_write_shards(tmp, task, samples, samples_per_shard))
        eval_files = (
            _write_eval(tmp / EVAL_DIR, seed, num_eval_per_split, image_size, num_t2i)
            if num_eval_per_split
            else {}
        )
        arguments = {
            "num_t2i": num_t2i,
            "num_edit": num_edit,
            "num_reasoning_t2i": num_reasoning_t2i,
            "num_text_t2i": num_text_t2i,
            "num_reasoning_edit": num_reasoning_edit,
            "num_text_edit": num_text_edit,
            "num_eval_per_split": num_eval_per_split,
            "image_size": image_size,
            "samples_per_shard": samples_per_shard,
            "seed": seed,
        }
        info = {
            "format": "deepgen-tiny-world",
            "version": FORMAT_VERSION,
            "arguments": arguments,  # what the output is a pure function of: a rebuild check compares it
            "seed": seed,
            "image_size": image_size,
            "samples_per_shard": samples_per_shard,
            "categories": counts,
            "layout": "categories mixed into each task's shards, spread evenly (sample i of a category "
            f"with n samples at (i + 0.5) / n of the way through); text_rendering images are "
            f"{SIGN_ASPECT * image_size}x{image_size}",
            "eval": {"dir": EVAL_DIR, "files": eval_files, "holdout_modulus": HOLDOUT_MODULUS},
        }
        manifest = write_manifest(tmp, info, shard_counts)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
