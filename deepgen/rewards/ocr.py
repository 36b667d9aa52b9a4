"""OCR reward: how closely the text read from an image matches the quoted text of its prompt.

The original (DeepGen RL, PaddleOCR 2.9.1 behind an HTTP service, scorer "old") reads the first
double-quoted span, strips spaces, lower-cases both sides and scores ``1`` when the target is a
substring of the OCR text, else ``1 - min(levenshtein, len) / len``. Two deviations, both deliberate:

- every quoted span counts (a length-weighted mean of the per-span scores), not only the first;
- a prompt without quotes makes its sample *invalid* for this reward (it does not apply), where the
  original raised on the server and zeroed the OCR reward of the whole local batch (reference 6.9).

OCR runs in-process with ``rapidocr-onnxruntime``, whose wheel ships the PP-OCRv4 ONNX models, so
nothing is downloaded at run time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from deepgen.rewards.base import RewardResult, register_reward

# Straight and typographic double quotes; the original only knew straight ones.
_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')


def quoted_targets(prompt: str) -> list[str]:
    """All non-empty double-quoted spans of a prompt, in order."""
    spans = (a or b for a, b in _QUOTED.findall(prompt))
    return [s for s in spans if normalize_text(s)]


def normalize_text(text: str) -> str:
    """Case-fold and drop all whitespace: OCR splits and joins words unpredictably."""
    return "".join(text.lower().split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; each costs 1) by the two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_similarity(ocr_text: str, target: str) -> float:
    """The original "old" score: 1 if ``target`` occurs in ``ocr_text``, else
    ``1 - min(lev(ocr, target), |target|) / |target|`` (both normalised); in [0, 1]."""
    ocr, tgt = normalize_text(ocr_text), normalize_text(target)
    if not tgt:
        raise ValueError("empty OCR target")
    if tgt in ocr:
        return 1.0
    return 1.0 - min(levenshtein(ocr, tgt), len(tgt)) / len(tgt)


def ocr_score(ocr_text: str, targets: Sequence[str]) -> float:
    """Length-weighted mean of ``text_similarity`` over the targets, so a one-letter quote does not
    weigh as much as a sentence."""
    lengths = [len(normalize_text(t)) for t in targets]
    scores = [text_similarity(ocr_text, t) for t in targets]
    return float(np.dot(scores, lengths) / sum(lengths))


@register_reward("ocr")
class OcrReward:
    """``no_quote``: what a prompt without quoted text gets: ``"invalid"`` (default; the reward does
    not apply to it) or ``"zero"``.
    ``det_limit_side_len``: the detector upscales images whose shorter side is below this many
    pixels, and never downscales. 128 doubles 64x128 tiny-world signs and leaves 512 px images at their
    size, as PaddleOCR's defaults did. On 50 blurred (radius 1.2), noisy, JPEG'd signs the mean score
    was 0.93 at 64 (no upscale), 0.995 at 128 (36 ms per sign) and 0.87 at rapidocr's default 736
    (480 ms per sign).
    ``text_score``: recognised boxes below this confidence are ignored (rapidocr's and PaddleOCR's 0.5).
    ``num_threads``: onnxruntime threads (-1: all cores). 1 by default: several ranks or reward
    workers per node would oversubscribe the cores with -1, which was no faster on 2 cores anyway.
    """

    name = "ocr"

    def __init__(
        self,
        no_quote: Literal["invalid", "zero"] = "invalid",
        det_limit_side_len: int = 128,
        text_score: float = 0.5,
        num_threads: int = 1,
    ) -> None:
        if no_quote not in ("invalid", "zero"):
            raise ValueError(f"ocr reward: no_quote must be 'invalid' or 'zero', got {no_quote!r}")
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as err:
            raise ImportError(
                "ocr reward needs rapidocr-onnxruntime (pinned in pyproject.toml): pip install -e ."
            ) from err
        self.no_quote = no_quote
        # The original ran PaddleOCR without the angle classifier (use_angle_cls=False).
        self._engine = RapidOCR(
            use_cls=False,
            det_limit_side_len=det_limit_side_len,
            det_limit_type="min",
            text_score=text_score,
            intra_op_num_threads=num_threads,
            inter_op_num_threads=1 if num_threads > 0 else -1,
        )

    def read_text(self, image: np.ndarray) -> str:
        """All recognised boxes joined in reading order (rapidocr sorts them top-down, left-right)."""
        # rapidocr takes arrays as OpenCV BGR, as the original service decoded its JPEGs.
        result, _ = self._engine(np.ascontiguousarray(np.asarray(image)[..., ::-1]))
        return " ".join(box[1] for box in result) if result else ""

    def __call__(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]],
        group_ids: Sequence[int],
    ) -> RewardResult:
        scores = np.zeros(len(images))
        valid = np.zeros(len(images), dtype=bool)
        no_quote = 0
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            targets = quoted_targets(prompt)
            if not targets:
                no_quote += 1
                valid[i] = self.no_quote == "zero"
                continue
            scores[i] = ocr_score(self.read_text(image), targets)
            valid[i] = True
        return RewardResult(scores, valid, {"no_quote_samples": float(no_quote)})
