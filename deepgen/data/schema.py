"""The shard schema in code: sample keys, required and optional json fields, and the version.

Every sample's json carries ``"schema_version"``; readers refuse shards written by a newer major
version and name the shard, writers always stamp the current one. The human-readable description
is data/README.md; the two must change together.
"""

from __future__ import annotations

import re

SCHEMA_VERSION = 1

TASKS = ("t2i", "edit")
TEXT_FIELD = {"t2i": "caption", "edit": "instruction"}
"""The one required text field per task."""

CATEGORIES = ("general", "text_rendering", "reasoning")
"""Optional ``category`` of a sample: plain pairs/edits, text written in the image, or prompts that
need world knowledge to resolve (the tiny world's "a circle the colour of a ripe banana")."""

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
SOURCE_MEMBER = re.compile(r"^src(\d*)\.(png|jpg|jpeg|webp)$")
TARGET_MEMBER = re.compile(r"^tgt\.(png|jpg|jpeg|webp)$")

LATENT_SUFFIX = "latent.npy"
"""Optional cached VAE posterior of an image member (``python convert.py latents``): ``latent.npy`` for a
T2I sample's image, ``src.latent.npy``, ``src1.latent.npy``, ``tgt.latent.npy`` for an edit's images.
A float16 ``[2C, h, w]`` array: the posterior's mean then its log-variance on the channel axis (what
diffusers' ``latent_dist.parameters`` holds), of the image after the reader's fix-pixels resize."""
LATENT_RECORD = "vae_latents"
"""json field of a sample with cached latents: ``{"vae": fingerprint, "image_size": int, "size_unit": int}``,
the VAE that made them and the resize they were made at."""


class SchemaError(ValueError):
    """A sample that does not follow the shard schema (the message says which field)."""


def check_meta(meta: object, task: str) -> dict:
    """Validate a sample's parsed json for `task`; return it unchanged or raise SchemaError."""
    if task not in TASKS:
        raise SchemaError(f"unknown task {task!r}; expected one of {TASKS}")
    if not isinstance(meta, dict):
        raise SchemaError(f"json must be an object, got {type(meta).__name__}")
    version = meta.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise SchemaError(
            f"schema_version {version!r} is newer than this reader's {SCHEMA_VERSION}; upgrade deepgen"
        )
    if meta.get("task", task) != task:
        raise SchemaError(f"json says task {meta.get('task')!r} inside a {task} shard")
    text = meta.get(TEXT_FIELD[task])
    if not isinstance(text, str):
        raise SchemaError(f"missing or non-string {TEXT_FIELD[task]!r}")
    category = meta.get("category", "general")
    if category not in CATEGORIES:
        raise SchemaError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    return meta


def source_members(names: list[str]) -> list[str]:
    """The source-image members of an edit sample, ordered src, src1, src2, ..."""
    found = [n for n in names if SOURCE_MEMBER.match(n)]
    return sorted(found, key=lambda n: int(SOURCE_MEMBER.match(n).group(1) or 0))


def target_member(names: list[str]) -> str | None:
    return next((n for n in names if TARGET_MEMBER.match(n)), None)


def image_member(names: list[str]) -> str | None:
    """The image member of a T2I sample (png, jpg, jpeg or webp)."""
    return next((n for n in names if n in IMAGE_EXTENSIONS), None)


def latent_member(image: str) -> str:
    """The member holding the cached VAE posterior of image member `image` ("png", "src1.jpg", ...)."""
    stem = image.rsplit(".", 1)[0] if "." in image else ""
    return f"{stem}.{LATENT_SUFFIX}" if stem else LATENT_SUFFIX
