"""Qwen2.5-VL prompting: templates, think tokens, reference images and 3-D mRoPE positions.

Prompts follow the original DeepGen exactly. T2I:
``<|im_start|>user\\nGenerate an image: {caption}<|im_end|>\\n<|im_start|>assistant\\n``; editing puts one
vision block per reference image (back to back) then a newline and the instruction in the user turn.
No system turn is inserted (the chat template's default system prompt is not used). The sequence is
left-padded and the think tokens are appended after the assistant header, at the very end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

USER_TURN = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
GENERATION_PREFIX = "Generate an image: "
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
REFERENCE_UNIT = 32
"""Reference images have sides that are multiples of this; each 32x32 block becomes one VLM token."""


def build_t2i_prompt(caption: str) -> str:
    """The T2I prompt; an empty caption is the unconditional (CFG) prompt, as in the original."""
    return USER_TURN.format(input=GENERATION_PREFIX + caption)


def build_edit_prompt(instruction: str, image_token_counts: list[int]) -> str:
    """The editing prompt: one vision block per reference (no separators), newline, instruction."""
    blocks = "".join(VISION_START + IMAGE_PAD * n + VISION_END for n in image_token_counts)
    return USER_TURN.format(input=blocks + "\n" + instruction)


def select_fusion_layers(num_layers: int, num_fusion_layers: int = 6) -> list[int]:
    """Hidden-state indices fused by SCB, deepest first, spaced by ``num_layers // num_fusion_layers``.

    Index k of Hugging Face's ``hidden_states`` tuple is the input of decoder layer k (0 is the
    embedding output), so the final layer's output and final norm are not used. 36 layers give the
    original's [35, 29, 23, 17, 11, 5].
    """
    step = num_layers // num_fusion_layers
    if step < 1:
        raise ValueError(f"Cannot fuse {num_fusion_layers} layers of a VLM with only {num_layers} layers")
    return [num_layers - 1 - k * step for k in range(num_fusion_layers)]


@dataclass(frozen=True)
class VisionSpec:
    """What the Qwen2.5-VL vision tower expects, read from preprocessor_config.json."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def patchify_for_vit(pixels01: Tensor, spec: VisionSpec) -> tuple[Tensor, Tensor]:
    """Normalise and cut one image into Qwen2.5-VL ViT patch rows in its 2x2-merge order.

    Args:
        pixels01: ``[3, H, W]`` in [0, 1], H and W multiples of ``patch_size * merge_size``.

    Returns:
        ``[grid_h * grid_w, 3 * temporal * patch * patch]`` rows and the ``[1, grid_h, grid_w]`` grid.
    """
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    _, h, w = pixels01.shape
    if h % (p * m) or w % (p * m):
        raise ValueError(f"ViT input {h}x{w} is not a multiple of {p * m}")
    mean = torch.tensor(spec.image_mean, dtype=pixels01.dtype, device=pixels01.device).view(3, 1, 1)
    std = torch.tensor(spec.image_std, dtype=pixels01.dtype, device=pixels01.device).view(3, 1, 1)
    x = ((pixels01 - mean) / std).unsqueeze(0).expand(t, -1, -1, -1)  # a still image fills the temporal patch
    gh, gw = h // p, w // p
    x = x.reshape(1, t, 3, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = x.reshape(gh * gw, 3 * t * p * p)
    return rows, torch.tensor([1, gh, gw])


def reference_to_vit_input(image: Tensor, spec: VisionSpec) -> tuple[Tensor, Tensor]:
    """A reference image in [-1, 1] -> ViT rows, resized by (patch*merge)/32 as in the original (512 -> 448)."""
    _, h, w = image.shape
    if h % REFERENCE_UNIT or w % REFERENCE_UNIT:
        raise ValueError(f"Reference image {h}x{w}: sides must be multiples of {REFERENCE_UNIT}")
    cell = spec.patch_size * spec.merge_size
    size = (h // REFERENCE_UNIT * cell, w // REFERENCE_UNIT * cell)
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return patchify_for_vit(((resized + 1) / 2).clamp(0, 1), spec)


def mrope_position_ids(
    input_ids: Tensor,
    attention_mask: Tensor,
    image_grid_thw: Tensor | None,
    image_token_id: int,
    merge_size: int,
) -> Tensor:
    """3-D (temporal, height, width) rotary positions of Qwen2.5-VL for still images.

    Text tokens advance all three axes together; an image block of an ``(t, h, w)`` LLM grid takes
    positions offset by the running position along each axis, and the running position then
    advances by ``max(t, h, w)``. Padding gets position 0 (the same convention as transformers).

    Returns:
        ``[3, B, L]`` long tensor.
    """
    batch, length = input_ids.shape
    positions = torch.zeros(3, batch, length, dtype=torch.long, device=input_ids.device)
    grids = iter(image_grid_thw.tolist()) if image_grid_thw is not None else iter(())
    for b in range(batch):
        valid = attention_mask[b].bool()
        is_image = (input_ids[b][valid] == image_token_id).tolist()
        pieces, current, i = [], 0, 0
        while i < len(is_image):
            if not is_image[i]:
                pieces.append(torch.full((3, 1), current, dtype=torch.long))
                current, i = current + 1, i + 1
                continue
            t, h, w = next(grids)
            h, w = h // merge_size, w // merge_size
            tt = torch.arange(t).view(t, 1, 1).expand(t, h, w).flatten()
            hh = torch.arange(h).view(1, h, 1).expand(t, h, w).flatten()
            ww = torch.arange(w).view(1, 1, w).expand(t, h, w).flatten()
            pieces.append(torch.stack([tt, hh, ww]) + current)
            current, i = current + max(t, h, w), i + t * h * w
        positions[:, b, valid] = torch.cat(pieces, dim=1).to(positions.device)
    return positions


@dataclass
class VLMBatch:
    """Tokenised prompts ready for the VLM, think-token slots included."""

    input_ids: Tensor  # [B, L]
    attention_mask: Tensor  # [B, L], 1 = real token
    position_ids: Tensor  # [3, B, L]
    think_mask: Tensor  # [B, L] bool, the think-token slots at the end
    pixel_values: Tensor | None  # [N_patches, D] for all reference images of the batch, in order
    image_grid_thw: Tensor | None  # [num_images, 3]


class VLMPrompter:
    """Turns captions, instructions and reference images into a :class:`VLMBatch`."""

    def __init__(
        self,
        tokenizer,
        vision: VisionSpec,
        image_token_id: int,
        num_think_tokens: int,
        max_prompt_tokens: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.vision = vision
        self.image_token_id = image_token_id
        self.num_think_tokens = num_think_tokens
        self.max_prompt_tokens = max_prompt_tokens

    def _clip(self, text: str) -> str:
        """Keep the first max_prompt_tokens tokens of user text so templates and image blocks stay whole."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_prompt_tokens:
            return text
        return self.tokenizer.decode(ids[: self.max_prompt_tokens])

    def t2i(self, captions: list[str]) -> VLMBatch:
        return self._encode([build_t2i_prompt(self._clip(c)) for c in captions], None)

    def edit(self, instructions: list[str], references: list[list[Tensor]]) -> VLMBatch:
        """Args: references: per sample, a list of ``[3, H, W]`` images in [-1, 1]."""
        if len(instructions) != len(references):
            raise ValueError(f"{len(instructions)} instructions but {len(references)} reference lists")
        rows, grids, prompts = [], [], []
        merge = self.vision.merge_size**2
        for instruction, refs in zip(instructions, references, strict=True):
            counts = []
            for ref in refs:
                r, g = reference_to_vit_input(ref, self.vision)
                rows.append(r)
                grids.append(g)
                counts.append(int(g.prod()) // merge)
            prompts.append(build_edit_prompt(self._clip(instruction), counts))
        pixels = torch.cat(rows) if rows else None
        grid = torch.stack(grids) if grids else None
        return self._encode(prompts, (pixels, grid))

    def _encode(self, prompts: list[str], images: tuple[Tensor | None, Tensor | None] | None) -> VLMBatch:
        enc = self.tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
        batch = len(prompts)
        k = self.num_think_tokens
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.cat([enc["input_ids"], torch.full((batch, k), pad_id, dtype=torch.long)], dim=1)
        attention_mask = torch.cat([enc["attention_mask"], torch.ones(batch, k, dtype=torch.long)], dim=1)
        think_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        think_mask[:, input_ids.shape[1] - k :] = True
        pixels, grid = images if images is not None else (None, None)
        positions = mrope_position_ids(
            input_ids, attention_mask, grid, self.image_token_id, self.vision.merge_size
        )
        return VLMBatch(input_ids, attention_mask, positions, think_mask, pixels, grid)
