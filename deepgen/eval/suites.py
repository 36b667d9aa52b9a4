"""Benchmark suites of the original's evaluation: generate a benchmark's prompt set in the folder layout
its official scorer reads, from the prompt files the benchmark publishes.

| suite | input (as published) | output under ``out`` (what the official scorer reads) |
| --- | --- | --- |
| ``geneval`` | GenEval ``evaluation_metadata.jsonl`` | ``<i:05d>/metadata.jsonl`` (line i) + ``<i:05d>/samples/<j:04d>.png``, 4 per prompt |
| ``dpg`` | ELLA ``dpg_bench/prompts/`` (``<name>.txt``) | ``<name>.png``: a 2x2 grid of 4 samples, ``size`` px cells |
| ``cvtg`` | CVTG-2K root: ``CVTG/<area>.json``, ``CVTG-Style/<area>.json`` | ``<subset>/<area>/<index>.png`` |
| ``imgedit`` | ImgEdit ``singleturn.json`` (``{key: {id, prompt}}``) + source images | ``<key>.png`` |
| ``gedit`` | GEdit-Bench parquet/arrow files, or a JSONL | ``fullset/<task_type>/<lang>/<key>.png`` + ``<key>_SRCIMG.png`` |

Settings are the original's eval scripts' (deepgenteam/deepgen ``scripts/evaluation``): 50 steps, CFG 4.0
(7.5 for DPG-Bench), seed 42, square ``size`` images (EVAL.md passes 512), an empty negative prompt for
T2I and the quality negative for edits, whose source is squashed to ``size`` x ``size`` as there.
One deliberate deviation: the original draws every image from one generator seeded once per process,
so an image depends on the batch size and on everything drawn before it; here image k of a suite has its
own seed (``seed + k``), so a run can be resumed or re-batched and gives the same images.

Resumable: a job whose file exists is skipped, and files are written under a temporary name and renamed,
so an interrupted run never leaves a truncated PNG that a later run would skip.
CVTG-2K is also scored here with the project's OCR (``score_cvtg``): word accuracy and 1 - normalised
edit distance, our approximation of the benchmark's metrics (the official scorer uses PaddleOCR).
"""

from __future__ import annotations

import io
import json
import os
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from deepgen.eval.benchmark import generate_batch
from deepgen.images import to_uint8
from deepgen.inference import SIZE_UNIT, default_negative_prompt, image_to_reference, png_info
from deepgen.model.backbone import DeepGenBackbone
from deepgen.rewards.ocr import levenshtein, quoted_targets

SUITES: dict[str, str] = {
    "geneval": "GenEval: evaluation_metadata.jsonl (one JSON object with a 'prompt' a line)",
    "dpg": "DPG-Bench: ELLA's dpg_bench/prompts folder (one <name>.txt a prompt)",
    "cvtg": "CVTG-2K: the dataset root holding CVTG/<area>.json and CVTG-Style/<area>.json",
    "imgedit": "ImgEdit: singleturn.json ({key: {id, prompt}}), images under --source-root",
    "gedit": "GEdit-Bench: parquet or arrow files (or a folder of them), or a .jsonl",
}
EDIT_SUITES = ("imgedit", "gedit")
DEFAULT_CFG = {"dpg": 7.5}
"""The original's CFG where it is not 4.0 (its DPG-Bench script)."""
SAMPLES_PER_PROMPT = {"geneval": 4, "dpg": 4}
CVTG_SUBSETS = ("CVTG", "CVTG-Style")
CVTG_AREAS = (2, 3, 4, 5)
GEDIT_COLUMNS = ("key", "task_type", "instruction", "instruction_language", "input_image")
CHECKED_ON_RESUME = ("prompt", "seeds", "num_steps", "cfg_scale", "negative_prompt", "size")


@dataclass
class SuiteSettings:
    num_steps: int = 50
    cfg_scale: float | None = None
    """None: the suite's original value (4.0; 7.5 for DPG-Bench)."""
    negative_prompt: str | None = None
    """None: the original's ("" for T2I, the quality negative for edits)."""
    seed: int = 42
    size: int = 512
    """side of the square images (DPG-Bench: of each grid cell); a multiple of 32."""
    batch_size: int = 8
    """images per forward pass (a DPG-Bench grid's four samples always go together)."""
    limit: int | None = None
    """first N prompts of the file; None: all."""


@dataclass(frozen=True)
class Job:
    """One file the scorer reads: ``len(seeds)`` samples of ``prompt``, four of them tiled 2x2."""

    path: Path
    prompt: str
    seeds: tuple[int, ...]
    source: Path | bytes | None = None
    """edit source: an image file, or encoded image bytes (GEdit-Bench's parquet)."""
    source_copy: Path | None = None
    """where the scorer also reads the source image (GEdit-Bench's ``<key>_SRCIMG.png``)."""
    targets: tuple[str, ...] = ()
    """CVTG-2K: the texts the image must show."""


@dataclass
class SuitePlan:
    suite: str
    prompts: Path
    out: Path
    jobs: list[Job]
    cfg_scale: float
    negative_prompt: str
    size: int
    num_steps: int
    seed: int
    texts: dict[Path, str] = field(default_factory=dict)
    """small files written before any image (GenEval's per-prompt metadata.jsonl)."""

    @property
    def editing(self) -> bool:
        return self.suite in EDIT_SUITES

    @property
    def report_path(self) -> Path:
        """Our own report: inside ``out``, except for DPG-Bench, whose scorer reads every file of its folder."""
        if self.suite == "dpg":
            return self.out.parent / f"{self.out.name}_eval_report.json"
        return self.out / "eval_report.json"

    def pending(self) -> list[Job]:
        """The jobs whose file is missing. A file made for another prompt or with other settings is an
        error, not a skip: a resumed run must not mix two runs in one folder."""
        missing = []
        for job in self.jobs:
            if not job.path.is_file():
                missing.append(job)
                continue
            with Image.open(job.path) as img:
                recorded = img.info
            for key, value in self.image_settings(job).items():
                if key in CHECKED_ON_RESUME and key in recorded and recorded[key] != str(value):
                    raise ValueError(
                        f"{job.path} was made with {key}={recorded[key]!r}, not {str(value)!r}: "
                        "write to a new --out, or delete the file to regenerate it"
                    )
        return missing

    def image_settings(self, job: Job) -> dict[str, Any]:
        """What an image's PNG text chunks record (besides caller extras such as the checkpoint)."""
        return {**self.settings(), "prompt": job.prompt, "seeds": list(job.seeds)}

    def settings(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "prompts": str(self.prompts),
            "num_steps": self.num_steps,
            "cfg_scale": self.cfg_scale,
            "negative_prompt": self.negative_prompt,
            "size": self.size,
            "seed": self.seed,
        }


def plan_suite(
    suite: str,
    prompts: str | Path,
    out: str | Path,
    settings: SuiteSettings | None = None,
    source_root: str | Path | None = None,
) -> SuitePlan:
    """Read a benchmark's prompt file and lay out every output file; nothing is written yet.

    Fails on a malformed input with a one-line error naming the file and the line or key, before any
    model is loaded. ``source_root``: ImgEdit's image folder (default: the JSON file's folder, as there).
    """
    settings = settings or SuiteSettings()
    if suite not in SUITES:
        raise ValueError(f"Unknown suite {suite!r}: choose from {list(SUITES)}")
    if settings.size <= 0 or settings.size % SIZE_UNIT:
        raise ValueError(f"size must be a positive multiple of {SIZE_UNIT}, got {settings.size}")
    prompts, out = Path(prompts), Path(out)
    if not prompts.exists():
        raise FileNotFoundError(f"{suite} prompts {prompts} do not exist: expected {SUITES[suite]}")
    per_prompt = SAMPLES_PER_PROMPT.get(suite, 1)
    texts: dict[Path, str] = {}
    if suite == "geneval":
        jobs = []
        for i, (record, line) in enumerate(read_geneval(prompts)[: settings.limit]):
            folder = out / f"{i:05d}"
            texts[folder / "metadata.jsonl"] = line + "\n"
            seeds = _seeds(settings.seed, i, per_prompt)
            jobs += [
                Job(folder / "samples" / f"{j:04d}.png", record["prompt"], (s,)) for j, s in enumerate(seeds)
            ]
    elif suite == "dpg":
        jobs = [
            Job(out / f"{name}.png", prompt, _seeds(settings.seed, i, per_prompt))
            for i, (name, prompt) in enumerate(read_dpg(prompts)[: settings.limit])
        ]
    elif suite == "cvtg":
        jobs = [
            Job(out / rel, prompt, (settings.seed + i,), targets=targets)
            for i, (rel, prompt, targets) in enumerate(read_cvtg(prompts)[: settings.limit])
        ]
    elif suite == "imgedit":
        root = Path(source_root) if source_root is not None else prompts.parent
        jobs = [
            Job(out / f"{key}.png", prompt, (settings.seed + i,), source=source)
            for i, (key, prompt, source) in enumerate(read_imgedit(prompts, root)[: settings.limit])
        ]
    else:
        jobs = []
        for i, (rel, prompt, source) in enumerate(read_gedit(prompts)[: settings.limit]):
            path = out / rel
            copy = path.with_name(f"{path.stem}_SRCIMG.png")
            jobs.append(Job(path, prompt, (settings.seed + i,), source=source, source_copy=copy))
    if not jobs:
        raise ValueError(f"{suite} prompts {prompts} hold no prompts: expected {SUITES[suite]}")
    paths = Counter(job.path for job in jobs)
    if len(paths) < len(jobs):
        twice = next(path for path, n in paths.items() if n > 1)
        raise ValueError(f"{suite} prompts {prompts} name the output {twice} twice (duplicate keys?)")
    cfg = settings.cfg_scale if settings.cfg_scale is not None else DEFAULT_CFG.get(suite, 4.0)
    negative = settings.negative_prompt
    if negative is None:
        negative = default_negative_prompt(suite in EDIT_SUITES)
    return SuitePlan(
        suite, prompts, out, jobs, cfg, negative, settings.size, settings.num_steps, settings.seed, texts
    )


def _seeds(seed: int, index: int, count: int) -> tuple[int, ...]:
    return tuple(seed + index * count + j for j in range(count))


# ---- readers of the published prompt files: (what names the output, prompt, extra) per item ----


def read_geneval(path: Path) -> list[tuple[dict, str]]:
    """(record, the line as written) per non-blank line; the scorer wants that line as metadata.jsonl."""
    if not path.is_file():
        raise ValueError(f"GenEval prompts {path} is not a file: expected evaluation_metadata.jsonl")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}): expected one object a line") from None
        if not isinstance(record, dict) or not _text(record.get("prompt")):
            raise ValueError(f"{path}:{n}: no 'prompt' string: expected a line of evaluation_metadata.jsonl")
        items.append((record, line.strip()))
    return items


def read_dpg(folder: Path) -> list[tuple[str, str]]:
    """(name, prompt) per ``<name>.txt``, sorted by file name as the original."""
    if not folder.is_dir():
        raise ValueError(f"DPG-Bench prompts {folder} is not a folder: expected dpg_bench/prompts/")
    items = []
    for path in sorted(folder.glob("*.txt")):
        prompt = path.read_text(encoding="utf-8").strip()
        if not prompt:
            raise ValueError(f"{path} is empty: a DPG-Bench prompt file holds one prompt")
        items.append((path.stem, prompt))
    return items


def read_cvtg(root: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """(output path relative to ``out``, prompt, texts to render) in the original's order (area, then subset).

    The texts are the item's ``sentence_list``, or the prompt's quoted spans if it has none.
    """
    if not root.is_dir():
        raise ValueError(f"CVTG-2K prompts {root} is not a folder: expected {SUITES['cvtg']}")
    # The dataset's README spells the second folder "CVTG-style", the eval scripts "CVTG-Style".
    folders = {d.name.lower(): d for d in root.iterdir() if d.is_dir()}
    items, found = [], 0
    for area in CVTG_AREAS:
        for subset in CVTG_SUBSETS:
            folder = folders.get(subset.lower())
            path = folder / f"{area}.json" if folder is not None else None
            if path is None or not path.is_file():
                continue
            found += 1
            data = _load_json(path)
            if not isinstance(data, dict) or not isinstance(data.get("data_list"), list):
                raise ValueError(f"{path}: expected an object with a 'data_list' list (CVTG-2K <area>.json)")
            for k, item in enumerate(data["data_list"]):
                where = f"{path}: data_list[{k}]"
                if not isinstance(item, dict) or not _text(item.get("prompt")):
                    raise ValueError(f"{where} has no 'prompt' string")
                index = item.get("index")
                if isinstance(index, bool) or not isinstance(index, int | str):
                    raise ValueError(f"{where} has no 'index' (an integer: the image's file name)")
                _check_name(str(index), f"{where}: index")
                sentences = item.get("sentence_list")
                if sentences is not None and not (
                    isinstance(sentences, list) and all(isinstance(s, str) for s in sentences)
                ):
                    raise ValueError(f"{where}: 'sentence_list' must be a list of strings")
                targets = tuple(sentences) if sentences else tuple(quoted_targets(item["prompt"]))
                if not cvtg_words(" ".join(targets)):
                    raise ValueError(f"{where} has no text to render (no 'sentence_list', no quoted text)")
                items.append((f"{folder.name}/{area}/{index}.png", item["prompt"], targets))
    if not found:
        raise ValueError(f"{root} holds no CVTG/<area>.json or CVTG-Style/<area>.json (areas 2-5)")
    return items


def read_imgedit(path: Path, source_root: Path) -> list[tuple[str, str, Path]]:
    """(key, instruction, source image) per key of ImgEdit's ``{key: {"id": <image>, "prompt": ...}}``."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object {{key: {{id, prompt}}}} (ImgEdit's singleturn.json)")
    items = []
    for key, item in data.items():
        where = f"{path}: key {key!r}"
        _check_name(key, where)
        if not isinstance(item, dict) or not _text(item.get("prompt")):
            raise ValueError(f"{where} has no 'prompt' string")
        if not _text(item.get("id")):
            raise ValueError(f"{where} has no 'id' string (the source image's path)")
        source = source_root / item["id"]
        if not source.is_file():
            raise FileNotFoundError(f"{where}: source image {source} does not exist (set the source root)")
        items.append((key, item["prompt"], source))
    return items


def read_gedit(path: Path) -> list[tuple[str, str, Path | bytes]]:
    """(``fullset/<task_type>/<lang>/<key>.png``, instruction, source) per row.

    ``path``: a parquet or arrow file of stepfun-ai/GEdit-Bench (the hub's parquet, or ``save_to_disk``'s
    arrow), a folder of them (searched recursively), or a ``.jsonl`` whose ``input_image`` is a path
    relative to the file.
    """
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    else:
        files = sorted([*path.rglob("*.parquet"), *path.rglob("*.arrow")]) if path.is_dir() else [path]
        if not files or any(f.suffix not in (".parquet", ".arrow") for f in files):
            raise ValueError(f"GEdit-Bench prompts {path}: expected {SUITES['gedit']}")
        rows = [row for f in files for row in _table_rows(f)]
    items = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with {list(GEDIT_COLUMNS)}")
        for column in GEDIT_COLUMNS[:4]:
            if not _text(row.get(column)):
                raise ValueError(f"{where} has no {column!r} string")
        for column in ("key", "task_type", "instruction_language"):
            _check_name(row[column], f"{where}: {column}")
        image = row.get("input_image")
        if isinstance(image, dict) and image.get("bytes"):
            source: Path | bytes = image["bytes"]
        elif isinstance(image, str) and path.suffix == ".jsonl":
            source = path.parent / image
            if not source.is_file():
                raise FileNotFoundError(f"{where}: input_image {source} does not exist")
        else:
            raise ValueError(f"{where}: 'input_image' holds no image (bytes, or a path in a .jsonl)")
        rel = f"fullset/{row['task_type']}/{row['instruction_language']}/{row['key']}.png"
        items.append((rel, row["instruction"], source))
    return items


def _table_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            names = pq.read_schema(path).names
            # Only the needed columns: the unused input_image_raw holds the large originals.
            table = pq.read_table(path, columns=[c for c in GEDIT_COLUMNS if c in names])
        else:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        message = str(e).splitlines()[0]
        raise ValueError(f"{path} is not a readable {path.suffix[1:]} file: {message}") from None
    missing = [c for c in GEDIT_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path} lacks column {missing[0]!r}: expected GEdit-Bench's {list(GEDIT_COLUMNS)}")
    for n, row in enumerate(table.select(list(GEDIT_COLUMNS)).to_pylist()):
        yield f"{path} row {n}", row


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_name(name: str, where: str) -> None:
    """Keys become file and folder names: one path component, never a way out of ``out``."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"{where}: {name!r} cannot be a file name")


# ---- generation ----


def open_source(source: Path | bytes) -> Image.Image:
    """An edit source (a file, or encoded bytes) as RGB at its own size."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        return img.convert("RGB")


def squash(image: Image.Image, size: int) -> Image.Image:
    """Resize to ``size`` x ``size`` whatever the aspect ratio, as the original's edit scripts did."""
    return image.resize((size, size), Image.Resampling.BICUBIC)


def grid_2x2(images: np.ndarray) -> np.ndarray:
    """Four ``[H, W, 3]`` samples as one ``[2H, 2W, 3]`` image, row-major and unpadded: DPG-Bench's
    scorer crops cell k at ((k % 2) * W, (k // 2) * H)."""
    if len(images) != 4:
        raise ValueError(f"a 2x2 grid needs 4 images, got {len(images)}")
    return np.concatenate([np.concatenate(images[:2], axis=1), np.concatenate(images[2:], axis=1)], axis=0)


def split_2x2(image: np.ndarray) -> list[np.ndarray]:
    h, w = image.shape[0] // 2, image.shape[1] // 2
    return [image[r * h : (r + 1) * h, c * w : (c + 1) * w] for r in range(2) for c in range(2)]


def save_png(image: Image.Image, path: Path, info: dict[str, object] | None = None) -> None:
    """Write under a temporary name, then rename: a killed run leaves no truncated file to skip later."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    image.save(partial, format="PNG", pnginfo=png_info(info) if info else None)
    os.replace(partial, path)


def _batches(jobs: list[Job], batch_size: int) -> Iterator[list[Job]]:
    batch: list[Job] = []
    for job in jobs:
        if batch and sum(len(j.seeds) for j in batch) + len(job.seeds) > batch_size:
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def generate_suite(
    backbone: DeepGenBackbone | None,
    plan: SuitePlan,
    batch_size: int = 8,
    progress: bool = True,
    info: dict[str, object] | None = None,
) -> list[Path]:
    """Write the plan's metadata files and every missing image; returns the images written.

    ``backbone`` may be None when nothing is missing (a rerun that only scores). ``info``: extra PNG text
    chunks (e.g. the checkpoint) beside the prompt, seed and sampling settings.
    """
    for path, text in plan.texts.items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    pending = plan.pending()
    if pending and backbone is None:
        raise ValueError(f"{len(pending)} images of {plan.out} are missing and no model was given")
    written = []
    bar = tqdm(total=sum(len(j.seeds) for j in pending), desc=plan.suite, unit="img", disable=not progress)
    for batch in _batches(pending, batch_size):
        prompts = [job.prompt for job in batch for _ in job.seeds]
        seeds = [seed for job in batch for seed in job.seeds]
        references = None
        sources = [open_source(job.source) for job in batch] if plan.editing else []
        if sources:
            refs = [image_to_reference(squash(img, plan.size), plan.size) for img in sources]
            references = [[ref] for job, ref in zip(batch, refs, strict=True) for _ in job.seeds]
        images = to_uint8(
            generate_batch(
                backbone,
                prompts,
                seeds,
                negative_prompt=plan.negative_prompt,
                references=references,
                width=plan.size,
                height=plan.size,
                num_steps=plan.num_steps,
                cfg_scale=plan.cfg_scale,
            )
        )
        start = 0
        for k, job in enumerate(batch):
            samples = images[start : start + len(job.seeds)]
            start += len(job.seeds)
            if job.source_copy is not None:
                save_png(sources[k], job.source_copy)
            pixels = samples[0] if len(samples) == 1 else grid_2x2(samples)
            save_png(Image.fromarray(pixels), job.path, {**plan.image_settings(job), **(info or {})})
            written.append(job.path)
        bar.update(len(seeds))
    bar.close()
    return written


def job_images(plan: SuitePlan) -> Iterator[tuple[np.ndarray, str]]:
    """(sample ``[H, W, 3]`` uint8, prompt) for every written image of the plan; grids give their 4 cells.
    For image metrics (FID, CLIP score), which need single samples."""
    for job in plan.jobs:
        if not job.path.is_file():
            continue
        with Image.open(job.path) as img:
            pixels = np.asarray(img.convert("RGB"))
        for sample in split_2x2(pixels) if plan.suite == "dpg" else [pixels]:
            yield sample, job.prompt


# ---- CVTG-2K scoring ----


def cvtg_words(text: str) -> list[str]:
    """Lower-cased words with the punctuation at their ends removed (OCR reads quotes and commas poorly)."""
    words = (w.strip(string.punctuation + "\u201c\u201d\u2018\u2019") for w in text.lower().split())
    return [w for w in words if w]


def cvtg_text_scores(ocr_text: str, targets: Sequence[str]) -> dict[str, float]:
    """Word accuracy and NED of one image.

    ``word_accuracy``: the share of the target words (all texts joined) found among the OCR words, each
    OCR word matching at most one target word. ``ned``: 1 - lev(T, O) / max(|T|, |O|), with T and O the
    target and OCR words joined by single spaces; 1.0 is a perfect read. Text the image shows beyond the
    targets lowers NED, not word accuracy.
    """
    target, read = cvtg_words(" ".join(targets)), cvtg_words(ocr_text)
    if not target:
        raise ValueError("CVTG scoring needs at least one target word")
    available = Counter(read)
    hits = 0
    for word in target:
        if available[word] > 0:
            available[word] -= 1
            hits += 1
    t, o = " ".join(target), " ".join(read)
    return {"word_accuracy": hits / len(target), "ned": 1.0 - levenshtein(t, o) / max(len(t), len(o))}


def score_cvtg(plan: SuitePlan, ocr: Any = None) -> dict[str, Any]:
    """OCR every written CVTG-2K image and score it against its texts.

    Returns ``{"overall": {word_accuracy, ned, n}, "subsets": {...}, "areas": {...}, "samples":
    {<rel path>: {word_accuracy, ned, ocr_text, targets, file_stamp}}}``. An image unchanged since the
    previous report (same modification time and size) keeps its OCR text: OCR is the slow part on CPU.
    ``ocr``: anything with ``read_text(image) -> str`` (default: the project's OCR reward engine).
    """
    previous: dict[str, Any] = {}
    if plan.report_path.is_file():
        try:
            previous = json.loads(plan.report_path.read_text()).get("cvtg", {}).get("samples", {})
        except json.JSONDecodeError:
            previous = {}
    samples: dict[str, dict[str, Any]] = {}
    for job in plan.jobs:
        if not job.path.is_file():
            continue
        rel = job.path.relative_to(plan.out).as_posix()
        stat = job.path.stat()
        stamp = f"{stat.st_mtime_ns}-{stat.st_size}"
        if previous.get(rel, {}).get("file_stamp") == stamp and "ocr_text" in previous[rel]:
            text = previous[rel]["ocr_text"]
        else:
            if ocr is None:
                from deepgen.rewards.ocr import OcrReward

                ocr = OcrReward()
            with Image.open(job.path) as img:
                text = ocr.read_text(np.asarray(img.convert("RGB")))
        samples[rel] = {
            **cvtg_text_scores(text, job.targets),
            "ocr_text": text,
            "targets": list(job.targets),
            "file_stamp": stamp,
        }
    if not samples:
        raise ValueError(f"No CVTG-2K images under {plan.out} to score")

    def mean(keys: list[str]) -> dict[str, float]:
        return {
            "word_accuracy": float(np.mean([samples[k]["word_accuracy"] for k in keys])),
            "ned": float(np.mean([samples[k]["ned"] for k in keys])),
            "n": len(keys),
        }

    subsets: dict[str, list[str]] = {}
    areas: dict[str, list[str]] = {}
    for rel in samples:
        subset, area, _ = rel.split("/")
        subsets.setdefault(subset, []).append(rel)
        areas.setdefault(area, []).append(rel)
    return {
        "overall": mean(list(samples)),
        "subsets": {name: mean(keys) for name, keys in subsets.items()},
        "areas": {name: mean(keys) for name, keys in sorted(areas.items())},
        "samples": samples,
    }


def write_report(plan: SuitePlan, report: dict[str, Any]) -> Path:
    """``report`` with the plan's settings as JSON at ``plan.report_path``."""
    path = plan.report_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": plan.settings(), **report}, indent=2) + "\n")
    return path
