"""FID and CLIP score from local weights: tiny random extractors (a TorchScript net, a 2-layer CLIP) stand
in for Inception and real CLIP; the tests check the plumbing and the math, not the numbers of real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from deepgen.eval.metrics import (
    clip_score,
    frechet_distance,
    image_files,
    load_clip,
    load_fid_features,
    read_images,
)


class TinyInception(nn.Module):
    """Mimics NVlabs' TorchScript Inception: 0-255 input, logits unless ``return_features``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=7, stride=8)

    def forward(self, img: Tensor, return_features: bool = False) -> Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv((img - 128) / 128)), 2).flatten(1)
        return x if return_features else x.sum(1, keepdim=True)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fid") / "tiny_inception.pt"
    torch.jit.save(torch.jit.script(TinyInception().eval()), str(path))
    return path


def _images(n: int, seed: int, bright: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    low = 128 if bright else 0
    return [rng.integers(low, 256, (48 + 8 * (i % 3), 64, 3), dtype=np.uint8) for i in range(n)]


def test_fid_torchscript_is_zero_for_a_set_with_itself(inception_file):
    feature = load_fid_features(inception_file)
    assert feature.return_features  # NVlabs-style: asks for the pool features, not the logits
    a, b = _images(24, 0), _images(24, 1, bright=True)
    assert frechet_distance(a, a, feature, batch_size=10) == pytest.approx(0.0, abs=1e-4)
    assert frechet_distance(a, b, feature, batch_size=10) > 0.01


def test_fid_in_clip_space(tiny_clip_dir):
    feature = load_fid_features(tiny_clip_dir)
    assert feature.num_features == 16
    a, b = _images(20, 0), _images(20, 1, bright=True)
    assert frechet_distance(a, a, feature) == pytest.approx(0.0, abs=1e-4)
    assert frechet_distance(a, b, feature) > 0.0


def test_fid_reads_a_reference_folder(inception_file, tmp_path):
    (tmp_path / "sub").mkdir()
    for i, image in enumerate(_images(4, 0)):
        Image.fromarray(image).save((tmp_path / "sub" if i % 2 else tmp_path) / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    files = image_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["0.png", "2.png", "sub/1.png", "sub/3.png"]
    feature = load_fid_features(inception_file)
    assert frechet_distance(_images(4, 0), read_images(files), feature) == pytest.approx(0.0, abs=1e-4)


def test_clip_score_matches_a_direct_computation(tiny_clip_dir):
    images = _images(3, 0)
    prompts = ["a red circle", 'a sign that says "SUN"', "x " * 200]  # the last exceeds 77 tokens
    score = clip_score(zip(images, prompts, strict=True), tiny_clip_dir, batch_size=2)
    model, tokenizer, processor = load_clip(tiny_clip_dir)
    with torch.no_grad():
        text = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        t = model.get_text_features(**text)
        v = model.get_image_features(
            pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]
        )
    expected = max(100 * torch.nn.functional.cosine_similarity(t, v).mean().item(), 0.0)
    assert score == pytest.approx(expected, abs=1e-3)


def test_missing_or_wrong_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="FID weights .*nowhere do not exist: expected a TorchScript"):
        load_fid_features(tmp_path / "nowhere")
    (tmp_path / "state.pt").write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="state.pt are not a TorchScript file"):
        load_fid_features(tmp_path / "state.pt")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_fid_features(tmp_path)
    with pytest.raises(FileNotFoundError, match="CLIP directory .* has no config.json"):
        clip_score([], tmp_path / "clip")
    with pytest.raises(ValueError, match="holds no images"):
        image_files(tmp_path)


def test_fid_needs_two_images_per_set(inception_file):
    feature = load_fid_features(inception_file)
    with pytest.raises(ValueError, match="at least 2 images in each set, got 1 generated, 3 reference"):
        frechet_distance(_images(1, 0), _images(3, 1), feature)


def test_any_torchscript_extractor_without_return_features(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 8, stride=16), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    torch.jit.save(torch.jit.script(net), str(tmp_path / "features.pt"))
    feature = load_fid_features(tmp_path / "features.pt")
    assert not feature.return_features
    a = _images(8, 0)
    assert frechet_distance(a, a, feature) == pytest.approx(0.0, abs=1e-4)
