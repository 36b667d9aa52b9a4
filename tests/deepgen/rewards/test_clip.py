"""CLIP reward on a tiny random CLIP: shape, range, determinism, and the error for a missing model."""

import numpy as np
import pytest
import torch

from deepgen.rewards.clip import ClipReward


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(n)]


def test_scores_are_cosines(tiny_clip_dir):
    reward = ClipReward(str(tiny_clip_dir), batch_size=2)
    images = _images(3)
    prompts = ["a red circle", 'a sign that says "SUN"', "x " * 200]  # the last exceeds 77 tokens
    result = reward(images, prompts, [{}] * 3, [0, 0, 1])
    assert result.scores.shape == (3,) and result.valid.all()
    assert np.all(np.abs(result.scores) <= 1.0)

    # The same pair scores the same, whatever its batch mates; and it matches a direct computation.
    again = reward([images[2], images[0]], [prompts[2], prompts[0]], [{}] * 2, [0, 0])
    np.testing.assert_allclose(again.scores, result.scores[[2, 0]], atol=1e-5)
    model, tok = reward.model, reward.tokenizer
    with torch.no_grad():
        t = model.get_text_features(**tok([prompts[0]], return_tensors="pt")).pooler_output
        pixels = reward.image_processor(images=[images[0]], return_tensors="pt")["pixel_values"]
        v = model.get_image_features(pixel_values=pixels).pooler_output
    expected = torch.nn.functional.cosine_similarity(t, v).item()
    assert result.scores[0] == pytest.approx(expected, abs=1e-5)


def test_identical_text_and_image_give_identical_scores(tiny_clip_dir):
    reward = ClipReward(str(tiny_clip_dir))
    image = _images(1)[0]
    result = reward([image, image], ["a blue square", "a blue square"], [{}] * 2, [0, 0])
    assert result.scores[0] == pytest.approx(result.scores[1], abs=1e-6)


def test_missing_directory_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ClipReward(str(tmp_path / "nope"))
