"""Reward "tiny_world": the graded rule score of deepgen.eval.tiny_world_scorer, the demo's RL reward.

Text-to-image samples need a ``spec`` in their metadata (and use its ``caption``, else the prompt, to
know which sizes and regions were asked for); edit samples need ``source_spec``, ``target_spec`` and
``edit``. A sample without them cannot be scored, so it is invalid rather than 0. For signs this scores
the sign (colour, shape, ink, preservation); whether it spells the word is the "ocr" reward's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from deepgen.data.tiny_world import PALETTE, SHAPES
from deepgen.eval.tiny_world_scorer import score_edit, score_t2i
from deepgen.rewards.base import RewardResult, register_reward


def _valid_spec(spec: Any) -> bool:
    """A spec the scorer can read: an image size, known colours and shapes, objects with geometry."""
    if not isinstance(spec, dict) or not all(k in spec for k in ("width", "height", "objects")):
        return False
    objects_ok = all(
        isinstance(o, dict) and o.get("color") in PALETTE and o.get("shape") in SHAPES and "center" in o
        for o in spec["objects"]
    )
    sign = spec.get("sign")
    return objects_ok and (sign is None or (isinstance(sign, dict) and sign.get("color") in PALETTE))


def score_sample(image: np.ndarray, prompt: str, metadata: dict[str, Any]) -> dict | None:
    """The scorer's result for one sample, or None when its metadata holds no usable spec."""
    if "spec" in metadata:
        if not _valid_spec(metadata["spec"]):
            return None
        return score_t2i(image, metadata["spec"], caption=metadata.get("caption", prompt))
    source, target, edit = (metadata.get(k) for k in ("source_spec", "target_spec", "edit"))
    if _valid_spec(source) and _valid_spec(target) and isinstance(edit, dict) and "kind" in edit:
        return score_edit(image, source, target, edit)
    return None


@register_reward("tiny_world")
class TinyWorldReward:
    """Graded tiny-world score in [0, 1]; ``info["correct"]`` is the strict accuracy over valid samples."""

    name = "tiny_world"

    def __call__(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]],
        group_ids: Sequence[int],
    ) -> RewardResult:
        results = [
            score_sample(np.asarray(image), prompt, meta)
            for image, prompt, meta in zip(images, prompts, metadata, strict=True)
        ]
        scored = [r for r in results if r is not None]
        return RewardResult(
            scores=np.array([r["score"] if r else 0.0 for r in results]),
            valid=np.array([r is not None for r in results]),
            info={
                "correct": float(np.mean([r["correct"] for r in scored])) if scored else 0.0,
                "invalid": float(len(results) - len(scored)),
            },
        )
