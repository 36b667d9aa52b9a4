"""The DeepGen "fix_pixels" resize rule: keep the aspect ratio, aim for a fixed pixel count.

Every image is scaled so its area is about ``target**2`` (slightly above, never below by more than rounding)
and both sides are multiples of ``unit`` (32 = VAE factor 8 x DiT patch 2 x VLM merge 2, rounded up). There is
no cropping, so the whole image stays visible, and images of different aspect ratios get different sizes.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def fix_pixels_size(width: int, height: int, target: int, unit: int = 32) -> tuple[int, int]:
    """New (width, height): r = target / sqrt(W * H), each side -> ceil(side * r / unit) * unit."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if target <= 0 or unit <= 0:
        raise ValueError(f"target and unit must be positive, got target={target}, unit={unit}")
    scale = target / math.sqrt(width * height)
    # The tolerance keeps float noise (e.g. 64.00000000000001) from adding a whole extra unit.
    new_width = math.ceil(width * scale / unit - 1e-9) * unit
    new_height = math.ceil(height * scale / unit - 1e-9) * unit
    return new_width, new_height


def decode_fix_pixels(data: bytes, target: int, unit: int = 32) -> torch.Tensor:
    """Encoded image bytes -> uint8 ``[3, H, W]`` at its `fix_pixels_size`.

    JPEGs are decoded at a reduced scale when that still covers the target (libjpeg's DCT scaling),
    then resized with antialiased bilinear interpolation on uint8, torch's fastest CPU path: together
    about 2x faster than a full decode plus PIL bicubic for photos larger than the target.
    """
    with Image.open(io.BytesIO(data)) as img:
        width, height = fix_pixels_size(*img.size, target, unit)
        img.draft("RGB", (width, height))
        pixels = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
    if pixels.shape[1:] == (height, width):
        return pixels
    resized = F.interpolate(pixels[None], size=(height, width), mode="bilinear", antialias=True)
    return resized[0]
