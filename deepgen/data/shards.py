"""Webdataset readers: shards -> single-task batches, and the fixed T2I/edit task cycle.

Batch formats (images are float32 in [-1, 1], CHW, resized with the fix-pixels rule):

    t2i:  {"task": "t2i", "images": [B, 3, H, W], "captions": [str] * B, "specs": [dict] * B,
           "keys": [str] * B}
    edit: {"task": "edit", "sources": [[Tensor[3, h, w], ...]] * B, "targets": [B, 3, H, W],
           "instructions": [str] * B, "specs": [dict] * B (the sample's whole json), "keys": [str] * B}

With resampled=True a stream is infinite (shards drawn with replacement, per rank and worker); with
resampled=False each rank/worker reads its own share of the shards once and the last batch may be short.
Corrupt samples are skipped with a warning and counted, never fatal. The shard schema is in data/README.md.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from deepgen.data.resolution import resize_to_fix_pixels

log = logging.getLogger(__name__)

SOURCE_KEY = re.compile(r"^src(\d*)\.png$")
TASK_IDS = {"t2i": 1, "edit": 2}


class SkipCounter:
    """Counts skipped samples by reason ("bad_json", "bad_image", "missing_key", "read_error", ...)."""

    def __init__(self) -> None:
        self.count = 0
        self.reasons: dict[str, int] = {}

    def skip(self, key: str, reason: str, detail: object = "") -> None:
        self.count += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        log.warning("skipping sample %s: %s %s", key, reason, detail)

    def handler(self, exn: Exception) -> bool:
        """webdataset exception handler for unreadable tars/members: warn, count, continue."""
        where = exn.args[-1] if exn.args else "?"
        self.skip(str(where), "read_error", repr(exn))
        return True


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


def _check_urls(urls: Iterable[str], task: str) -> list[str]:
    urls = [str(u) for u in urls]
    if not urls:
        raise ValueError(f"no {task} shard urls given")
    for url in urls:
        if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
            raise FileNotFoundError(f"{task} shard {url} does not exist")
    return urls


def _stream_seed(seed: int, task: str, epoch: int) -> int:
    """A seed that differs per task, epoch, rank and DataLoader worker."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    # Only ints: make_seed uses hash(), which is randomised per process for str.
    return wds.utils.make_seed(seed, TASK_IDS[task], epoch, rank, worker)


def _samples(
    urls: list[str],
    *,
    task: str,
    seed: int,
    epoch: int,
    shuffle_buffer: int,
    resampled: bool,
    skips: SkipCounter,
) -> Iterator[dict]:
    """Raw webdataset samples (key -> bytes), split by rank and worker, shuffled in a buffer."""
    stream_seed = _stream_seed(seed, task, epoch)
    ds = wds.WebDataset(
        urls,
        resampled=resampled,
        shardshuffle=False if resampled or shuffle_buffer <= 0 else len(urls),
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        empty_check=False,
        handler=skips.handler,
        seed=stream_seed,
    )
    if resampled:
        # webdataset 1.0.2 seeds its resampler from pid and time; make it follow our seed (it still
        # mixes in rank and worker, so every rank/worker draws a different shard sequence).
        assert isinstance(ds.pipeline[0], wds.ResampledShards)
        ds.pipeline[0] = wds.ResampledShards(urls, seed=stream_seed, deterministic=True, empty_check=False)
    if shuffle_buffer > 0:
        ds = ds.shuffle(shuffle_buffer, seed=stream_seed)
    yield from ds


def _image(data: bytes, image_size: int, unit: int) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
    img = resize_to_fix_pixels(img, image_size, unit)
    arr = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
    return arr.float().div_(127.5).sub_(1.0)


def _decode(
    sample: dict,
    task: str,
    image_keys: Callable[[dict], list[str]],
    image_size: int,
    unit: int,
    skips: SkipCounter,
) -> dict | None:
    """Parse json and decode images; None (counted) when anything is missing or corrupt."""
    key = sample.get("__key__", "?")
    names = image_keys(sample)
    missing = [k for k in ["json", *names] if k not in sample]
    if missing or not names:
        skips.skip(key, "missing_key", missing or "no source image")
        return None
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as exn:
        skips.skip(key, "bad_json", exn)
        return None
    text_field = "caption" if task == "t2i" else "instruction"
    if (
        not isinstance(meta, dict)
        or meta.get("task", task) != task
        or not isinstance(meta.get(text_field), str)
    ):
        skips.skip(key, "bad_json", f"expected a {task} json with a {text_field!r} string")
        return None
    try:
        images = {k: _image(sample[k], image_size, unit) for k in names}
    except Exception as exn:  # PIL raises many types for corrupt data
        skips.skip(key, "bad_image", exn)
        return None
    return {"key": key, "meta": meta, "images": images}


def _source_keys(sample: dict) -> list[str]:
    found = [k for k in sample if SOURCE_KEY.match(k)]
    return sorted(found, key=lambda k: int(SOURCE_KEY.match(k).group(1) or 0)) + ["tgt.png"]


def _stack(images: list[torch.Tensor], keys: list[str], what: str) -> torch.Tensor:
    sizes = sorted({tuple(t.shape[1:]) for t in images})
    if len(sizes) > 1:
        raise ValueError(
            f"{what} in one batch differ in size {sizes} (keys {keys[0]}..{keys[-1]}); "
            "bucket samples by size or use batch_size=1"
        )
    return torch.stack(images)


def _batched(items: Iterator[dict], batch_size: int, collate: Callable[[list[dict]], dict]) -> Iterator[dict]:
    buf: list[dict] = []
    for item in items:
        buf.append(item)
        if len(buf) == batch_size:
            yield collate(buf)
            buf = []
    if buf:
        yield collate(buf)


def _collate_t2i(items: list[dict]) -> dict:
    keys = [it["key"] for it in items]
    return {
        "task": "t2i",
        "images": _stack([it["images"]["png"] for it in items], keys, "images"),
        "captions": [it["meta"]["caption"] for it in items],
        "specs": [it["meta"].get("spec") for it in items],
        "keys": keys,
    }


def _collate_edit(items: list[dict]) -> dict:
    keys = [it["key"] for it in items]
    return {
        "task": "edit",
        "sources": [[img for k, img in it["images"].items() if k != "tgt.png"] for it in items],
        "targets": _stack([it["images"]["tgt.png"] for it in items], keys, "edit targets"),
        "instructions": [it["meta"]["instruction"] for it in items],
        "specs": [it["meta"] for it in items],
        "keys": keys,
    }


def _task_batches(
    task: str,
    urls: list[str],
    *,
    batch_size: int,
    image_size: int,
    unit: int,
    seed: int,
    shuffle_buffer: int,
    resampled: bool,
    skips: SkipCounter | None,
    epoch: int,
) -> Iterator[dict]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    urls = _check_urls(urls, task)
    skips = skips if skips is not None else SkipCounter()
    image_keys = (lambda s: ["png"]) if task == "t2i" else _source_keys
    collate = _collate_t2i if task == "t2i" else _collate_edit

    def generate() -> Iterator[dict]:
        raw = _samples(
            urls,
            task=task,
            seed=seed,
            epoch=epoch,
            shuffle_buffer=shuffle_buffer,
            resampled=resampled,
            skips=skips,
        )
        decoded = (_decode(s, task, image_keys, image_size, unit, skips) for s in raw)
        yield from _batched((d for d in decoded if d is not None), batch_size, collate)

    return generate()


def t2i_batches(
    urls: list[str],
    *,
    batch_size: int,
    image_size: int,
    unit: int,
    seed: int,
    shuffle_buffer: int,
    resampled: bool = True,
    skips: SkipCounter | None = None,
    epoch: int = 0,
) -> Iterator[dict]:
    """Text-to-image batches (format in the module docstring); the pipeline starts on first next()."""
    return _task_batches(
        "t2i",
        urls,
        batch_size=batch_size,
        image_size=image_size,
        unit=unit,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        resampled=resampled,
        skips=skips,
        epoch=epoch,
    )


def edit_batches(
    urls: list[str],
    *,
    batch_size: int,
    image_size: int,
    unit: int,
    seed: int,
    shuffle_buffer: int,
    resampled: bool = True,
    skips: SkipCounter | None = None,
    epoch: int = 0,
) -> Iterator[dict]:
    """Edit batches (format in the module docstring); sources are lists so multi-image edits fit later."""
    return _task_batches(
        "edit",
        urls,
        batch_size=batch_size,
        image_size=image_size,
        unit=unit,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        resampled=resampled,
        skips=skips,
        epoch=epoch,
    )


def _check_cycle(t2i_per_cycle: int, edit_per_cycle: int) -> None:
    if t2i_per_cycle < 0 or edit_per_cycle < 0 or t2i_per_cycle + edit_per_cycle == 0:
        raise ValueError(
            f"task cycle needs non-negative counts, not both 0; got t2i_per_cycle={t2i_per_cycle}, "
            f"edit_per_cycle={edit_per_cycle}"
        )


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
    t2i_iter = iter(t2i) if t2i_per_cycle else None
    edit_iter = iter(edit) if edit_per_cycle else None
    period = t2i_per_cycle + edit_per_cycle
    position = start
    while True:
        stream = t2i_iter if position % period < t2i_per_cycle else edit_iter
        try:
            yield next(stream)
        except StopIteration:
            return
        position += step


class TaskCycleDataset(torch.utils.data.IterableDataset):
    """Single-task batches in a fixed T2I/edit cycle; use with DataLoader(batch_size=None, num_workers=N).

    Each rank and worker gets its own shard split (resampled=False) or its own shard draws
    (resampled=True), and its own shuffle seed. Every new iteration (epoch) reshuffles. The loader's output
    follows the cycle exactly for any num_workers while all workers are running (always, with resampled=True).
    """

    def __init__(
        self,
        t2i_urls: list[str],
        edit_urls: list[str],
        batch_size: int,
        image_size: int,
        unit: int,
        seed: int,
        shuffle_buffer: int,
        t2i_per_cycle: int,
        edit_per_cycle: int,
        resampled: bool = True,
    ) -> None:
        super().__init__()
        _check_cycle(t2i_per_cycle, edit_per_cycle)
        self.t2i_urls = _check_urls(t2i_urls, "t2i") if t2i_per_cycle else []
        self.edit_urls = _check_urls(edit_urls, "edit") if edit_per_cycle else []
        self.batch_size = batch_size
        self.image_size = image_size
        self.unit = unit
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.t2i_per_cycle = t2i_per_cycle
        self.edit_per_cycle = edit_per_cycle
        self.resampled = resampled
        self.skips = SkipCounter()  # per process: each DataLoader worker counts its own skips
        self._epoch = -1

    def __iter__(self) -> Iterator[dict]:
        self._epoch += 1
        common = dict(
            batch_size=self.batch_size,
            image_size=self.image_size,
            unit=self.unit,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            resampled=self.resampled,
            skips=self.skips,
            epoch=self._epoch,
        )
        t2i = t2i_batches(self.t2i_urls, **common) if self.t2i_per_cycle else None
        edit = edit_batches(self.edit_urls, **common) if self.edit_per_cycle else None
        # DataLoader takes batch k from worker k % num_workers. If every worker ran the whole cycle, two
        # workers would give T,T,T,T,E,E instead of T,T,E,T,T,E; so worker w yields cycle positions
        # w, w + num_workers, ... and the loader's round robin restores the exact cycle.
        worker = torch.utils.data.get_worker_info()
        start, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        return cycle_tasks(t2i, edit, self.t2i_per_cycle, self.edit_per_cycle, start=start, step=step)
