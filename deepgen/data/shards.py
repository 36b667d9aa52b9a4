"""Webdataset readers: shards -> single-task batches in a fixed T2I/edit cycle, resumable exactly.

Batch formats (images are float32 in [-1, 1], CHW, resized with the fix-pixels rule):

    t2i:  {"task": "t2i", "images": [B, 3, H, W], "captions": [str] * B, "specs": [dict] * B,
           "keys": [str] * B, "datasets": [dataset name] * B}
    edit: {"task": "edit", "sources": [[Tensor[3, h, w], ...]] * B, "targets": [B, 3, H, W],
           "instructions": [str] * B, "specs": [dict] * B (the sample's whole json), ...same extras}

With ``data.vae_latents`` a batch also carries the cached VAE posteriors (float16, ``[2C, h, w]`` per
image: mean then log-variance) and where they came from, so the model can check its VAE made them:

    "vae_moments": {"images" (t2i) | "targets" (edit): [B, 2C, h, w], "sources" (edit): [[Tensor]] * B,
                    "vae": [VAE fingerprint] * B, "shards": [shard url] * B, "image_size", "size_unit"}

Per task and per (rank, DataLoader worker), one deterministic pipeline:

    raw samples of each dataset (split by node and worker, seeded shuffle, optionally resampled)
      -> weighted per-sample mixture of the task's datasets (seeded)
      -> parse: json, schema, image headers (cheap; bad samples skipped and counted per reason)
      -> group into batches (by target size when bucketing, so batches are dense)
      -> decode and resize the images of each group (expensive)

Everything before "decode" is cheap and a pure function of the seed, so resuming replays it and
skips the groups already trained on without decoding them: a resumed run sees exactly the samples
an uninterrupted run would have seen. The shard schema is in data/README.md.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from deepgen.config import DataConfig
from deepgen.data.resolution import decode_fix_pixels, fix_pixels_size
from deepgen.data.schema import (
    LATENT_RECORD,
    SchemaError,
    check_meta,
    image_member,
    latent_member,
    source_members,
    target_member,
)

log = logging.getLogger(__name__)

TASK_IDS = {"t2i": 1, "edit": 2}
WARNINGS_PER_REASON = 20
"""Each worker logs the first skips of each reason one by one, then only every 1000th."""


class BadDataError(RuntimeError):
    """Too many bad samples in one shard: probably a broken shard or a wrong layout, not noise."""


class LatentCacheError(RuntimeError):
    """data.vae_latents is on but a shard has no usable cache (none, another resize, another VAE)."""


def latents_hint(url: str, image_size: int, size_unit: int, vae: str = "<model.dit_path>") -> str:
    """The command that (re)makes the cache of the shard folder of `url`, for error messages."""
    folder = url if "://" in url or url.startswith("pipe:") else str(Path(url).parent)
    return (
        f"run `python convert.py latents --shards {folder} --vae {vae} --image-size {image_size} "
        f"--size-unit {size_unit}`, or set data.vae_latents=false"
    )


@dataclass
class Source:
    """One dataset of a task's mixture: its shard urls and its sampling weight."""

    name: str
    urls: list[str]
    weight: float = 1.0


@dataclass
class ReadOptions:
    """The reader's settings; each one means what the same-named field of deepgen.config.DataConfig says
    (``unit`` is ``size_unit``), where the defaults are documented."""

    image_size: int
    unit: int
    seed: int
    shuffle_buffer: int
    resampled: bool
    bucketing: bool
    max_aspect: float
    min_side: int
    max_bad_fraction: float
    bad_check_min_samples: int
    vae_latents: bool = False

    @classmethod
    def from_config(cls, cfg: DataConfig) -> ReadOptions:
        fields = {f: getattr(cfg, f) for f in cls.__dataclass_fields__ if f != "unit"}
        return cls(unit=cfg.size_unit, **fields)


@dataclass
class DataHealth:
    """Skipped samples per reason, and per shard the samples read and skipped (this process only)."""

    max_bad_fraction: float = 0.1
    min_samples: int = 20
    reasons: dict[str, int] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    bad: dict[str, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def read(self, url: str) -> None:
        self.seen[url] = self.seen.get(url, 0) + 1

    def skip(self, url: str, key: str, reason: str, detail: object = "") -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.bad[url] = self.bad.get(url, 0) + 1
        n = self.reasons[reason]
        if n <= WARNINGS_PER_REASON or n % 1000 == 0:
            log.warning("skipping sample %s in %s: %s %s (%d %s so far)", key, url, reason, detail, n, reason)
        seen, bad = max(self.seen.get(url, 0), self.bad[url]), self.bad[url]
        if seen >= self.min_samples and bad / seen > self.max_bad_fraction:
            raise BadDataError(
                f"shard {url}: {bad} of {seen} samples bad (last: {reason} {detail}), above "
                f"data.max_bad_fraction={self.max_bad_fraction}; check or regenerate this shard"
            )

    def handler(self, exn: Exception) -> bool:
        """webdataset handler for unreadable tars and members (e.g. a truncated tar): count, go on."""
        url = exn.args[-1] if exn.args and isinstance(exn.args[-1], str) else "?"  # webdataset appends it
        self.skip(url, "?", "read_error", repr(exn)[:200])
        return True


# --------------------------------------------------------------------------------------- urls
def shard_urls(shards_dir: str | Path, pattern: str) -> list[str]:
    """Sorted shard paths matching a glob pattern, with an actionable error when there are none."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise FileNotFoundError(
            f"shard directory {shards_dir} does not exist (generate or download the shards first)"
        )
    urls = sorted(str(p) for p in shards_dir.glob(pattern))
    if not urls:
        raise FileNotFoundError(f"no shards matching {pattern!r} in {shards_dir}")
    return urls


def resolve_shards(spec: str, task: str) -> list[str]:
    """Shard urls from a directory (its ``<task>-*.tar``), a local glob, or a (brace-expanded) remote
    url: ``pipe:aws s3 cp s3://bucket/t2i-{000000..000099}.tar -``, ``https://host/t2i-{0..9}.tar``."""
    if spec.startswith("pipe:") or "://" in spec:
        import braceexpand

        return list(braceexpand.braceexpand(spec))
    path = Path(spec)
    if path.is_dir():
        return shard_urls(path, f"{task}-*.tar")
    if any(ch in spec for ch in "*?["):
        return shard_urls(path.parent, path.name)
    return _check_urls([spec], task)


def _check_urls(urls: Iterable[str], task: str) -> list[str]:
    urls = [str(u) for u in urls]
    if not urls:
        raise ValueError(f"no {task} shard urls given")
    for url in urls:
        if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
            raise FileNotFoundError(f"{task} shard {url} does not exist")
    return urls


# ----------------------------------------------------------------------------------- pipeline
@dataclass(frozen=True)
class Role:
    """Which share of the data a stream reads: its rank, and its worker slot of `workers`.

    The slot is usually the DataLoader worker id; after a resume it is rotated so that the worker
    the loader asks first continues the stream whose turn it is.
    """

    rank: int = 0
    slot: int = 0
    workers: int = 1

    def seed(self, seed: int, *parts: int) -> int:
        # Only ints: make_seed uses hash(), which is randomised per process for str.
        return wds.utils.make_seed(seed, *parts, self.rank, self.slot)

    def split(self, src: Iterator[dict]) -> Iterator[dict]:
        """webdataset workersplitter: every `workers`-th shard, starting at `slot`."""
        yield from itertools.islice(src, self.slot, None, self.workers)


def _no_extra_seed() -> int:
    return 0


def _raw_samples(
    urls: list[str], opts: ReadOptions, seed: int, role: Role, health: DataHealth
) -> Iterator[dict]:
    """Raw webdataset samples (member -> bytes), split by rank and worker slot, shuffled in a buffer."""
    ds = wds.WebDataset(
        urls,
        resampled=opts.resampled,
        shardshuffle=False if opts.resampled or opts.shuffle_buffer <= 0 else len(urls),
        nodesplitter=wds.split_by_node,
        workersplitter=role.split,
        empty_check=False,
        handler=health.handler,
        seed=seed,
    )
    if opts.resampled:
        # webdataset 1.0.2 seeds its resampler from pid and time, or from the real worker id; make it
        # follow our seed only, which already holds the rank and worker slot.
        assert isinstance(ds.pipeline[0], wds.ResampledShards)
        ds.pipeline[0] = wds.ResampledShards(
            urls, seed=seed, worker_seed=_no_extra_seed, deterministic=True, empty_check=False
        )
    if opts.shuffle_buffer > 0:
        ds = ds.shuffle(opts.shuffle_buffer, seed=seed)
    return iter(ds)


def _mixture(
    task: str, sources: list[Source], opts: ReadOptions, role: Role, health: DataHealth
) -> Iterator[dict]:
    """Samples of the task's datasets, each drawn from dataset i with probability ~ weight i.

    A finite (non-resampled) dataset that runs out leaves the mixture; the rest keep their relative weights.
    """
    if not sources:
        raise ValueError(f"no {task} datasets given")
    for src in sources:
        if src.weight <= 0:
            raise ValueError(f"dataset {src.name!r} has weight {src.weight}; weights must be positive")
    streams = {
        src.name: _raw_samples(src.urls, opts, role.seed(opts.seed, TASK_IDS[task], i), role, health)
        for i, src in enumerate(sources)
    }
    weights = {src.name: src.weight for src in sources}
    rng = random.Random(role.seed(opts.seed, TASK_IDS[task], 1000))
    while streams:
        names = list(streams)
        name = names[0] if len(names) == 1 else rng.choices(names, [weights[n] for n in names])[0]
        try:
            sample = next(streams[name])
        except StopIteration:
            del streams[name]
            continue
        sample["__dataset__"] = name
        yield sample


@dataclass
class Pending:
    """A parsed sample whose images are not decoded yet."""

    key: str
    url: str
    dataset: str
    meta: dict
    images: dict[str, bytes]  # member -> bytes; for edits the sources in order, then the target last
    sizes: list[tuple[int, int]]  # fix-pixels size of each image, in the same order
    latents: list[bytes] | None = None
    """With data.vae_latents: each image's cached posterior (.npy bytes), in the same order."""

    @property
    def size(self) -> tuple[int, int]:
        """The target image's size: the batch's bucket."""
        return self.sizes[-1]


def _header_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:  # reads the header only
        return img.size


def _npy_shape(data: bytes) -> tuple[int, ...]:
    """The shape in a .npy header (the array is not read)."""
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(buf)[0]


def _cached_latents(
    sample: dict, meta: dict, members: list[str], sizes: list[tuple[int, int]], opts: ReadOptions
) -> list[bytes]:
    """The .npy bytes of each image's cached posterior. A shard made without a cache, or for another
    resize, is a setting to fix (LatentCacheError); a missing or malformed member is a bad sample (ValueError)."""
    url = sample.get("__url__", "?")
    record = meta.get(LATENT_RECORD)
    if not isinstance(record, dict):
        raise LatentCacheError(
            f"data.vae_latents=true but sample {sample.get('__key__')} of {url} has no cached VAE latents; "
            + latents_hint(url, opts.image_size, opts.unit)
        )
    made_at = (record.get("image_size"), record.get("size_unit"))
    if made_at != (opts.image_size, opts.unit):
        raise LatentCacheError(
            f"the VAE latents cached in {url} were made at image_size={made_at[0]}, size_unit={made_at[1]}, "
            f"but this run has data.image_size={opts.image_size}, data.size_unit={opts.unit}; "
            + latents_hint(url, opts.image_size, opts.unit)
        )
    latents = []
    for member, (width, height) in zip(members, sizes, strict=True):
        name = latent_member(member)
        if name not in sample:
            raise ValueError(f"no {name}")
        shape = _npy_shape(sample[name])
        # The posterior of a width x height image: [2C, height / f, width / f] for the VAE's factor f.
        if len(shape) != 3 or not shape[1] or height * shape[2] != width * shape[1] or height % shape[1]:
            raise ValueError(f"{name} has shape {shape}, not that of a {width}x{height} image's posterior")
        latents.append(sample[name])
    return latents


def _parse(sample: dict, task: str, opts: ReadOptions, health: DataHealth) -> Pending | None:
    """Cheap checks of one raw sample; None (counted per reason) when it is bad."""
    key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
    health.read(url)
    names = [n for n in sample if not n.startswith("__")]
    if task == "t2i":
        image = image_member(names)
        members = [image] if image else []
    else:
        target = target_member(names)
        members = [*source_members(names), target] if target and source_members(names) else []
    if "json" not in sample or not members:
        health.skip(url, key, "missing_field", f"members {sorted(names)}")
        return None
    try:
        meta = check_meta(json.loads(sample["json"].decode("utf-8")), task)
    except UnicodeDecodeError as exn:
        health.skip(url, key, "bad_text", exn)
        return None
    except SchemaError as exn:
        if "newer than this reader" in str(exn):
            raise SchemaError(f"{url}: {exn}") from None
        health.skip(url, key, "missing_field", exn)
        return None
    except ValueError as exn:
        health.skip(url, key, "bad_json", exn)
        return None
    sizes = []
    for member in members:
        try:
            width, height = _header_size(sample[member])
        except Exception as exn:  # PIL raises many types for corrupt data
            health.skip(url, key, "bad_image", f"{member}: {exn}")
            return None
        if (
            min(width, height) < max(1, opts.min_side)
            or max(width / height, height / width) > opts.max_aspect
        ):
            health.skip(url, key, "bad_size", f"{member} is {width}x{height}")
            return None
        sizes.append(fix_pixels_size(width, height, opts.image_size, opts.unit))
    latents = None
    if opts.vae_latents:
        try:
            latents = _cached_latents(sample, meta, members, sizes, opts)
        except ValueError as exn:  # numpy's header errors are ValueErrors too
            health.skip(url, key, "bad_latent", exn)
            return None
    images = {m: sample[m] for m in members}
    return Pending(key, url, sample.get("__dataset__", "?"), meta, images, sizes, latents)


def _groups(items: Iterator[Pending], batch_size: int, bucketing: bool) -> Iterator[list[Pending]]:
    """Batches of samples; with bucketing, only samples of one target size go together."""
    buckets: dict[tuple[int, int], list[Pending]] = {}
    for item in items:
        bucket = buckets.setdefault(item.size if bucketing else (0, 0), [])
        bucket.append(item)
        if len(bucket) == batch_size:
            yield bucket
            buckets[item.size if bucketing else (0, 0)] = []
    for bucket in buckets.values():  # finite streams: the short leftovers, in first-seen order
        if bucket:
            yield bucket


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return pixels.float().div_(127.5).sub_(1.0)


def _load_moments(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


def _collate(group: list[Pending], task: str, opts: ReadOptions, health: DataHealth) -> dict | None:
    """Decode and resize a group's images (source images of an edit each to its own fix-pixels size)."""
    items, moments = [], []
    for p in group:
        try:
            images = [
                to_unit_range(decode_fix_pixels(data, opts.image_size, opts.unit))
                for data in p.images.values()
            ]
        except Exception as exn:  # truncated or corrupt pixel data behind a valid header
            health.skip(p.url, p.key, "bad_image", exn)
            continue
        if p.latents is not None:
            try:
                moments.append([_load_moments(data) for data in p.latents])
            except ValueError as exn:  # a .npy header that promises more data than there is
                health.skip(p.url, p.key, "bad_latent", exn)
                continue
        items.append((p, images))
    if not items:
        return None
    shapes = {tuple(images[-1].shape) for _, images in items}
    if len(shapes) > 1:
        raise ValueError(
            f"{task} targets in one batch differ in size {sorted(shapes)} (keys {items[0][0].key}.."
            f"{items[-1][0].key}); set data.bucketing=true or data.batch_size=1"
        )
    batch = {
        "task": task,
        "keys": [p.key for p, _ in items],
        "datasets": [p.dataset for p, _ in items],
    }
    if task == "t2i":
        batch["images"] = torch.stack([images[0] for _, images in items])
        batch["captions"] = [p.meta["caption"] for p, _ in items]
        batch["specs"] = [p.meta.get("spec") for p, _ in items]
    else:
        batch["sources"] = [images[:-1] for _, images in items]
        batch["targets"] = torch.stack([images[-1] for _, images in items])
        batch["instructions"] = [p.meta["instruction"] for p, _ in items]
        batch["specs"] = [p.meta for p, _ in items]
    if opts.vae_latents:
        cached = {
            "vae": [p.meta[LATENT_RECORD].get("vae") for p, _ in items],
            "shards": [p.url for p, _ in items],
            "image_size": opts.image_size,
            "size_unit": opts.unit,
        }
        if task == "t2i":
            cached["images"] = torch.stack([m[0] for m in moments])
        else:
            cached["sources"] = [m[:-1] for m in moments]
            cached["targets"] = torch.stack([m[-1] for m in moments])
        batch["vae_moments"] = cached
    return batch


def task_batches(
    task: str,
    sources: list[Source],
    *,
    batch_size: int,
    opts: ReadOptions,
    health: DataHealth | None = None,
    role: Role | None = None,
    skip_groups: int = 0,
) -> Iterator[tuple[int, dict]]:
    """(group index, batch) pairs of one task; the first `skip_groups` groups are replayed without decoding.

    A group whose images all fail to decode yields nothing, so indices may jump; the index, not a
    count, is what resuming needs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if task not in TASK_IDS:
        raise ValueError(f"unknown task {task!r}")
    sources = [Source(s.name, _check_urls(s.urls, task), s.weight) for s in sources]
    health = health if health is not None else DataHealth(opts.max_bad_fraction, opts.bad_check_min_samples)
    if role is None:
        rank, _, worker, workers = wds.utils.pytorch_worker_info()
        role = Role(rank, worker, workers)

    def generate() -> Iterator[tuple[int, dict]]:
        parsed = (_parse(s, task, opts, health) for s in _mixture(task, sources, opts, role, health))
        groups = _groups((p for p in parsed if p is not None), batch_size, opts.bucketing)
        for index, group in enumerate(groups):
            if index < skip_groups:
                continue
            batch = _collate(group, task, opts, health)
            if batch is not None:
                yield index, batch

    return generate()


def t2i_batches(urls: list[str], *, batch_size: int, opts: ReadOptions, health: DataHealth | None = None):
    """Text-to-image batches of one dataset (format in the module docstring)."""
    pairs = task_batches("t2i", [Source("t2i", list(urls))], batch_size=batch_size, opts=opts, health=health)
    return (batch for _, batch in pairs)


def edit_batches(urls: list[str], *, batch_size: int, opts: ReadOptions, health: DataHealth | None = None):
    """Edit batches of one dataset (format in the module docstring)."""
    pairs = task_batches(
        "edit", [Source("edit", list(urls))], batch_size=batch_size, opts=opts, health=health
    )
    return (batch for _, batch in pairs)


# ------------------------------------------------------------------------------------ the cycle
def _check_cycle(t2i_per_cycle: int, edit_per_cycle: int) -> None:
    if t2i_per_cycle < 0 or edit_per_cycle < 0 or t2i_per_cycle + edit_per_cycle == 0:
        raise ValueError(
            f"task cycle needs non-negative counts, not both 0; got t2i_per_cycle={t2i_per_cycle}, "
            f"edit_per_cycle={edit_per_cycle}"
        )


def cycle_task(position: int, t2i_per_cycle: int, edit_per_cycle: int) -> str:
    """The task of cycle position `position`: t2i_per_cycle T2I batches, then edit_per_cycle edit batches."""
    return "t2i" if position % (t2i_per_cycle + edit_per_cycle) < t2i_per_cycle else "edit"


def cycle_tasks(
    t2i: Iterable[dict] | None,
    edit: Iterable[dict] | None,
    t2i_per_cycle: int,
    edit_per_cycle: int,
    *,
    start: int = 0,
    step: int = 1,
) -> Iterator[dict]:
    """Repeat: t2i_per_cycle batches from `t2i`, then edit_per_cycle from `edit`; a count of 0 disables
    that task (its iterable may be None). Stops as soon as a needed stream runs out.

    Yields only positions start, start + step, ... of that cycle, so that `step` interleaved producers
    (DataLoader workers) together yield the exact cycle.
    """
    _check_cycle(t2i_per_cycle, edit_per_cycle)
    if start < 0 or step < 1:
        raise ValueError(f"need start >= 0 and step >= 1, got start={start}, step={step}")
    streams = {"t2i": iter(t2i) if t2i_per_cycle else None, "edit": iter(edit) if edit_per_cycle else None}
    position = start
    while True:
        try:
            yield next(streams[cycle_task(position, t2i_per_cycle, edit_per_cycle)])
        except StopIteration:
            return
        position += step


@dataclass(frozen=True)
class StreamPosition:
    """Where one (rank, slot) stream is: its next cycle position and the groups consumed per task."""

    cycle: int
    t2i: int = 0
    edit: int = 0


class TaskCycleDataset(torch.utils.data.IterableDataset):
    """Single-task batches in a fixed T2I/edit cycle; use with DataLoader(batch_size=None, num_workers=N).

    Each rank and worker reads its own shard split (or its own resampled shard draws) with its own
    seeds. DataLoader takes batch k from worker k % num_workers, so the stream in slot s yields cycle
    positions s, s + num_workers, ... and the loader's round robin restores the exact cycle.

    Every batch carries its stream's position after it (``batch["position"]``). To resume, pass
    ``{"batches": number of batches trained on, "positions": {"rank/slot": last position}}``: worker w
    then continues slot (batches + w) % num_workers, the stream whose batch the loader asks for next.
    """

    def __init__(
        self,
        t2i: list[Source],
        edit: list[Source],
        *,
        batch_size: int,
        opts: ReadOptions,
        t2i_per_cycle: int,
        edit_per_cycle: int,
        resume: dict | None = None,
    ) -> None:
        super().__init__()
        _check_cycle(t2i_per_cycle, edit_per_cycle)
        counts = {"t2i": t2i_per_cycle, "edit": edit_per_cycle}
        self.sources = {}
        for task, task_sources in (("t2i", t2i), ("edit", edit)):
            if counts[task] and not task_sources:
                raise ValueError(f"no {task} shard urls given")
            self.sources[task] = [Source(s.name, _check_urls(s.urls, task), s.weight) for s in task_sources]
        self.counts = counts
        self.batch_size = batch_size
        self.opts = opts
        self.resume = resume or {"batches": 0, "positions": {}}
        self.health = DataHealth(opts.max_bad_fraction, opts.bad_check_min_samples)

    def __iter__(self) -> Iterator[dict]:
        rank, _, worker, workers = wds.utils.pytorch_worker_info()
        role = Role(rank, (self.resume["batches"] + worker) % workers, workers)
        name = f"{role.rank}/{role.slot}"
        saved = self.resume["positions"].get(name)
        pos = StreamPosition(**saved) if saved else StreamPosition(cycle=role.slot)
        streams = {
            task: task_batches(
                task,
                self.sources[task],
                batch_size=self.batch_size,
                opts=self.opts,
                health=self.health,
                role=role,
                skip_groups=getattr(pos, task),
            )
            for task, count in self.counts.items()
            if count
        }
        done = {"t2i": pos.t2i, "edit": pos.edit}
        cycle = pos.cycle
        while True:
            task = cycle_task(cycle, self.counts["t2i"], self.counts["edit"])
            try:
                index, batch = next(streams[task])
            except StopIteration:
                return
            done[task] = index + 1
            cycle += workers
            batch["position"] = {"stream": name, "cycle": cycle, **done}
            batch["skipped"] = dict(self.health.reasons)
            yield batch
