import io

import pytest
import torch
from PIL import Image

from deepgen.data.resolution import decode_fix_pixels, fix_pixels_size


@pytest.mark.parametrize(
    ("width", "height", "target", "unit", "expected"),
    [
        (64, 64, 64, 32, (64, 64)),  # already on the grid
        (100, 100, 64, 32, (64, 64)),  # 100 * 0.64 is 64.00000000000001 in floats: must not round up
        (256, 64, 64, 32, (128, 32)),  # r = 64 / 128 = 0.5
        (1024, 768, 512, 32, (608, 448)),  # r = 0.57735: 591.2 -> 19 units, 443.4 -> 14 units
        (1000, 500, 512, 64, (768, 384)),  # r = 0.72408: 724.1 -> 12 units, 362.0 -> 6 units
        (30, 30, 64, 32, (64, 64)),  # upscaling
    ],
)
def test_fix_pixels_size_hand_computed(width, height, target, unit, expected):
    assert fix_pixels_size(width, height, target, unit) == expected


def test_fix_pixels_size_rejects_non_positive():
    with pytest.raises(ValueError, match="positive"):
        fix_pixels_size(0, 64, 64)


def _encoded(size, fmt="PNG", color=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def test_decode_keeps_fitting_images_and_resizes_others():
    same = decode_fix_pixels(_encoded((64, 64)), 64, 32)
    assert same.dtype == torch.uint8 and same.shape == (3, 64, 64)
    assert same[:, 10, 10].tolist() == [10, 20, 30]
    for fmt in ("PNG", "JPEG"):  # JPEG takes the reduced-scale decode path
        out = decode_fix_pixels(_encoded((1024, 768), fmt), 512, 32)
        assert out.shape == (3, 448, 608)
        assert (out[:, 200, 300].int() - torch.tensor([10, 20, 30])).abs().max() <= 3
