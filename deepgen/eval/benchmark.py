"""The tiny-world benchmark: generate the held-out prompts with a backbone and score them by rule.

Six categories, one per eval file (``<task>_<category>.jsonl`` of deepgen.data.tiny_world): T2I
composition, reasoning and text rendering; editing general, reasoning and text. Images are scored with
deepgen.eval.tiny_world_scorer (graded ``score``, strict ``correct``); the word on a sign is read with
OCR (deepgen.rewards.ocr). Text categories combine both: score = mean of the scorer's score and the OCR
similarity, accuracy = scorer correct and OCR exact. ``overall`` is the mean over categories.

Sampling follows generate.py: CFG, an empty negative prompt for T2I and the original's quality negative
for edits (text-only CFG), sample i of a category uses seed + i whatever the batch size, and edit
sources are the rendered source specs converted like training's (fix-pixels size, [-1, 1]).
No Hydra or Lightning here: ``evaluate_backbone`` takes any backbone (CLI, validation callbacks).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from deepgen.data.resolution import fix_pixels_size
from deepgen.data.tiny_world import render_scene
from deepgen.diffusion.sampling import euler_sample, guided_velocity
from deepgen.diffusion.schedule import inference_sigmas
from deepgen.eval.tiny_world_scorer import score_edit, score_t2i
from deepgen.images import tile_rows, to_uint8
from deepgen.inference import SIZE_UNIT, default_negative_prompt, image_to_reference, output_size
from deepgen.model.backbone import Conditioning, DeepGenBackbone
from deepgen.rewards.ocr import ocr_score

CATEGORIES: dict[str, str] = {
    "t2i_general": "T2I composition",
    "t2i_reasoning": "T2I reasoning",
    "t2i_text_rendering": "T2I text rendering",
    "edit_general": "Editing",
    "edit_reasoning": "Editing reasoning",
    "edit_text_rendering": "Editing text",
}
GRID_ROWS = 8
# Columns of the Markdown table: (results key, header); a category lacking a key shows "-".
TABLE_COLUMNS = (
    ("score", "score"),
    ("accuracy", "accuracy"),
    ("sign_score", "sign"),
    ("ocr", "OCR"),
    ("edit_score", "edit part"),
    ("preserve_score", "preserve part"),
    ("preserve_pixels", "preserved px"),
)


@dataclass
class EvalSettings:
    num_steps: int = 50
    cfg_scale: float = 4.0
    seed: int = 0
    size: int = 64
    """fix-pixels target side of generated images (tiny world: 64)."""
    limit: int | None = None
    """prompts per category (first N); None: all."""
    batch_size: int = 8
    categories: Sequence[str] = field(default_factory=lambda: list(CATEGORIES))


def eval_files(eval_dir: str | Path, categories: Sequence[str]) -> dict[str, Path]:
    """Category -> its eval file; an error naming the first that is unknown or missing."""
    files = {}
    for name in categories:
        if name not in CATEGORIES:
            raise ValueError(f"Unknown category {name!r}: choose from {list(CATEGORIES)}")
        files[name] = Path(eval_dir) / f"{name}.jsonl"
        if not files[name].is_file():
            raise FileNotFoundError(
                f"Eval file {files[name]} does not exist (write it with write_tiny_world_shards)"
            )
    return files


def read_eval_file(path: str | Path, limit: int | None = None) -> list[dict]:
    """The samples of an eval JSONL file (first ``limit``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Eval file {path} does not exist (write it with write_tiny_world_shards)")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines[:limit]]


@torch.no_grad()
def generate_batch(
    backbone: DeepGenBackbone,
    prompts: list[str],
    seeds: list[int],
    *,
    negative_prompt: str = "",
    references: list[list[Tensor]] | None = None,
    width: int,
    height: int,
    num_steps: int = 50,
    cfg_scale: float = 4.0,
) -> Tensor:
    """One image per prompt ``[N, 3, height, width]`` in [-1, 1], in one batched pass.

    Each sample draws its VAE posterior and starting noise from its own generator (``seeds[i]``), in
    generate_images' order, so an image does not depend on the rest of its batch's noise.
    """
    bb = backbone
    generators = [torch.Generator(device=bb.device).manual_seed(s) for s in seeds]
    dtype = next(bb.dit.parameters()).dtype
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(bb.device.type, dtype=dtype)
    with autocast:
        if references is not None:
            refs = [[r.to(bb.device) for r in sample] for sample in references]
            cond = bb.condition_edit(prompts, refs)
            uncond = bb.condition_edit([negative_prompt] * len(prompts), refs)
            ref_latents = [
                [bb.encode_images(r[None], g)[0] for r in sample]
                for sample, g in zip(refs, generators, strict=True)
            ]
        else:
            cond = bb.condition_t2i(prompts)
            uncond = bb.condition_t2i([negative_prompt] * len(prompts))
            ref_latents = None
        shape = bb.latent_shape(height, width)
        x = torch.cat([torch.randn((1, *shape), generator=g, device=bb.device) for g in generators])
        both: Conditioning = cond.cat(uncond)
        refs2 = ref_latents + ref_latents if ref_latents is not None else None
        n = len(prompts)

        def velocity(x: Tensor, sigma: Tensor) -> Tensor:
            v = bb.velocity(torch.cat([x, x]), sigma.expand(2 * n).to(bb.device), both, refs2)
            return guided_velocity(v[:n], v[n:], cfg_scale)

        sigmas = inference_sigmas(bb.scheduler, num_steps).to(bb.device)
        return bb.decode_latents(euler_sample(velocity, x, sigmas)).float()


class _Ocr:
    """OcrReward's engine, built on first use (only text categories need it)."""

    def __init__(self) -> None:
        self._reward: Any = None

    def similarity(self, image: np.ndarray, word: str) -> float:
        if self._reward is None:
            from deepgen.rewards.ocr import OcrReward

            self._reward = OcrReward()
        return ocr_score(self._reward.read_text(image), [word])


def _render(spec: dict, width: int, height: int) -> np.ndarray:
    img = render_scene(spec)
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(img.convert("RGB"))


def _score_sample(task: str, category: str, sample: dict, image: np.ndarray, ocr: _Ocr) -> dict:
    """Per-sample result: the scorer's dict, plus OCR for signs, with ``score``/``correct`` combined."""
    if task == "t2i":
        result = score_t2i(image, sample["spec"], sample.get("caption"))
        word = sample["spec"]["sign"]["text"] if category == "text_rendering" else None
    else:
        result = score_edit(image, sample["source_spec"], sample["target_spec"], sample["edit"])
        word = sample["target_spec"]["sign"]["text"] if category == "text_rendering" else None
    out = {
        k: v for k, v in result.items() if k in ("checks", "edit_score", "preserve_score", "preserve_pixels")
    }
    out["score"], out["correct"] = float(result["score"]), bool(result["correct"])
    if word is not None:
        sim = ocr.similarity(image, word)
        out["ocr"] = sim
        out["scorer_score"], out["scorer_correct"] = out["score"], out["correct"]
        if task == "t2i":
            out["sign_score"] = out["score"]
        out["score"] = (out["scorer_score"] + sim) / 2
        out["correct"] = out["scorer_correct"] and sim == 1.0
    return out


def _summarise(samples: list[dict]) -> dict[str, float]:
    summary = {"score": float(np.mean([s["score"] for s in samples]))}
    summary["accuracy"] = float(np.mean([s["correct"] for s in samples]))
    for key in ("sign_score", "ocr", "edit_score", "preserve_score", "preserve_pixels"):
        if key in samples[0]:
            summary[key] = float(np.mean([s[key] for s in samples]))
    summary["n"] = len(samples)
    return summary


def evaluate_backbone(
    backbone: DeepGenBackbone,
    eval_dir: str | Path,
    settings: EvalSettings | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Generate and score every category of ``eval_dir``; returns ``{"categories": {name: summary},
    "overall": {score, accuracy}, "samples": {name: [per-sample results]}, "settings": {...}}``.

    With ``out_dir``, also writes one grid per category (first 8 prompts; rows ``output | target``,
    edits ``source | output | target``) as ``<category>.png``.
    """
    settings = settings or EvalSettings()
    eval_dir = Path(eval_dir)
    data = {
        c: read_eval_file(p, settings.limit) for c, p in eval_files(eval_dir, settings.categories).items()
    }
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    ocr = _Ocr()
    total = sum(len(v) for v in data.values())
    bar = tqdm(total=total, desc="benchmark", unit="img", disable=not progress)
    results: dict[str, Any] = {"categories": {}, "samples": {}}
    for name, samples in data.items():
        task, category = name.split("_", 1)
        editing = task == "edit"
        negative = default_negative_prompt(editing)
        scored, rows = [], []
        for start in range(0, len(samples), settings.batch_size):
            chunk = samples[start : start + settings.batch_size]
            seeds = [settings.seed + start + j for j in range(len(chunk))]
            if editing:
                prompts = [s["instruction"] for s in chunk]
                sources = [render_scene(s["source_spec"]) for s in chunk]
                refs = [[image_to_reference(img, settings.size)] for img in sources]
                width, height = output_size(settings.size, refs[0])
                if any(r[0].shape[1:] != refs[0][0].shape[1:] for r in refs):
                    raise ValueError(f"{name}: sources of different sizes in one batch")
            else:
                prompts = [s["caption"] for s in chunk]
                spec = chunk[0]["spec"]
                width, height = fix_pixels_size(spec["width"], spec["height"], settings.size, SIZE_UNIT)
                if any(
                    (s["spec"]["width"], s["spec"]["height"]) != (spec["width"], spec["height"])
                    for s in chunk
                ):
                    raise ValueError(f"{name}: specs of different sizes in one batch")
                refs = None
            images = to_uint8(
                generate_batch(
                    backbone,
                    prompts,
                    seeds,
                    negative_prompt=negative,
                    references=refs,
                    width=width,
                    height=height,
                    num_steps=settings.num_steps,
                    cfg_scale=settings.cfg_scale,
                )
            )
            for j, (sample, image) in enumerate(zip(chunk, images, strict=True)):
                result = _score_sample(task, category, sample, image, ocr)
                scored.append({"key": sample.get("key"), "prompt": prompts[j], **result})
                if len(rows) < GRID_ROWS:
                    target = _render(sample["target_spec" if editing else "spec"], width, height)
                    row = [to_uint8(refs[j][0][None])[0]] if refs is not None else []
                    rows.append([*row, image, target])
            bar.update(len(chunk))
        results["categories"][name] = _summarise(scored)
        results["samples"][name] = scored
        if out_dir is not None and rows:
            tile_rows(rows).save(Path(out_dir) / f"{name}.png")
    bar.close()
    cats = results["categories"].values()
    results["overall"] = {
        "score": float(np.mean([c["score"] for c in cats])),
        "accuracy": float(np.mean([c["accuracy"] for c in cats])),
    }
    results["settings"] = {
        "num_steps": settings.num_steps,
        "cfg_scale": settings.cfg_scale,
        "seed": settings.seed,
        "size": settings.size,
        "limit": settings.limit,
        "batch_size": settings.batch_size,
        "eval_dir": str(eval_dir),
    }
    return results


def markdown_table(results: dict) -> str:
    """The per-category summaries and the overall mean as a Markdown table."""
    header = ["category", "n", *(h for _, h in TABLE_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, summary in results["categories"].items():
        cells = [f"{CATEGORIES.get(name, name)} (`{name}`)", str(summary["n"])]
        cells += [f"{summary[k]:.3f}" if k in summary else "-" for k, _ in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    overall = results["overall"]
    cells = ["**overall** (mean of categories)", "", f"{overall['score']:.3f}", f"{overall['accuracy']:.3f}"]
    lines.append("| " + " | ".join(cells + ["-"] * (len(TABLE_COLUMNS) - 2)) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: str | Path, extra: dict | None = None) -> None:
    """``results.json`` (summaries, settings, per-sample results) and ``results.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**(extra or {}), **results}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    (out / "results.md").write_text(markdown_table(results))


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
