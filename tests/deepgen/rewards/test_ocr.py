"""OCR reward on tiny-world signs: the real rapidocr models, shipped in the wheel, on rendered images."""

import random

import numpy as np
import pytest

from deepgen.data.tiny_world import random_sign_scene, render_scene, sign_description
from deepgen.rewards.ocr import OcrReward, levenshtein, ocr_score, quoted_targets, text_similarity


@pytest.fixture(scope="module")
def ocr() -> OcrReward:
    return OcrReward(num_threads=1)


def test_quoted_targets():
    assert quoted_targets('a sign that says "OPEN" and "Cafe 24"') == ["OPEN", "Cafe 24"]
    assert quoted_targets("a \u201ctypographic\u201d quote") == ["typographic"]
    assert quoted_targets('no quotes, or an empty one: ""') == []


def test_levenshtein_and_similarity():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert text_similarity("The Big SUN rises", "sun") == 1.0  # substring, case-insensitive
    assert text_similarity("H E L L O", "hello") == 1.0  # whitespace removed
    assert text_similarity("SUM", "SUN") == pytest.approx(1 - 1 / 3)
    assert text_similarity("completely different", "SUN") == 0.0  # distance capped at the length
    # Length-weighted over all quotes: "AB" read, "CDEF" missing -> (1 * 2 + 0 * 4) / 6.
    assert ocr_score("AB", ["AB", "CDEF"]) == pytest.approx(2 / 6)


def test_rendered_signs_score_high_and_blank_low(ocr):
    rng = random.Random(3)
    specs = [random_sign_scene(rng, 128, 64) for _ in range(4)]
    prompts = [sign_description(spec["sign"]) for spec in specs]
    signs = [np.asarray(render_scene(spec)) for spec in specs]
    blank = [np.full((64, 128, 3), 255, np.uint8)] * 2 + [
        np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    ] * 2
    good = ocr(signs, prompts, [{}] * 4, [0, 0, 1, 1])
    bad = ocr(blank, prompts, [{}] * 4, [0, 0, 1, 1])
    assert good.valid.all() and bad.valid.all()
    np.testing.assert_allclose(good.scores, 1.0)
    np.testing.assert_allclose(bad.scores, 0.0)


def test_prompt_without_quotes_is_invalid_or_zero(ocr):
    spec = random_sign_scene(random.Random(0), 128, 64)
    image = np.asarray(render_scene(spec))
    prompts = ["a red circle", sign_description(spec["sign"])]
    result = ocr([image, image], prompts, [{}, {}], [0, 0])
    assert result.valid.tolist() == [False, True]
    assert result.scores[1] == 1.0
    assert result.info == {"no_quote_samples": 1.0}

    zero = OcrReward(no_quote="zero", num_threads=1)([image], ["a red circle"], [{}], [0])
    assert zero.valid.tolist() == [True] and zero.scores.tolist() == [0.0]


def test_bad_option_fails_by_name():
    with pytest.raises(ValueError, match="no_quote"):
        OcrReward(no_quote="skip")
