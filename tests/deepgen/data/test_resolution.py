import pytest
from PIL import Image

from deepgen.data.resolution import fix_pixels_size, resize_to_fix_pixels


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


def test_resize_identity_and_resize():
    img = Image.new("RGB", (64, 64), (10, 20, 30))
    assert resize_to_fix_pixels(img, 64, 32) is img
    wide = Image.new("RGB", (1024, 768), (10, 20, 30))
    out = resize_to_fix_pixels(wide, 512, 32)
    assert out.size == (608, 448)
    assert out.getpixel((300, 200)) == (10, 20, 30)
