"""Writing shards: one complete tar per call, atomically, and a manifest with counts per shard.

A shard is written to a hidden temporary file and renamed into place when complete, so a crashed or
interrupted writer never leaves a truncated tar under a final name; converters rely on this to
resume by skipping the shards that exist.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

from deepgen.data.schema import SCHEMA_VERSION, TASKS

MANIFEST_NAME = "manifest.json"


def shard_name(task: str, index: int) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return f"{task}-{index:06d}.tar"


def json_bytes(meta: dict) -> bytes:
    """A sample's json, stamped with the schema version (stable key order: reproducible bytes)."""
    return json.dumps(
        {**meta, "schema_version": SCHEMA_VERSION}, sort_keys=True, separators=(",", ":")
    ).encode()


def write_shard(path: str | Path, samples: Iterable[dict]) -> int:
    """Write webdataset samples (``{"__key__": str, member: bytes, ...}``) to `path`; return the count.

    Keys must be unique and free of dots (webdataset splits member names at the first dot).
    Member order and metadata are fixed (mtime 0), so the same samples give byte-identical tars.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    count, seen = 0, set()
    try:
        with tarfile.open(tmp, "w") as tar:
            for sample in samples:
                key = sample["__key__"]
                if "." in key or "/" in key or key in seen:
                    raise ValueError(f"bad or duplicate sample key {key!r} for {path.name}")
                seen.add(key)
                for member in sorted(k for k in sample if not k.startswith("__")):
                    data = sample[member]
                    info = tarfile.TarInfo(f"{key}.{member}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
                count += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def count_samples(path: str | Path) -> int:
    """Samples in a shard (distinct keys), read from tar headers only."""
    with tarfile.open(path) as tar:
        return len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})


def write_manifest(
    out_dir: str | Path, info: dict | None = None, counts: dict[str, int] | None = None
) -> dict:
    """Scan `out_dir` for task shards and write manifest.json with the sample count of every shard.

    `counts` (shard file name -> samples) avoids re-reading shards the caller just wrote; `info` is
    merged in (source, settings). Returns the manifest.
    """
    out_dir = Path(out_dir)
    counts = dict(counts or {})
    shards: dict[str, dict[str, int]] = {}
    for task in TASKS:
        names = sorted(p.name for p in out_dir.glob(f"{task}-*.tar"))
        shards[task] = {n: counts[n] if n in counts else count_samples(out_dir / n) for n in names}
    manifest = {
        **(info or {}),
        "schema_version": SCHEMA_VERSION,
        "counts": {task: sum(s.values()) for task, s in shards.items()},
        "shards": shards,
    }
    tmp = out_dir / f".{MANIFEST_NAME}.partial-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST_NAME)
    return manifest
