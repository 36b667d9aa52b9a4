"""Data loading throughput: samples/s per worker for decode + resize + collate, and resume replay speed.

    .venv/bin/python bench/data_throughput.py [--samples 2000] [--image-size 512] [--workers 2]

Writes synthetic JPEG shards (textured images of mixed sizes and aspect ratios, 400-1100 px per
side, so every image needs a resize) into a temporary directory, then times:
  * T2I and edit batches through the full reader (one process = one DataLoader worker),
  * the same through a DataLoader with --workers processes (aggregate),
  * the resume replay that skips already-trained batches without decoding images.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from deepgen.config import DataConfig
from deepgen.data.shards import ReadOptions, Source, TaskCycleDataset, task_batches
from deepgen.data.writer import json_bytes, shard_name, write_shard

SIZES = [(512, 512), (768, 512), (512, 768), (1024, 1024), (1024, 576), (640, 480), (1100, 440)]


def textured_jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A photo-like JPEG: smooth colour fields plus fine noise (compresses like a natural image)."""
    w, h = size
    coarse = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 12, (h, w, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(out: Path, task: str, count: int, per_shard: int = 250) -> list[str]:
    rng = np.random.default_rng(0)
    urls = []
    for shard in range(0, count, per_shard):
        samples = []
        for i in range(shard, min(count, shard + per_shard)):
            size = SIZES[i % len(SIZES)]
            if task == "t2i":
                samples.append(
                    {
                        "__key__": f"s{i:07d}",
                        "jpg": textured_jpeg(rng, size),
                        "json": json_bytes({"task": "t2i", "caption": f"a photo number {i}"}),
                    }
                )
            else:
                samples.append(
                    {
                        "__key__": f"e{i:07d}",
                        "src.jpg": textured_jpeg(rng, size),
                        "tgt.jpg": textured_jpeg(rng, size),
                        "json": json_bytes({"task": "edit", "instruction": f"edit number {i}"}),
                    }
                )
        path = out / shard_name(task, shard // per_shard)
        write_shard(path, samples)
        urls.append(str(path))
    return urls


def rate(iterator, limit: int) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for batch in iterator:
        n += len(batch["keys"])
        if n >= limit:
            break
    return n / (time.perf_counter() - start), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # what a DataLoader worker gets: "1 worker" means one core

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        t0 = time.perf_counter()
        urls = {
            "t2i": write_shards(out, "t2i", args.samples),
            "edit": write_shards(out, "edit", args.samples // 2),
        }
        print(
            f"wrote {args.samples} T2I + {args.samples // 2} edit JPEG samples in {time.perf_counter() - t0:.0f} s"
        )
        cfg = DataConfig(
            name="bench", shards_dir=tmp, image_size=args.image_size, shuffle_buffer=100, resampled=False
        )
        opts = ReadOptions.from_config(cfg)
        results = {}
        for task in ("t2i", "edit"):
            batches = task_batches(task, [Source(task, urls[task])], batch_size=args.batch_size, opts=opts)
            per_s, n = rate((b for _, b in batches), len(urls[task]) * 250)
            results[f"{task}, 1 worker"] = per_s
            print(f"{task:5s} 1 worker : {per_s:7.1f} samples/s ({n} samples, {args.image_size} px)")
        ds = TaskCycleDataset(
            [Source("t2i", urls["t2i"])],
            [],
            batch_size=args.batch_size,
            opts=opts,
            t2i_per_cycle=1,
            edit_per_cycle=0,
        )
        loader = DataLoader(ds, batch_size=None, num_workers=args.workers)
        per_s, n = rate(iter(loader), args.samples)
        results[f"t2i, DataLoader {args.workers} workers"] = per_s
        print(f"t2i   {args.workers} workers: {per_s:7.1f} samples/s ({n} samples)")
        groups = args.samples // args.batch_size
        start = time.perf_counter()
        list(
            task_batches(
                "t2i", [Source("t2i", urls["t2i"])], batch_size=args.batch_size, opts=opts, skip_groups=groups
            )
        )
        replay = groups * args.batch_size / (time.perf_counter() - start)
        results["t2i resume replay (skip without decoding)"] = replay
        print(f"t2i   replay   : {replay:7.1f} samples/s")


if __name__ == "__main__":
    main()
