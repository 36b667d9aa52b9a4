"""Image conversions shared by sampling grids, RL rollouts and the generation CLI."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [-1, 1] -> ``[B, H, W, 3]`` uint8 (the original's 127.5 * x + 128)."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def tile_rows(rows: list[list[np.ndarray]], pad: int = 2) -> Image.Image:
    """Lay out rows of HxWx3 images on a white sheet, each in a cell of the largest image's size."""
    h = max(img.shape[0] for row in rows for img in row)
    w = max(img.shape[1] for row in rows for img in row)
    cols = max(len(r) for r in rows)
    sheet = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            sheet[y : y + img.shape[0], x : x + img.shape[1]] = img
    return Image.fromarray(sheet)
