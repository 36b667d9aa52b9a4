"""generate.py and deepgen/inference.py on the tiny zoo: a run folder with an untrained SFT checkpoint,
sampled with 2 steps (tests need files, metadata and determinism, not image quality)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from deepgen.cli import add_checkpoint_arguments, add_compile_argument, load_model_from_args
from deepgen.data.resolution import fix_pixels_size
from deepgen.images import to_uint8
from deepgen.inference import EDIT_NEGATIVE_PROMPT, generate_images, load_model
from deepgen.model.backbone import DeepGenBackbone
from tests.conftest import perturb, to_original

ROOT = Path(__file__).resolve().parents[1]


def generate(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "generate.py", "--steps", "2", "--size", "64", "--device", "cpu", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_t2i_writes_pngs_with_settings_and_is_deterministic(tiny_sft_run, tmp_path):
    ckpt, state, _ = tiny_sft_run
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        args = ["--checkpoint", str(ckpt), "--prompt", "a red circle", "--prompt", "a blue square"]
        result = generate(*args, "--batch", "2", "--seed", "7", "--grid", "--out", str(out))
        assert result.returncode == 0, result.stderr
    assert f"Loaded {len(state) - 1} weights" in result.stdout
    assert "1 reference_dit weights ignored" in result.stdout
    files = sorted(p.name for p in outs[0].glob("*.png"))
    assert files == [
        "0000_a-red-circle_00.png",
        "0000_a-red-circle_01.png",
        "0001_a-blue-square_00.png",
        "0001_a-blue-square_01.png",
        "grid.png",
    ]
    with Image.open(outs[0] / "0001_a-blue-square_01.png") as img:
        assert img.size == (64, 64)
        meta = dict(img.text)
    assert meta["prompt"] == "a blue square"
    assert meta["negative_prompt"] == ""
    assert (meta["seed"], meta["index"], meta["steps"], meta["cfg_scale"]) == ("8", "1", "2", "4.0")
    assert meta["size"] == "64x64"
    assert meta["checkpoint"] == str(ckpt)
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_edit_with_source_image(tiny_sft_run, tmp_path):
    ckpt, _, _ = tiny_sft_run
    source = tmp_path / "source.png"
    Image.new("RGB", (96, 48), (200, 30, 30)).save(source)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "make it blue"}) + "\n" + json.dumps({"caption": "remove it"}) + "\n"
    )
    out = tmp_path / "out"
    result = generate(
        "--checkpoint", str(ckpt.parent.parent), "--prompt-file", str(prompts), "--image", str(source),
        "--grid", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with Image.open(out / "0001_remove-it_00.png") as img:
        assert img.size == fix_pixels_size(96, 48, 64)  # the source's aspect ratio, as the original demo
        assert img.text["negative_prompt"] == EDIT_NEGATIVE_PROMPT
        assert img.text["prompt"] == "remove it"
    with Image.open(out / "grid.png") as grid:  # two rows of (source, output)
        width, height = fix_pixels_size(96, 48, 64)
        assert grid.size == (2 * (width + 2) + 2, 2 * (height + 2) + 2)


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nowhere" / "step_000001.ckpt"
    result = generate("--checkpoint", str(missing), "--prompt", "a red circle")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(missing) in result.stderr


def test_compile_flag_compiles_the_sampling_step(tiny_sft_run, monkeypatch):
    """--compile (generate.py, evaluate.py): the same images through the compiled denoising step
    (traced with aot_eager: inductor's kernels take minutes to build on CPU)."""
    compile_sampling = DeepGenBackbone.compile_sampling
    compiled = []

    def trace(bb):
        compiled.append(bb)
        compile_sampling(bb, backend="aot_eager", mode=None)

    monkeypatch.setattr(DeepGenBackbone, "compile_sampling", trace)
    parser = argparse.ArgumentParser()
    add_checkpoint_arguments(parser)
    add_compile_argument(parser)
    ckpt, _, _ = tiny_sft_run
    images = []
    for flags in ([], ["--compile"]):
        bb = load_model_from_args(
            parser.parse_args(["--checkpoint", str(ckpt), "--device", "cpu", *flags])
        ).backbone
        images.append(generate_images(bb, "a red circle", width=64, height=64, num_steps=2, seed=3))
    assert len(compiled) == 1 and compiled[0] is bb
    torch.testing.assert_close(images[1], images[0], atol=1e-5, rtol=1e-5)


def test_load_model_copies_weights_and_rejects_another_lora_rank(tiny_sft_run, tmp_path):
    ckpt, state, module = tiny_sft_run
    loaded = load_model(ckpt, device="cpu")
    assert loaded.num_loaded == len(state) - 1 and loaded.num_ignored == 1
    assert not loaded.backbone.training
    # The rebuilt model conditions exactly as the trained one (VLM + LoRA + think tokens + bridge).
    trained = module.backbone.eval()
    with torch.no_grad():
        expected = trained.condition_t2i(["a red circle"])
        got = loaded.backbone.condition_t2i(["a red circle"])
    assert torch.equal(got.seq, expected.seq) and torch.equal(got.pooled, expected.pooled)

    other = tmp_path / "outputs" / "sft" / "other"
    shutil.copytree(ckpt.parent.parent, other)
    config = OmegaConf.load(other / "config.yaml")
    config.stage.lora.rank = 8
    OmegaConf.save(config, other / "config.yaml")
    with pytest.raises(ValueError, match=r"lora_A.*has shape \(4, .*stage.lora.rank"):
        load_model(other, device="cpu")


def test_generate_from_released_weights(tiny_model_cfg, tiny_zoo, tmp_path):
    """A .pt in the released DeepGen-1.0 naming (bridge and DiT only, as the original saves) with the model
    directories named on the command line: the import report is printed and the image is the source's."""
    source = perturb(
        DeepGenBackbone.from_pretrained_dirs(tiny_model_cfg),
        seed=3,
        prefixes=("bridge.", "dit.", "think_tokens"),
    ).eval()
    state = to_original(source.state_dict(), vlm=False)
    torch.save(state, tmp_path / "DeepGen-1.0.pt")
    sizes = {k: v for k, v in dataclasses.asdict(tiny_model_cfg).items() if k not in ("vlm_path", "dit_path")}
    OmegaConf.save(OmegaConf.create(sizes), tmp_path / "model.yaml")
    out = tmp_path / "out"
    result = generate(
        "--checkpoint", str(tmp_path / "DeepGen-1.0.pt"), "--vlm-path", str(tiny_zoo.vlm_dir),
        "--dit-path", str(tiny_zoo.dit_dir), "--model-config", str(tmp_path / "model.yaml"),
        "--prompt", "a red circle", "--seed", "3", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"DeepGen import: matched {len(state)}, missing" in result.stdout
    assert "unexpected 0" in result.stdout and "missing by part" in result.stdout
    expected = to_uint8(generate_images(source, "a red circle", width=64, height=64, num_steps=2, seed=3))[0]
    with Image.open(out / "0000_a-red-circle_00.png") as img:
        got = np.asarray(img).astype(int)
    assert np.abs(got - expected.astype(int)).max() <= 1

    # Without the sizes the weights were trained with, the error names the first key that does not fit.
    with pytest.raises(
        ValueError, match=r"meta_queries -> think_tokens: file \(4, 64\) vs model \(128, 64\)"
    ) as err:
        load_model(
            tmp_path / "DeepGen-1.0.pt", vlm_path=str(tiny_zoo.vlm_dir), dit_path=str(tiny_zoo.dit_dir)
        )
    assert "--model-config" in str(err.value) and "\n" not in str(err.value)
