"""CLIP reward: cosine similarity of a prompt and its image in CLIP space, as the original ``clip_sim``.

``score = <t / |t|, v / |v|>`` with ``t``, ``v`` the projected text and image embeddings; unscaled
(no x100 logit scale), so in [-1, 1] (in practice about 0.1-0.4 for real CLIP). Text longer than
CLIP's 77 positions is truncated, as in the original.

The model is loaded from a local directory only (``save_pretrained`` layout: config.json, weights,
tokenizer files, preprocessor_config.json). The PIL image processor is used because torchvision,
which the default "fast" processor needs, cannot be installed beside the CPU torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepgen.rewards.base import RewardResult, register_reward

CLIP_MAX_TOKENS = 77


def _embeds(output: torch.Tensor | Any) -> torch.Tensor:
    # transformers 5.x returns a model output whose pooler_output holds the projected embeddings.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@register_reward("clip")
class ClipReward:
    """``model_path``: local CLIP directory (e.g. a saved ``openai/clip-vit-large-patch14``).
    ``device``: torch device for the model. ``batch_size``: images per forward pass."""

    name = "clip"

    def __init__(self, model_path: str, device: str = "cpu", batch_size: int = 32) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"CLIP directory {path} has no config.json: expected a CLIPModel saved with "
                "save_pretrained (config.json, weights, tokenizer files, preprocessor_config.json)"
            )
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = CLIPModel.from_pretrained(path).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = CLIPImageProcessorPil.from_pretrained(path)
        self.max_tokens = min(CLIP_MAX_TOKENS, self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def similarity(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each image with its own prompt, [N] float64."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch_images = list(images[start : start + self.batch_size])
            batch_prompts = list(prompts[start : start + self.batch_size])
            text = self.tokenizer(
                batch_prompts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
            ).to(self.device)
            pixels = self.image_processor(images=batch_images, return_tensors="pt")["pixel_values"]
            t = _embeds(self.model.get_text_features(**text))
            v = _embeds(self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype)))
            t = torch.nn.functional.normalize(t.float(), dim=-1)
            v = torch.nn.functional.normalize(v.float(), dim=-1)
            out.append((t * v).sum(-1).cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def __call__(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]],
        group_ids: Sequence[int],
    ) -> RewardResult:
        scores = self.similarity(images, prompts)
        return RewardResult(scores, np.ones(len(scores), dtype=bool))
