"""Cached VAE latents: each image's VAE posterior stored next to it in the shards, made once.

Training encodes every target and reference image with the frozen VAE at every step. With the cache
(``python convert.py latents``, then ``data.vae_latents=true``) it reads the posterior instead and only
draws the latent from it (``DeepGenBackbone.sample_latents``), so the noise of the VAE sample is kept
and cached and uncached runs give the same loss for the same random draws (up to the cache's float16).

A posterior is only right for the VAE that made it and for the resize it was made at, so each sample's
json records both (``schema.LATENT_RECORD``): the reader refuses a cache of another ``image_size`` or
``size_unit``, and the training step refuses one whose VAE fingerprint is not its own VAE's.

Adding latents rewrites each shard (atomically, under the same name) with the same samples, the same
members and ``<image>.latent.npy`` members added; shards that already hold this VAE's latents at this
resize are left alone, so an interrupted run resumes and new shards can be added later.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from deepgen.data.resolution import decode_fix_pixels
from deepgen.data.schema import (
    LATENT_RECORD,
    LATENT_SUFFIX,
    TASKS,
    image_member,
    latent_member,
    source_members,
    target_member,
)
from deepgen.data.shards import to_unit_range
from deepgen.data.writer import MANIFEST_NAME, json_bytes, write_manifest, write_shard

FINGERPRINT_CHARS = 16
"""Hex digits of the sha256 kept as a VAE's fingerprint (64 bits: enough to tell VAEs apart)."""


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha256 of a VAE's config (without diffusers' private ``_`` keys) and of its weights as float32.

    The same weights give the same fingerprint on any device, in any folder and from any file format;
    a VAE loaded in a lower precision computes other latents and gets another fingerprint.
    """
    digest = hashlib.sha256()
    config = {k: v for k, v in dict(getattr(vae, "config", {})).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}{tuple(data.shape)}".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def _moments_bytes(moments: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, moments.to("cpu", torch.float16).numpy(), allow_pickle=False)
    return buf.getvalue()


def read_samples(path: str | Path) -> list[dict]:
    """A shard's samples in order as ``{"__key__": key, member: bytes}`` (webdataset's grouping: the key is
    the member name up to its first dot), without any cached latents it holds."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, member = info.name.partition(".")
            if member.endswith(LATENT_SUFFIX):
                continue
            samples.setdefault(key, {"__key__": key})[member] = tar.extractfile(info).read()
    return list(samples.values())


def _shard_record(path: Path) -> dict | None:
    """The latent record of a shard's first sample (a shard is always rewritten whole), or None."""
    with tarfile.open(path) as tar:
        for info in tar:
            if info.isfile() and info.name.endswith(".json") and info.name.count(".") == 1:
                try:
                    return json.loads(tar.extractfile(info).read()).get(LATENT_RECORD)
                except (ValueError, AttributeError):
                    return None
    return None


def _image_members(sample: dict, task: str) -> list[str]:
    names = [n for n in sample if not n.startswith("__")]
    if task == "t2i":
        image = image_member(names)
        return [image] if image else []
    target = target_member(names)
    sources = source_members(names)
    return [*sources, target] if target and sources else []


@torch.no_grad()
def _encode_shard(
    samples: list[dict], task: str, vae: torch.nn.Module, record: dict, batch_size: int
) -> dict[str, int]:
    """Add ``<image>.latent.npy`` members and the json record to `samples` in place; returns skips by reason.

    Images are decoded and resized exactly as the reader does, and encoded in batches of one size. A
    sample whose json or images do not read is left as it is: the reader skips it anyway.
    """
    skipped: dict[str, int] = {}
    pending: dict[tuple[int, ...], list[tuple[dict, str, torch.Tensor]]] = {}
    device = next(vae.parameters()).device

    def flush(shape: tuple[int, ...]) -> None:
        group = pending.pop(shape, [])
        if group:
            pixels = torch.stack([pixels for _, _, pixels in group]).to(device, torch.float32)
            moments = vae.encode(pixels).latent_dist.parameters
            for (sample, member, _), m in zip(group, moments, strict=True):
                sample[latent_member(member)] = _moments_bytes(m)

    for sample in samples:
        members = _image_members(sample, task)
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
            if not isinstance(meta, dict) or not members:
                raise ValueError("not a sample")
            decoded = [
                to_unit_range(decode_fix_pixels(sample[m], record["image_size"], record["size_unit"]))
                for m in members
            ]
        except Exception:  # bad json or a corrupt image: the reader skips this sample, so no latents
            skipped["unreadable"] = skipped.get("unreadable", 0) + 1
            continue
        sample["json"] = json_bytes({**meta, LATENT_RECORD: record})
        for member, pixels in zip(members, decoded, strict=True):
            group = pending.setdefault(tuple(pixels.shape), [])
            group.append((sample, member, pixels))
            if len(group) == batch_size:
                flush(tuple(pixels.shape))
    for shape in list(pending):
        flush(shape)
    return skipped


def add_vae_latents(
    shards_dir: str | Path,
    vae: torch.nn.Module,
    *,
    image_size: int,
    size_unit: int = 32,
    batch_size: int = 16,
    vae_dir: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Cache `vae`'s posterior of every image of the t2i-*/edit-* shards of `shards_dir`, as training at
    `image_size`/`size_unit` resizes them; record it in manifest.json (``vae_latents``). Returns the report
    stored there, plus "written": the shards (re)written by this call."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shards_dir = Path(shards_dir)
    paths = sorted(p for task in TASKS for p in shards_dir.glob(f"{task}-*.tar"))
    if not paths:
        raise FileNotFoundError(f"no t2i-*.tar or edit-*.tar shards in {shards_dir}")
    fingerprint = vae_fingerprint(vae)
    record = {"vae": fingerprint, "image_size": image_size, "size_unit": size_unit}
    log(f"VAE {fingerprint}{f' ({vae_dir})' if vae_dir else ''}: caching latents of {len(paths)} shards")
    counts, skipped, written = {}, {}, 0
    for path in tqdm(paths, unit="shard", desc="VAE latents", disable=not progress):
        if _shard_record(path) == record:
            continue
        samples = read_samples(path)
        for reason, n in _encode_shard(samples, path.name.split("-")[0], vae, record, batch_size).items():
            skipped[reason] = skipped.get(reason, 0) + n
        counts[path.name] = write_shard(path, samples)
        written += 1
    manifest_path = shards_dir / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    for task_shards in manifest.get("shards", {}).values():
        counts = {**task_shards, **counts}
    report = {
        **record,
        "vae_dir": vae_dir,
        "dtype": "float16",
        "members": f"<image member stem>.{LATENT_SUFFIX}: the posterior's mean then log-variance, [2C, h, w]",
        "shards": len(paths),
    }
    info = {k: v for k, v in manifest.items() if k not in ("counts", "shards", "schema_version")}
    write_manifest(shards_dir, {**info, LATENT_RECORD: report}, counts=counts)
    if skipped:
        log(f"left without latents (the reader skips them too): {skipped}")
    return {**report, "written": written, "skipped": skipped}
