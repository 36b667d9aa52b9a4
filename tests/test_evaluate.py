"""evaluate.py and deepgen/eval/benchmark.py: the CLI on an untrained tiny-zoo checkpoint (files, ranges,
determinism), and the scoring path with ground-truth images in place of the model's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from deepgen.data.tiny_world import render_scene
from deepgen.eval import benchmark
from deepgen.eval.benchmark import CATEGORIES, EvalSettings, evaluate_backbone
from tests.conftest import EVAL_PER_SPLIT

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tiny_sft_run) -> Path:
    return tiny_sft_run[0].parents[1]


def evaluate(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "evaluate.py", "--steps", "2", "--limit", "2", "--device", "cpu", "--no-progress"]
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_cli_writes_results_in_range_and_is_deterministic(run_dir, tiny_eval_dir, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        result = evaluate("--checkpoint", str(run_dir), "--eval-dir", str(tiny_eval_dir), "--out", str(out))
        assert result.returncode == 0, result.stderr
    assert "| category |" in result.stdout and "overall" in result.stdout
    results = json.loads((outs[0] / "results.json").read_text())
    assert set(results["categories"]) == set(CATEGORIES)
    for name, summary in results["categories"].items():
        assert summary["n"] == EVAL_PER_SPLIT
        assert 0.0 <= summary["score"] <= 1.0 and 0.0 <= summary["accuracy"] <= 1.0, name
        assert (outs[0] / f"{name}.png").is_file()
    assert {"ocr", "sign_score"} <= set(results["categories"]["t2i_text_rendering"])
    assert {"edit_score", "preserve_score", "ocr"} <= set(results["categories"]["edit_text_rendering"])
    assert 0.0 <= results["overall"]["score"] <= 1.0
    assert results["checkpoint"].endswith("step_000001.ckpt")
    assert (outs[0] / "results.md").read_text().startswith("| category |")
    assert (outs[0] / "results.json").read_text() == (outs[1] / "results.json").read_text()


def test_missing_eval_dir_is_a_one_line_error(run_dir, tmp_path):
    result = evaluate("--checkpoint", str(run_dir), "--eval-dir", str(tmp_path / "nowhere"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_ground_truth_images_score_one(tiny_eval_dir, tmp_path, monkeypatch):
    """With the generator replaced by the rendered targets, every category scores 1.0: the scoring path
    (sizes, specs, OCR, aggregation) is right, whatever the model."""
    targets: dict[tuple[str, int], dict] = {}
    for name in CATEGORIES:
        for i, line in enumerate((tiny_eval_dir / f"{name}.jsonl").read_text().splitlines()):
            sample = json.loads(line)
            prompt = sample.get("caption") or sample["instruction"]
            targets[(prompt, i)] = sample.get("spec") or sample["target_spec"]

    def ground_truth(backbone, prompts, seeds, *, width: int, height: int, **kwargs) -> Tensor:
        images = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            img = render_scene(targets[(prompt, seed)]).resize((width, height))
            images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1.0)
        return torch.stack(images)

    monkeypatch.setattr(benchmark, "generate_batch", ground_truth)
    results = evaluate_backbone(
        None, tiny_eval_dir, EvalSettings(seed=0, batch_size=1), tmp_path, progress=False
    )
    for name, summary in results["categories"].items():
        assert summary["score"] == pytest.approx(1.0), (name, results["samples"][name])
        assert summary["accuracy"] == 1.0, name
    assert results["overall"] == {"score": pytest.approx(1.0), "accuracy": 1.0}
    assert {p.name for p in tmp_path.glob("*.png")} == {f"{name}.png" for name in CATEGORIES}
