"""GenEval-style rule checks of generated tiny-world images against their specs.

A tiny-world spec states exactly what an image should show (deepgen.data.tiny_world), so a generated
image can be scored without a learned judge: it is the demo's benchmark and its RL reward. Generated
images are small, blurry and noisy, so detection is deliberately forgiving:

1. Pixels are classified as background, one of PALETTE's colours, dark (black text) or other. A pixel
   is modelled as a mix of one palette colour with the white background, so blurred edges keep their
   colour instead of drifting to a neighbouring palette colour; it is that colour when the mix is at
   least half colour.
2. Connected regions of one colour are objects; specks (under a quarter of the smallest object) are
   noise. Shape is the best IoU of the region, stretched to a square, with the rendered shapes, if that
   IoU reaches SHAPE_MIN_IOU (a shapeless blob has no shape); size and centre come from the bounding
   box, in the spec's pixel coordinates (any image size works).

Each score function returns ``{"score": graded score in [0, 1], "correct": bool (every check passes,
GenEval's strict accuracy), "checks": {name: bool}, ...}``. The graded score gives partial credit,
which RL needs. Checks test only what a prompt states: every caption of a spec states the colour,
shape and count of its objects and (two objects of different kinds) their relation; a caption passed
to score_t2i may add sizes and, for one object, its region. Edits score ``edit part * preservation
part`` so that neither a copy of the source nor a blank image earns anything. The word on a sign is
left to OCR (deepgen.rewards.ocr): sign scores return the detected ``sign_box`` for it to read.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

from deepgen.data.tiny_world import (
    BACKGROUND,
    COLORS,
    PALETTE,
    RADIUS_RANGE_64,
    SHAPES,
    TEXT_COLORS,
    radius_range,
    region_phrase,
    relation,
    render_scene,
)

BG, DARK, OTHER = 0, len(COLORS) + 1, len(COLORS) + 2  # pixel classes; colour i is class i + 1
MAX_RESIDUAL = 100.0  # RGB distance from the nearest colour/white mix beyond which a pixel is no colour
DARK_LEVEL = 80  # mean RGB below which an unexplained pixel is dark (black text ink)
MAX_DETECTIONS = 8  # larger regions are kept; the rest of a noisy image cannot change the checks
TEMPLATE_RADIUS = 15  # shape templates are rendered in a (2R+1)^2 box
SHAPE_MIN_IOU = 0.7  # blurred, noisy renders reach >= 0.74 with their shape; diffusion blobs median 0.64
PRESERVE_MIN = 0.9  # pixel agreement outside the edited area that counts as "rest preserved"
SIGN_MIN_AREA = 0.1  # fraction of the image a sign must cover (the smallest tiny-world sign covers ~1/4)
SIGN_MIN_FILL = 0.9  # a sign with its text filled in covers this much of its bounding box
SIGN_MIN_INK = 0.01  # text ink of the sign's text colour, as a fraction of the sign's box
SIGN_MIN_IOU = 0.8  # an edited sign keeps its box
TEXT_CELL = 4  # image pixels per side of the coarse grid on which a sign's ink is compared
TEXT_CHANGE_MIN = 0.3  # relative L1 distance of ink densities from the source's: the word was rewritten


@dataclass(frozen=True)
class Detection:
    """One object found in an image; geometry in the spec's pixel coordinates."""

    color: str
    shape: str | None  # None: no shape template fits (SHAPE_MIN_IOU)
    center: tuple[float, float]
    radius: float  # half the longer side of the bounding box, like a spec object's radius
    box: tuple[int, int, int, int]  # inclusive bounds in image pixels
    area: int  # image pixels


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Per-pixel class (BG, 1 + index in COLORS, DARK or OTHER) of an HxWx3 uint8 image."""
    white = np.asarray(BACKGROUND, dtype=np.float32)
    q = white - image.reshape(-1, 3).astype(np.float32)  # [N, 3] how far from white
    d = white - np.asarray([PALETTE[c] for c in COLORS], dtype=np.float32)  # [C, 3]
    alpha = np.clip(q @ d.T / (d * d).sum(1), 0.0, 1.0)  # [N, C] colour fraction of a colour/white mix
    residual = np.linalg.norm(q[:, None, :] - alpha[..., None] * d[None], axis=-1)
    best = residual.argmin(1)
    rows = np.arange(len(q))
    explained = residual[rows, best] <= MAX_RESIDUAL
    classes = np.where(alpha[rows, best] >= 0.5, best + 1, BG)
    dark = (255 - q).mean(1) < DARK_LEVEL
    classes = np.where(explained, classes, np.where(dark, DARK, OTHER))
    return classes.reshape(image.shape[:2]).astype(np.int8)


def label_regions(classes: np.ndarray) -> np.ndarray:
    """4-connected regions of equal nonzero class: each pixel gets the smallest flat index in its region
    (-1 for class 0). Min-label propagation with pointer jumping: numpy only, a few ms at 128 px."""
    h, w = classes.shape
    fg = classes != 0
    right = fg[:, :-1] & (classes[:, :-1] == classes[:, 1:])
    down = fg[:-1] & (classes[:-1] == classes[1:])
    labels = np.arange(h * w).reshape(h, w)
    while True:
        new = labels.copy()
        m = np.minimum(new[:, :-1], new[:, 1:])
        new[:, :-1] = np.where(right, m, new[:, :-1])
        new[:, 1:] = np.where(right, np.minimum(new[:, 1:], m), new[:, 1:])
        m = np.minimum(new[:-1], new[1:])
        new[:-1] = np.where(down, m, new[:-1])
        new[1:] = np.where(down, np.minimum(new[1:], m), new[1:])
        flat = new.reshape(-1)
        new = flat[flat].reshape(h, w)  # a label is a pixel of the same region: jump to its label
        if np.array_equal(new, labels):
            return np.where(fg, labels, -1)
        labels = new


@cache
def _templates() -> dict[str, np.ndarray]:
    """Masks of each shape as render_scene draws it, filling a (2R+1)^2 box."""
    r = TEMPLATE_RADIUS
    out = {}
    for shape in SHAPES:
        obj = {"shape": shape, "color": COLORS[0], "size": "large", "center": [r, r], "radius": r}
        spec = {"width": 2 * r + 1, "height": 2 * r + 1, "background": list(BACKGROUND), "objects": [obj]}
        out[shape] = np.asarray(render_scene(spec))[..., 1] != BACKGROUND[1]
    return out


def _shape_of(mask: np.ndarray) -> str | None:
    """The shape whose template best overlaps the region stretched to the template's box, if it fits well."""
    side = 2 * TEMPLATE_RADIUS + 1
    crop = Image.fromarray(mask.astype(np.uint8) * 255).resize((side, side), Image.BILINEAR)
    region = np.asarray(crop) >= 128
    ious = {s: (region & t).sum() / max(1, (region | t).sum()) for s, t in _templates().items()}
    best = max(ious, key=ious.get)
    return best if ious[best] >= SHAPE_MIN_IOU else None


def _min_area(image_shape: tuple[int, ...]) -> float:
    """A quarter of the smallest object (a triangle of the smallest radius), at the image's scale."""
    r = RADIUS_RANGE_64["small"][0] * min(image_shape[:2]) / 64
    return 0.25 * 2 * r * r


def _to_spec(image_shape: tuple[int, ...], spec: dict) -> tuple[float, float]:
    """Scale factors from image pixels to spec pixels along x and y."""
    return spec["width"] / image_shape[1], spec["height"] / image_shape[0]


def detect_objects(image: np.ndarray, spec: dict, classes: np.ndarray | None = None) -> list[Detection]:
    """Coloured objects in an image, largest first, with geometry in `spec`'s coordinates."""
    classes = classify_pixels(image) if classes is None else classes
    colored = np.where((classes >= 1) & (classes <= len(COLORS)), classes, 0)
    labels = label_regions(colored)
    ids, areas = np.unique(labels[labels >= 0], return_counts=True)
    order = np.argsort(-areas, kind="stable")
    sx, sy = _to_spec(image.shape, spec)
    found = []
    for i in order[:MAX_DETECTIONS]:
        if areas[i] < _min_area(image.shape):
            break
        ys, xs = np.nonzero(labels == ids[i])
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        mask = labels[y0 : y1 + 1, x0 : x1 + 1] == ids[i]
        cls = int(classes.flat[ids[i]])
        found.append(
            Detection(
                color=COLORS[cls - 1],
                shape=_shape_of(_fill_holes(mask)),  # noise can punch holes in a region
                center=(((x0 + x1) / 2 + 0.5) * sx - 0.5, ((y0 + y1) / 2 + 0.5) * sy - 0.5),
                radius=(max((x1 - x0 + 1) * sx, (y1 - y0 + 1) * sy) - 1) / 2,
                box=(int(x0), int(y0), int(x1), int(y1)),
                area=int(areas[i]),
            )
        )
    return found


def _size_of(det: Detection, spec: dict) -> str:
    """Small or large: split halfway between the largest small and the smallest large radius."""
    small_hi = radius_range("small", spec["width"], spec["height"])[1]
    large_lo = radius_range("large", spec["width"], spec["height"])[0]
    return "large" if det.radius >= (small_hi + large_lo) / 2 else "small"


def _cell(center: tuple[float, float] | list[int], spec: dict) -> tuple[int, int]:
    """Column and row on the 3x3 grid of region_phrase (its thirds, without the borderline margin)."""
    return tuple(
        min(2, int(3 * (c + 0.5) / side))
        for c, side in zip(center, (spec["width"], spec["height"]), strict=True)
    )


def _relation_holds(spec: dict, rel: str, a: Detection, b: Detection) -> bool:
    """Whether detected `a` is `rel` of `b` (relation's phrases and distance; the dominant axis need not
    be twice the other, only the larger one: generated layouts are not drawn to the caption's margin)."""
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    along = [b.center[0], a.center[1]] if abs(dx) >= abs(dy) else [a.center[0], b.center[1]]
    return relation(spec, {"center": list(a.center)}, {"center": along}) == rel


def _match(objects: list[dict], dets: list[Detection]) -> list[Detection | None]:
    """Give each spec object a distinct detection: exact colour+shape matches first, then colour only,
    nearest first; this maximises the colour and shape checks passed."""
    assigned: list[Detection | None] = [None] * len(objects)
    used: set[int] = set()
    for same_shape in (True, False):
        pairs = sorted(
            (np.hypot(d.center[0] - o["center"][0], d.center[1] - o["center"][1]), i, j)
            for i, o in enumerate(objects)
            for j, d in enumerate(dets)
            if d.color == o["color"] and (d.shape == o["shape"] or not same_shape)
        )
        for _, i, j in pairs:
            if assigned[i] is None and j not in used:
                assigned[i] = dets[j]
                used.add(j)
    return assigned


def _result(checks: dict[str, bool], **extra: object) -> dict:
    score = float(np.mean(list(checks.values()))) if checks else 1.0
    return {"score": score, "correct": all(checks.values()), "checks": checks, **extra}


def score_t2i(image: np.ndarray, spec: dict, caption: str | None = None) -> dict:
    """Checks of a text-to-image sample, all weighted equally in ``score``.

    Objects: per spec object ``object{i}_color`` (a distinct detection of its colour) and
    ``object{i}_shape`` (that detection has its shape); ``no_extra`` (as many objects as the spec);
    ``relation`` for two objects of different kinds whose layout is unambiguous (every caption of such a
    scene states it). With a caption, also ``object{i}_size`` where it names the size and
    ``object{i}_region`` where it names the region. Signs: see score_sign.

    ``score`` is the fraction of checks passed times ``n_spec / max(n_spec, n_detected)``: each extra
    object costs in proportion, so covering the canvas with shapes of every colour (which an RL policy
    finds quickly when extras cost only the one ``no_extra`` check) does not pay.
    """
    if "sign" in spec:
        return score_sign(image, spec)
    objects = spec["objects"]
    dets = detect_objects(image, spec)
    matched = _match(objects, dets)
    checks: dict[str, bool] = {}
    for i, (obj, det) in enumerate(zip(objects, matched, strict=True)):
        checks[f"object{i}_color"] = det is not None
        checks[f"object{i}_shape"] = det is not None and det.shape == obj["shape"]
        if caption is not None and f"{obj['size']} {obj['color']} {obj['shape']}" in caption:
            checks[f"object{i}_size"] = det is not None and _size_of(det, spec) == obj["size"]
        where = region_phrase(spec, obj)
        if caption is not None and len(objects) == 1 and where and where in caption:
            checks[f"object{i}_region"] = det is not None and _cell(det.center, spec) == _cell(
                obj["center"], spec
            )
    checks["no_extra"] = len(dets) == len(objects)
    kinds = {(o["color"], o["shape"]) for o in objects}
    if len(objects) == 2 and len(kinds) == 2 and (rel := relation(spec, *objects)):
        a, b = matched
        checks["relation"] = a is not None and b is not None and _relation_holds(spec, rel, a, b)
    result = _result(checks, detections=len(dets))
    result["score"] *= len(objects) / max(len(objects), len(dets), 1)
    return result


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus every pixel it encloses (not connected to the border through non-mask pixels)."""
    outside = label_regions(np.pad(~mask, 1, constant_values=True).astype(np.int8))
    border = np.unique(np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]]))
    return ~np.isin(outside, border[border >= 0])[1:-1, 1:-1] | mask


def find_sign(image: np.ndarray, classes: np.ndarray | None = None) -> dict | None:
    """The largest coloured region with its filled box: a sign candidate (None in a colourless image)."""
    classes = classify_pixels(image) if classes is None else classes
    colored = np.where((classes >= 1) & (classes <= len(COLORS)), classes, 0)
    labels = label_regions(colored)
    if not (labels >= 0).any():
        return None
    ids, areas = np.unique(labels[labels >= 0], return_counts=True)
    k = int(ids[areas.argmax()])
    ys, xs = np.nonzero(labels == k)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    region = labels[y0 : y1 + 1, x0 : x1 + 1] == k
    holes = _fill_holes(region) & ~region
    return {
        "color": COLORS[int(classes.flat[k]) - 1],
        "box": (x0, y0, x1, y1),
        "area": int(areas.max()),
        "filled": int(region.sum() + holes.sum()),
        "hole_classes": classes[y0 : y1 + 1, x0 : x1 + 1][holes],
    }


def _box_area(box: tuple[int, int, int, int] | list[int]) -> int:
    return (box[2] - box[0] + 1) * (box[3] - box[1] + 1)


def _sign_checks(image: np.ndarray, spec: dict, classes: np.ndarray) -> tuple[dict[str, bool], dict | None]:
    sign = spec["sign"]
    found = find_sign(image, classes)
    box_area = _box_area(found["box"]) if found else 1
    ink_class = BG if TEXT_COLORS[sign["text_color"]] == BACKGROUND else DARK
    # Colour and ink count only on a real sign: a patch of noise of the right colour is not one.
    real = (
        found is not None
        and found["area"] >= SIGN_MIN_AREA * classes.size
        and found["filled"] >= SIGN_MIN_FILL * box_area
    )
    checks = {
        "sign_found": real,
        "sign_color_ok": real and found["color"] == sign["color"],
        "sign_text_ink_ok": real and (found["hole_classes"] == ink_class).sum() >= SIGN_MIN_INK * box_area,
    }
    return checks, found


def score_sign(image: np.ndarray, spec: dict) -> dict:
    """Sign checks of a text-rendering sample, weighted equally: ``sign_found`` (a large filled rectangle),
    ``sign_color_ok`` (that sign has the sign's colour) and ``sign_text_ink_ok`` (it encloses ink of the
    text colour).
    Whether the ink spells ``text`` is OCR's to judge, inside ``sign_box`` (image pixels; None if no sign)."""
    checks, found = _sign_checks(image, spec, classify_pixels(image))
    return _result(checks, text=spec["sign"]["text"], sign_box=found["box"] if found else None)


def _spec_box(obj: dict) -> tuple[int, int, int, int]:
    """A spec object's inclusive box in spec pixels."""
    (x, y), r = obj["center"], obj["radius"]
    return x - r, y - r, x + r, y + r


def _to_image_box(
    box: tuple[int, ...] | list[int], sx: float, sy: float, margin: float = 0.0
) -> tuple[int, ...]:
    """An inclusive spec-pixel box grown by `margin` spec pixels, as an exclusive-end box in image pixels."""
    x0, y0, x1, y1 = box
    return (
        int(np.floor((x0 - margin) / sx)),
        int(np.floor((y0 - margin) / sy)),
        int(np.ceil((x1 + 1 + margin) / sx)),
        int(np.ceil((y1 + 1 + margin) / sy)),
    )


def _exclusive(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    return box[0], box[1], box[2] + 1, box[3] + 1


def _iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """IoU of two exclusive-end boxes."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def render_at(spec: dict, shape: tuple[int, ...]) -> np.ndarray:
    """A spec's exact render at an image's size (nearest-neighbour resized), to compare pixels with."""
    render = render_scene(spec)
    if render.size != (shape[1], shape[0]):
        render = render.resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(render)


def _box_mask(shape: tuple[int, ...], boxes: list[tuple[int, ...]]) -> np.ndarray:
    """Pixels inside any of the exclusive-end image boxes."""
    mask = np.zeros(shape[:2], dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    return mask


def _ink_density(image: np.ndarray, sign: dict, box: tuple[int, ...]) -> np.ndarray:
    """Mean text-colour fraction (along the sign-to-text colour line) per TEXT_CELL cell of `box`
    (image pixels, exclusive ends): blur keeps local means and noise averages out, unlike pixel classes."""
    s = np.asarray(PALETTE[sign["color"]], dtype=np.float32)
    t = np.asarray(TEXT_COLORS[sign["text_color"]], dtype=np.float32)
    x0, y0, x1, y1 = max(0, box[0]), max(0, box[1]), box[2], box[3]
    ink = (image[y0:y1, x0:x1].astype(np.float32) - s) @ (t - s) / ((t - s) @ (t - s))
    h, w = ink.shape
    ink = np.pad(ink, ((0, -h % TEXT_CELL), (0, -w % TEXT_CELL)))
    cells = ink.reshape(ink.shape[0] // TEXT_CELL, TEXT_CELL, -1, TEXT_CELL).mean((1, 3))
    return np.clip(cells, 0.0, 1.0)


def drop_specks(classes: np.ndarray) -> np.ndarray:
    """Classes with coloured regions too small to be objects (noise) set to background."""
    colored = (classes >= 1) & (classes <= len(COLORS))
    labels = label_regions(np.where(colored, classes, 0))
    ids, inverse, areas = np.unique(labels, return_inverse=True, return_counts=True)
    small = (areas < _min_area(classes.shape)) & (ids >= 0)
    return np.where(small[inverse.reshape(classes.shape)], BG, classes)


def _agrees(classes: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Whether each pixel's class occurs in `reference` within one pixel (blur moves edges by about one)."""
    h, w = classes.shape
    padded = np.pad(reference, 1, mode="edge")
    return np.logical_or.reduce(
        [padded[dy : dy + h, dx : dx + w] == classes for dy in range(3) for dx in range(3)]
    )


def preserved_pixels(classes: np.ndarray, source: np.ndarray, edited: np.ndarray) -> float:
    """Agreement of pixel classes with the source's outside the `edited` mask, over pixels coloured in
    either: blank or unchanged background cannot inflate it (1.0 when there are none)."""
    roi = ~edited & ((source != BG) | (classes != BG))
    agree = _agrees(classes, source) & _agrees(source, classes)
    return float(agree[roi].mean()) if roi.any() else 1.0


def _dist(det: Detection, obj: dict) -> float:
    return float(np.hypot(det.center[0] - obj["center"][0], det.center[1] - obj["center"][1]))


def _near(det: Detection, obj: dict) -> bool:
    """Within half a radius (plus a pixel) of where a spec object is: "left where it was"."""
    return _dist(det, obj) <= obj["radius"] / 2 + 1


def _object_edit_checks(
    source_spec: dict, target_spec: dict, info: dict, free: list[Detection]
) -> tuple[dict[str, bool], list[dict], list[Detection]]:
    """Checks that an object edit was made, given the detections not taken by untouched objects; also the
    spec objects and detections whose area the edit may change (left out of preserved_pixels)."""
    kind, idx = info["kind"], info["object"]
    if kind == "add":
        new = target_spec["objects"][idx]
        same = [d for d in free if d.color == new["color"]]
        shaped = [d for d in same if d.shape == new["shape"]]
        sized = [d for d in shaped if _size_of(d, target_spec) == new["size"]]
        checks = {"edit_color": bool(same), "edit_shape": bool(shaped), "edit_size": bool(sized)}
        return checks, [new], (sized or shaped or same)[:1]
    old = source_spec["objects"][idx]
    if kind == "recolour":
        new = target_spec["objects"][idx]
        here = [d for d in free if _near(d, new)]
        recoloured = not any(d.color == old["color"] for d in here)
        checks = {
            "edit_color": recoloured and any(d.color == new["color"] for d in here),
            "edit_shape": recoloured
            and any((d.color, d.shape) == (new["color"], new["shape"]) for d in here),
        }
        return checks, [old], []
    same = [d for d in free if (d.color, d.shape) == (old["color"], old["shape"])]
    if kind == "remove":
        return {"edit_removed": not same}, [old], []
    if kind == "move":
        ux, uy = np.sign(info["offset"])
        min_shift = min(source_spec["width"], source_spec["height"]) / 12

        def shift(d: Detection) -> tuple[float, float]:
            dx, dy = d.center[0] - old["center"][0], d.center[1] - old["center"][1]
            return dx * ux + dy * uy, abs(dx * uy - dy * ux)  # along the direction, across it

        best = max(same, key=lambda d: shift(d)[0], default=None)
        along, across = shift(best) if best else (0.0, 0.0)
        checks = {"edit_moved": best is not None and along >= min_shift and across < along}
        return checks, [old, target_spec["objects"][idx]], [best] if best else []
    raise ValueError(f"unknown edit kind {kind!r}")


def score_edit(image: np.ndarray, source_spec: dict, target_spec: dict, edit_info: dict) -> dict:
    """Checks of an edited image: ``score = edit part * preservation part``, each the mean of its checks.

    The product makes both necessary: returning the source image unchanged, or a blank image, scores 0.
    Edit checks by kind: recolour ``edit_color`` (the new colour and not the old at the object's place)
    and ``edit_shape`` (with its shape); remove ``edit_removed``; add ``edit_color``, ``edit_shape`` and
    ``edit_size`` (anywhere: instructions do not place it); move ``edit_moved`` (in the stated direction
    by at least a twelfth of the image); retext ``edit_text_changed`` (a sign with text ink whose text
    area differs from the source's); whether it reads ``text`` is OCR's to judge, in ``sign_box``. Preservation: ``kept{i}``
    per untouched source object i (its colour and shape where it was; for signs the score_sign checks
    and ``sign_box_ok``), ``no_extra``, and the fraction
    ``preserve_pixels`` (see preserved_pixels; ``correct`` needs PRESERVE_MIN).
    """
    classes = drop_specks(classify_pixels(image))
    source_image = render_at(source_spec, image.shape)
    source = classify_pixels(source_image)
    sx, sy = _to_spec(image.shape, source_spec)
    margin = max(1.0, source_spec["height"] / 32)  # blur reaches past an edited object's box
    extra: dict[str, object] = {}
    if edit_info["kind"] == "retext":
        keep, found = _sign_checks(image, target_spec, classes)
        source_box = _to_image_box(source_spec["sign"]["box"], sx, sy)
        keep["sign_box_ok"] = found is not None and _iou(_exclusive(found["box"]), source_box) >= SIGN_MIN_IOU
        edited = _box_mask(
            image.shape,
            [_to_image_box(s["sign"]["text_box"], sx, sy, margin) for s in (source_spec, target_spec)],
        )
        old_ink = _ink_density(source_image, source_spec["sign"], source_box)
        new_ink = _ink_density(image, source_spec["sign"], source_box)
        changed = np.abs(new_ink - old_ink).sum() / max(1e-6, (new_ink + old_ink).sum())
        # Erasing the word, or drawing no sign at all, changes the ink too: rewritten text needs a sign with ink.
        rewritten = keep["sign_found"] and keep["sign_text_ink_ok"] and changed >= TEXT_CHANGE_MIN
        edit = {"edit_text_changed": bool(rewritten)}
        extra = {"text": target_spec["sign"]["text"], "sign_box": found["box"] if found else None}
    else:
        dets = detect_objects(image, source_spec, classes)
        idx = edit_info["object"]
        free = list(dets)
        keep = {}
        for i, obj in enumerate(source_spec["objects"]):
            if i == idx and edit_info["kind"] != "add":
                continue
            hits = [d for d in free if (d.color, d.shape) == (obj["color"], obj["shape"]) and _near(d, obj)]
            keep[f"kept{i}"] = bool(hits)
            if hits:
                free.remove(min(hits, key=lambda d: _dist(d, obj)))
        keep["no_extra"] = len(dets) == len(target_spec["objects"])
        edit, touched, moved = _object_edit_checks(source_spec, target_spec, edit_info, free)
        edited = _box_mask(
            image.shape,
            [_to_image_box(_spec_box(o), sx, sy, margin) for o in touched]
            + [_exclusive(d.box) for d in moved],
        )
    preserve = preserved_pixels(classes, source, edited)
    edit_score = float(np.mean(list(edit.values())))
    keep_score = float(np.mean([*keep.values(), preserve]))
    checks = {**edit, **keep}
    return {
        "score": edit_score * keep_score,
        "correct": all(checks.values()) and preserve >= PRESERVE_MIN,
        "checks": checks,
        "preserve_pixels": preserve,
        "edit_score": edit_score,
        "preserve_score": keep_score,
        **extra,
    }
