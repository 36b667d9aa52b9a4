"""Dataset converters: image-caption and image-edit datasets -> webdataset shards (data/README.md).

Training streams tars; the original DeepGen reads JSON lists of millions of small files and only finds
a missing or corrupt image when it reaches it (then silently retries another sample). Converting once
packs the files and validates every sample on the way: a sample with a missing, empty or undecodable
image, or a missing or unreadable text, is skipped and counted per reason in the manifest.

The input is listed in a stable order and cut into chunks of `samples_per_shard` rows; shard i holds
chunk i and keys are `<prefix>-<row:09d>`, so the shards do not depend on the number of worker
processes, and an interrupted run resumes by writing only the missing shards. The state file
`.convert-<task>.jsonl` in the output folder holds the options (first line) and one line per finished
shard; a rerun with other options is refused. User guide: data/CONVERTING.md.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from deepgen.data.schema import CATEGORIES, TASKS, TEXT_FIELD
from deepgen.data.writer import MANIFEST_NAME, json_bytes, shard_name, write_manifest, write_shard

LAYOUT_TASK: dict[str, str | None] = {
    "t2i_sft_json": "t2i",  # original SFT T2I (BLIP3oDataset): [{"image_path", "txt"}]
    "caption_json": "t2i",  # original pretrain T2I (OpenUni CaptionDataset): [{"image", "annotation"}]
    "edit_json": "edit",  # original edits (ImageEditDataset): [{"input_image", "output_image", "instruction"}]
    "folder": "t2i",  # foo.png + foo.txt / foo.caption / foo.json, recursively
    "jsonl": None,  # one row per line; --task picks t2i (default) or edit
    "parquet": None,
}
LAYOUTS = tuple(LAYOUT_TASK)
LIST_KEYS = {
    "t2i_sft_json": ("image_path", "txt"),
    "caption_json": ("image", "annotation"),
    "edit_json": ("input_image", "output_image", "instruction"),
}
"""Keys of the original JSON-list layouts that the first entry must have (catches a wrong --layout)."""
ORIGINAL_FILTERS = {"caption_json": (80, 10.0)}
"""(min_side, max_aspect) per layout: OpenUni's CaptionDataset drops sides <= 80 px and aspect ratios
outside (0.1, 10). Other layouts default to (0, 0): no filter."""
KEPT_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
"""Formats stored byte for byte (member name = extension); anything else is re-encoded as PNG."""
FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_SUFFIXES = (".txt", ".caption", ".json")
"""Caption side-files of the folder layout, in order of preference."""
MAX_EXAMPLES = 5
"""Skipped samples named per reason in the report (the rest are only counted)."""


class ConvertError(ValueError):
    """A mistake in the options or in the input's structure; the message names the file, key or option."""


class _Skip(Exception):
    """One bad sample: skipped and counted under `reason`, never fatal."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ConvertOptions:
    """Everything that determines the shards (the number of workers does not). CLI flags: same names."""

    layout: str
    input: str
    """A file, or a folder of such files read in name order (folder layout: the image folder)."""
    out: str
    task: str | None = None
    """t2i or edit; fixed by the layout, except jsonl and parquet (default t2i)."""
    image_root: str | None = None
    """Folder that relative image paths start from; default: the input folder or the input file's folder."""
    caption_root: str | None = None
    """caption_json only: folder of the annotation files; default: image_root."""
    cap_source: str = "caption"
    """Caption key in caption_json annotations and in the folder layout's .json side-files."""
    image_column: str = "image"
    caption_column: str = "caption"
    source_column: str = "source_images"
    """Edit sources: a list of images or a single one."""
    target_column: str = "target_image"
    instruction_column: str = "instruction"
    min_side: int | None = None
    """Skip images whose shorter side is <= this (px); None: the layout's default (ORIGINAL_FILTERS), 0: off."""
    max_aspect: float | None = None
    """Skip images with width/height or height/width >= this; None: the layout's default, 0: off."""
    samples_per_shard: int = 1000
    prefix: str | None = None
    """Sample keys are <prefix>-<row:09d>; default: the task."""


def resolve_options(opts: ConvertOptions) -> ConvertOptions:
    """Check the options and fill in every default, so the state file and manifest hold the real values."""
    if opts.layout not in LAYOUT_TASK:
        raise ConvertError(f"unknown layout {opts.layout!r}; choose one of {', '.join(LAYOUTS)}")
    source = Path(opts.input)
    if not source.exists():
        raise ConvertError(f"input {source} does not exist")
    if opts.layout == "folder" and not source.is_dir():
        raise ConvertError(f"--layout folder needs a folder of images, but input {source} is a file")
    fixed = LAYOUT_TASK[opts.layout]
    task = opts.task or fixed or "t2i"
    if task not in TASKS:
        raise ConvertError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if fixed and task != fixed:
        raise ConvertError(f"layout {opts.layout} holds {fixed} samples; drop --task {task}")
    if opts.image_root and opts.layout == "folder":
        raise ConvertError("--image-root does not apply to --layout folder: images are read from --input")
    if opts.caption_root and opts.layout != "caption_json":
        raise ConvertError(f"--caption-root applies to --layout caption_json only, not {opts.layout}")
    if opts.samples_per_shard < 1:
        raise ConvertError(f"--samples-per-shard must be >= 1, got {opts.samples_per_shard}")
    prefix = opts.prefix or task
    if "." in prefix or "/" in prefix:
        raise ConvertError(f"--prefix {prefix!r} must not contain '.' or '/' (it starts every sample key)")
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output {out} exists and is not a folder")
    image_root = Path(opts.image_root) if opts.image_root else source if source.is_dir() else source.parent
    caption_root = Path(opts.caption_root) if opts.caption_root else image_root
    for flag, root in (("--image-root", image_root), ("--caption-root", caption_root)):
        if not root.is_dir():
            raise ConvertError(f"{flag} {root} is not a folder")
    min_side, max_aspect = ORIGINAL_FILTERS.get(opts.layout, (0, 0.0))
    return dataclasses.replace(
        opts,
        input=str(source.resolve()),
        out=str(out.resolve()),
        task=task,
        image_root=str(image_root.resolve()),
        caption_root=str(caption_root.resolve()) if opts.layout == "caption_json" else None,
        min_side=min_side if opts.min_side is None else opts.min_side,
        max_aspect=max_aspect if opts.max_aspect is None else opts.max_aspect,
        prefix=prefix,
    )


# ----------------------------------------------------------------------------------------------------------
# Listing (main process): the input's rows in a stable order. Rows are small (paths, text, raw JSONL
# lines); Parquet rows are read by the workers, so image bytes never pass through the main process.


@dataclass(frozen=True)
class _ParquetRows:
    """Rows start..stop of the concatenated Parquet files (path, number of rows), in file order."""

    files: tuple[tuple[str, int], ...]
    columns: tuple[str, ...]
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def slice(self, start: int, stop: int) -> _ParquetRows:
        return dataclasses.replace(self, start=self.start + start, stop=self.start + stop)

    def read(self) -> list[dict]:
        """Read only the row groups that hold the rows."""
        rows: list[dict] = []
        offset = 0
        for path, num_rows in self.files:
            lo, hi = max(self.start - offset, 0), min(self.stop - offset, num_rows)
            offset += num_rows
            if lo >= hi:
                continue
            parquet = pq.ParquetFile(path)
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            starts = [0, *itertools.accumulate(sizes)]
            groups = [g for g, size in enumerate(sizes) if starts[g] < hi and starts[g] + size > lo]
            table = parquet.read_row_groups(groups, columns=list(self.columns))
            rows += table.slice(lo - starts[groups[0]], hi - lo).to_pylist()
        return rows


def _input_files(source: Path, suffix: str) -> list[Path]:
    if source.is_file():
        return [source]
    files = sorted(source.glob(f"*{suffix}"))
    if not files:
        raise ConvertError(f"input folder {source} holds no *{suffix} files")
    return files


def _columns(opts: ConvertOptions) -> dict[str, str]:
    """Option name -> column name of the row fields that jsonl and parquet inputs need."""
    names = ("image_column", "caption_column")
    if opts.task == "edit":
        names = ("source_column", "target_column", "instruction_column")
    return {name: getattr(opts, name) for name in names}


def _names(keys: list) -> str:
    return ", ".join(sorted(map(str, keys))) or "none"


def _check_columns(available: list[str], opts: ConvertOptions, where: str) -> None:
    for option, column in _columns(opts).items():
        if column not in available:
            raise ConvertError(
                f"{where} has no {column!r} column for {opts.task} samples (columns: {_names(available)}); "
                f"set --{option.replace('_', '-')} or --task"
            )


def _json_list_rows(opts: ConvertOptions) -> list:
    rows: list = []
    for path in _input_files(Path(opts.input), ".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exn:  # JSONDecodeError and UnicodeDecodeError
            raise ConvertError(f"{path} is not UTF-8 JSON: {exn}") from None
        if not isinstance(data, list):
            raise ConvertError(
                f"{path} holds a JSON {type(data).__name__}; layout {opts.layout} needs a list"
            )
        if data and not rows:
            first = data[0] if isinstance(data[0], dict) else {}
            missing = [key for key in LIST_KEYS[opts.layout] if key not in first]
            if missing:
                raise ConvertError(
                    f"the first entry of {path} has no {missing[0]!r} key (keys: {_names(list(first))}); "
                    f"is --layout {opts.layout} right?"
                )
        rows += data
    return rows


def _folder_rows(root: Path) -> list[dict]:
    """Every image under root (hidden files and folders excepted), with its caption side-file if any."""
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        names = set(filenames)
        for name in filenames:
            stem, suffix = os.path.splitext(name)
            if name.startswith(".") or suffix.lower() not in FOLDER_IMAGE_SUFFIXES:
                continue
            caption = next((stem + s for s in CAPTION_SUFFIXES if stem + s in names), None)
            rel = Path(dirpath).relative_to(root)
            rows.append(
                {
                    "image": (rel / name).as_posix(),
                    "caption_file": (rel / caption).as_posix() if caption else None,
                }
            )
    return sorted(rows, key=lambda row: row["image"])


def _jsonl_rows(opts: ConvertOptions) -> list[str]:
    """Raw lines: the workers parse them, so one corrupt line is a counted skip, not a failed run."""
    rows: list[str] = []
    for path in _input_files(Path(opts.input), ".jsonl"):
        try:
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as exn:
            raise ConvertError(f"{path} is not UTF-8 text: {exn}") from None
        if lines and not rows:
            try:
                first = json.loads(lines[0])
            except ValueError as exn:
                raise ConvertError(f"the first line of {path} is not JSON: {exn}") from None
            first = first if isinstance(first, dict) else {}
            _check_columns(list(first), opts, f"the first row of {path}")
        rows += lines
    return rows


def _parquet_rows(opts: ConvertOptions) -> _ParquetRows:
    files, category = [], True
    for path in _input_files(Path(opts.input), ".parquet"):
        try:
            parquet = pq.ParquetFile(path)
        except pa.ArrowException as exn:
            raise ConvertError(f"{path} is not a Parquet file: {exn}") from None
        names = parquet.schema_arrow.names
        _check_columns(names, opts, str(path))
        category = category and "category" in names
        files.append((str(path), parquet.metadata.num_rows))
    columns = (*_columns(opts).values(), *(["category"] if category else []))
    return _ParquetRows(tuple(files), columns, 0, sum(n for _, n in files))


def _list_rows(opts: ConvertOptions) -> list | _ParquetRows:
    if opts.layout in LIST_KEYS:
        rows = _json_list_rows(opts)
    elif opts.layout == "folder":
        rows = _folder_rows(Path(opts.input))
    elif opts.layout == "jsonl":
        rows = _jsonl_rows(opts)
    else:
        rows = _parquet_rows(opts)
    if not len(rows):
        raise ConvertError(f"input {opts.input} lists no samples for layout {opts.layout}")
    return rows


# ----------------------------------------------------------------------------------------------------------
# One row -> one sample (worker processes).


def _text(value: object, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Skip(f"missing_{field}", f"no {field} ({value!r})")
    return value.strip()


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")  # -sig: drop a byte-order mark from Windows editors
    except FileNotFoundError:
        raise _Skip("missing_caption", f"{path} does not exist") from None
    except UnicodeDecodeError:
        raise _Skip("bad_caption_file", f"{path} is not UTF-8") from None


def _json_caption(path: Path, cap_source: str) -> str:
    try:
        annotation = json.loads(_read_text(path))
    except ValueError:
        raise _Skip("bad_caption_file", f"{path} is not JSON") from None
    if not isinstance(annotation, dict):
        raise _Skip("bad_caption_file", f"{path} is not a JSON object")
    return _text(annotation.get(cap_source), "caption")


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, list | tuple) else [] if value is None else [value]


def _fields(row: object, opts: ConvertOptions) -> tuple[str, list, str | None]:
    """(caption or instruction, image values, category) of one row in the layout's field names."""
    if opts.layout == "jsonl":
        try:
            row = json.loads(row)
        except ValueError:
            raise _Skip("bad_row", "not JSON") from None
    if not isinstance(row, dict):
        raise _Skip("bad_row", f"expected an object, got {type(row).__name__}")
    field = TEXT_FIELD[opts.task]
    if opts.layout == "t2i_sft_json":
        text, images = row.get("txt"), [row.get("image_path")]
    elif opts.layout == "caption_json":
        if not isinstance(row.get("annotation"), str):
            raise _Skip("missing_caption", f"no annotation path ({row.get('annotation')!r})")
        text = _json_caption(Path(opts.caption_root) / row["annotation"], opts.cap_source)
        images = [row.get("image")]
    elif opts.layout == "edit_json":
        text = row.get("instruction")
        images = [*_as_list(row.get("input_image")), row.get("output_image")]
    elif opts.layout == "folder":
        caption_file = row["caption_file"]
        if caption_file is None:
            image = Path(opts.image_root) / row["image"]
            raise _Skip("missing_caption", f"{image} has no {'/'.join(CAPTION_SUFFIXES)} side-file")
        path = Path(opts.image_root) / caption_file
        text = _json_caption(path, opts.cap_source) if path.suffix == ".json" else _read_text(path)
        images = [row["image"]]
    elif opts.task == "t2i":
        text, images = row.get(opts.caption_column), [row.get(opts.image_column)]
    else:
        text = row.get(opts.instruction_column)
        images = [*_as_list(row.get(opts.source_column)), row.get(opts.target_column)]
    if opts.task == "edit" and len(images) < 2:
        raise _Skip("missing_image", "no source image")
    category = row.get("category")
    return _text(text, field), images, category if category in CATEGORIES else None


def _image_bytes(value: object, image_root: str) -> tuple[bytes, str]:
    """The bytes of an image given as a path (relative to image_root), raw bytes, or a Hugging Face
    datasets Image dict ({"bytes", "path"}); and how to name it in a skip message."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray):
        return bytes(value), "inline image bytes"
    if not isinstance(value, str) or not value:
        raise _Skip("missing_image", f"no image path ({value!r})")
    path = Path(image_root) / value
    try:
        return path.read_bytes(), str(path)
    except OSError as exn:
        raise _Skip("missing_image", f"{path}: {exn.strerror}") from None


def _image_member(data: bytes, where: str, opts: ConvertOptions) -> tuple[str, bytes]:
    """(extension, bytes) to store: the original bytes for PNG/JPEG/WEBP, else a PNG re-encoding."""
    if not data:
        raise _Skip("empty_image", f"{where} is empty")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode everything: a truncated or corrupt image fails here, not in training
    except UnidentifiedImageError:
        raise _Skip("bad_image", f"{where}: not a known image format") from None
    except Exception as exn:  # PIL raises many types for corrupt data
        raise _Skip("bad_image", f"{where}: {exn}") from None
    width, height = img.size
    if opts.min_side and min(width, height) <= opts.min_side:
        raise _Skip("too_small", f"{where}: {width}x{height}, a side <= {opts.min_side} px")
    if opts.max_aspect and max(width / height, height / width) >= opts.max_aspect:
        raise _Skip("bad_aspect", f"{where}: {width}x{height}, aspect ratio >= {opts.max_aspect}")
    if img.format in KEPT_FORMATS:
        return KEPT_FORMATS[img.format], data
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return "png", buf.getvalue()


def _sample(row: object, index: int, opts: ConvertOptions) -> dict:
    """The webdataset sample for row `index`; raises _Skip."""
    text, images, category = _fields(row, opts)
    stems = [""] if opts.task == "t2i" else [f"src{i or ''}" for i in range(len(images) - 1)] + ["tgt"]
    sample = {"__key__": f"{opts.prefix}-{index:09d}"}
    for stem, value in zip(stems, images, strict=True):
        ext, data = _image_member(*_image_bytes(value, opts.image_root), opts)
        sample[f"{stem}.{ext}" if stem else ext] = data
    meta = {"task": opts.task, TEXT_FIELD[opts.task]: text}
    if category:
        meta["category"] = category
    sample["json"] = json_bytes(meta)
    return sample


@dataclass(frozen=True)
class _Job:
    opts: ConvertOptions
    shard: int
    start: int
    """Row index of the chunk's first row."""
    rows: list | _ParquetRows


def _write_job(job: _Job) -> dict:
    """Write one shard; return its name, row, sample and skip counts, and a few skipped rows by name."""
    rows = job.rows.read() if isinstance(job.rows, _ParquetRows) else job.rows
    skipped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}

    def samples() -> Iterator[dict]:
        for index, row in enumerate(rows, job.start):
            try:
                yield _sample(row, index, job.opts)
            except _Skip as skip:
                skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
                named = examples.setdefault(skip.reason, [])
                if len(named) < MAX_EXAMPLES:
                    named.append(f"row {index}: {skip.detail}")

    name = shard_name(job.opts.task, job.shard)
    count = write_shard(Path(job.opts.out) / name, samples())
    return {"shard": name, "rows": len(rows), "samples": count, "skipped": skipped, "examples": examples}


# ----------------------------------------------------------------------------------------------------------
# Orchestration: resume state, parallel shards, manifest.


def state_path(out: str | Path, task: str) -> Path:
    return Path(out) / f".convert-{task}.jsonl"


def _settings(opts: ConvertOptions) -> dict:
    """The options that shape the shards: all but `out`, so a moved output folder still resumes."""
    return {key: value for key, value in dataclasses.asdict(opts).items() if key != "out"}


def _finished_shards(opts: ConvertOptions, num_rows: int) -> dict[str, dict]:
    """Results of the shards that a previous run with the same options finished and that still exist;
    refuses an output folder made with other options or by another tool."""
    out, path = Path(opts.out), state_path(opts.out, opts.task)
    header = {"options": _settings(opts), "rows": num_rows}
    if not path.exists():
        if any(out.glob(f"{opts.task}-*.tar")):
            raise ConvertError(
                f"{out} already holds {opts.task} shards that convert did not write; use another --out"
            )
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(header) + "\n")
        os.replace(tmp, path)
        return {}
    first, *lines = path.read_text().splitlines()
    old = json.loads(first)
    if old != header:
        changed = [
            f"{key}: {old['options'].get(key)!r} -> {value!r}"
            for key, value in header["options"].items()
            if old["options"].get(key) != value
        ]
        if old["rows"] != num_rows:
            changed.append(f"input rows: {old['rows']} -> {num_rows}")
        raise ConvertError(
            f"{out} holds {opts.task} shards converted with other settings ({'; '.join(changed)}); "
            "rerun with the same settings to resume, or use another --out"
        )
    done = {}
    for line in lines:
        try:
            result = json.loads(line)
        except ValueError:  # a line cut short by an interrupted run: that shard is simply redone
            continue
        if (out / result["shard"]).is_file():
            done[result["shard"]] = result
    return done


def _chunk(rows: list | _ParquetRows, start: int, stop: int) -> list | _ParquetRows:
    return rows[start:stop] if isinstance(rows, list) else rows.slice(start, stop)


def _run(jobs: list[_Job], workers: int) -> Iterator[dict]:
    if workers == 1 or len(jobs) <= 1:
        yield from map(_write_job, jobs)
        return
    with multiprocessing.Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(_write_job, jobs)


def convert(opts: ConvertOptions, *, workers: int = 1, progress: bool = True) -> dict:
    """Convert opts.input into `<task>-NNNNNN.tar` shards and manifest.json in opts.out.

    Shards that a previous run with the same options finished are kept (only missing ones are written).
    Returns the conversion report that is also stored under manifest["conversions"][task], plus
    "written": the number of shards written by this call.
    """
    if workers < 1:
        raise ConvertError(f"--workers must be >= 1, got {workers}")
    opts = resolve_options(opts)
    rows = _list_rows(opts)
    per_shard = opts.samples_per_shard
    names = [shard_name(opts.task, i) for i in range(math.ceil(len(rows) / per_shard))]
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    done = _finished_shards(opts, len(rows))
    jobs = [
        _Job(opts, i, i * per_shard, _chunk(rows, i * per_shard, min((i + 1) * per_shard, len(rows))))
        for i, name in enumerate(names)
        if name not in done
    ]
    initial = sum(result["rows"] for result in done.values())
    with (
        state_path(out, opts.task).open("a") as state,
        tqdm(
            total=len(rows), initial=initial, unit="row", desc=f"{opts.task} shards", disable=not progress
        ) as bar,
    ):
        for result in _run(jobs, workers):
            state.write(json.dumps(result) + "\n")
            state.flush()
            done[result["shard"]] = result
            bar.update(result["rows"])

    results = [done[name] for name in names]
    skipped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for result in results:
        for reason, count in result["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
            examples.setdefault(reason, []).extend(result["examples"][reason])
    report = {
        "task": opts.task,
        "options": _settings(opts),
        "rows": len(rows),
        "shards": len(names),
        "samples": sum(result["samples"] for result in results),
        "skipped": dict(sorted(skipped.items())),
        "skip_examples": {reason: examples[reason][:MAX_EXAMPLES] for reason in sorted(examples)},
    }
    manifest_path = out / MANIFEST_NAME
    # The folder may also hold the other task's shards from an earlier conversion: keep its report.
    conversions = (
        json.loads(manifest_path.read_text()).get("conversions", {}) if manifest_path.exists() else {}
    )
    conversions[opts.task] = report
    write_manifest(
        out,
        {"format": "deepgen-converted", "conversions": dict(sorted(conversions.items()))},
        counts={result["shard"]: result["samples"] for result in results},
    )
    return {**report, "written": len(jobs)}
