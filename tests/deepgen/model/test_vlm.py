import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2VLImageProcessorPil

from deepgen.model.vlm import (
    VisionSpec,
    build_edit_prompt,
    build_t2i_prompt,
    mrope_position_ids,
    patchify_for_vit,
    reference_to_vit_input,
    select_fusion_layers,
)


def test_t2i_prompt_is_the_original_template():
    assert build_t2i_prompt("a red circle") == (
        "<|im_start|>user\nGenerate an image: a red circle<|im_end|>\n<|im_start|>assistant\n"
    )
    assert build_t2i_prompt("") == "<|im_start|>user\nGenerate an image: <|im_end|>\n<|im_start|>assistant\n"


def test_edit_prompt_has_one_vision_block_per_reference_then_newline():
    prompt = build_edit_prompt("make it blue", [2, 3])
    block1 = "<|vision_start|>" + "<|image_pad|>" * 2 + "<|vision_end|>"
    block2 = "<|vision_start|>" + "<|image_pad|>" * 3 + "<|vision_end|>"
    assert prompt == f"<|im_start|>user\n{block1}{block2}\nmake it blue<|im_end|>\n<|im_start|>assistant\n"


def test_fusion_layers_match_the_original_for_36_layers():
    assert select_fusion_layers(36) == [35, 29, 23, 17, 11, 5]
    assert select_fusion_layers(12) == [11, 9, 7, 5, 3, 1]
    assert select_fusion_layers(6) == [5, 4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="only 4 layers"):
        select_fusion_layers(4)


def test_patchify_matches_the_qwen_image_processor():
    spec = VisionSpec()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(56, 84, 3), dtype=np.uint8)
    processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
        do_resize=False,
    )
    ref = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
    ours, grid = patchify_for_vit(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255, spec)
    assert grid.tolist() == ref["image_grid_thw"][0].tolist() == [1, 4, 6]
    torch.testing.assert_close(ours, ref["pixel_values"].float(), atol=1e-5, rtol=1e-5)


def test_reference_resize_gives_one_token_per_32_pixel_block():
    rows, grid = reference_to_vit_input(torch.zeros(3, 64, 96), VisionSpec())
    assert grid.tolist() == [1, 4, 6] and rows.shape == (24, 3 * 2 * 14 * 14)
    assert grid.prod() // 4 == (64 // 32) * (96 // 32)
    with pytest.raises(ValueError, match="multiples of 32"):
        reference_to_vit_input(torch.zeros(3, 60, 64), VisionSpec())


def test_mrope_positions_match_transformers_get_rope_index():
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=16,
            vocab_size=64,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(depth=1, hidden_size=16, num_heads=1, intermediate_size=16, out_hidden_size=16),
        image_token_id=60,
        video_token_id=61,
        vision_start_token_id=62,
        vision_end_token_id=63,
    )
    model = Qwen2_5_VLModel(config)
    img, vs, ve, pad = 60, 62, 63, 0
    # sample 0: two images (grids 4x6 -> 6 tokens, 2x2 -> 1 token), left padded; sample 1: text only
    row0 = [pad, pad, 5, 6, vs] + [img] * 6 + [ve, vs, img, ve, 7, 8, 9]
    row1 = list(range(3, 21))
    ids = torch.tensor([row0, row1])
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([[2], [0]])).long()
    grids = torch.tensor([[1, 4, 6], [1, 2, 2]])
    expected, _ = model.get_rope_index(
        ids, mm_token_type_ids=(ids == img).int(), image_grid_thw=grids, attention_mask=mask
    )
    ours = mrope_position_ids(ids, mask, grids, image_token_id=img, merge_size=2)
    assert torch.equal(ours, expected)
