import shutil

import pytest
import torch

from deepgen.config import LoraConfig
from deepgen.model.backbone import DeepGenBackbone
from deepgen.model.loading import ModelLayoutError, load_tokenizer, load_vlm
from deepgen.model.lora import attach_vlm_lora


@pytest.fixture
def backbone(tiny_model_cfg):
    return DeepGenBackbone.from_pretrained_dirs(tiny_model_cfg)


def images(n, h=64, w=64, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_t2i_batch_is_left_padded_with_think_tokens_last(backbone):
    batch = backbone.prompter.t2i(["a red circle", "a large blue square to the left of a green triangle"])
    # the shorter prompt is padded on the left
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[1].all()
    assert batch.think_mask[:, -4:].all() and batch.think_mask.sum() == 8
    text = backbone.tokenizer.decode(
        batch.input_ids[1][batch.attention_mask[1].bool() & ~batch.think_mask[1]]
    )
    caption = "a large blue square to the left of a green triangle"
    assert text == f"<|im_start|>user\nGenerate an image: {caption}<|im_end|>\n<|im_start|>assistant\n"
    assert batch.position_ids.shape == (3, 2, batch.input_ids.shape[1])


def test_edit_batch_has_one_token_per_32px_block(backbone):
    batch = backbone.prompter.edit(
        ["make it blue", "remove it"], [[images(1)[0]], [images(1)[0], images(1, 32, 96)[0]]]
    )
    per_sample = (batch.input_ids == backbone.image_token_id).sum(dim=1).tolist()
    assert per_sample == [4, 4 + 3]
    assert batch.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 4], [1, 2, 6]]


def test_conditioning_shapes_and_padding_invariance(backbone):
    dit = backbone.dit.config
    alone = backbone.condition_t2i(["a red circle"])
    both = backbone.condition_t2i(["a red circle", "a large blue square to the left of a green triangle"])
    assert both.seq.shape[-1] == dit.joint_attention_dim
    assert both.pooled.shape == (2, dit.pooled_projection_dim)
    torch.nn.init.normal_(backbone.bridge.seq_head.weight)  # zero-initialised heads would make this trivial
    torch.nn.init.normal_(backbone.bridge.pooled_head.weight)
    alone = backbone.condition_t2i(["a red circle"])
    both = backbone.condition_t2i(["a red circle", "a large blue square to the left of a green triangle"])
    n = alone.seq.shape[1]
    # float32 rounding only (N(0, 1) heads amplify it); attention to padding would differ by O(1)
    torch.testing.assert_close(both.seq[0, -n:], alone.seq[0], atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(both.pooled[0], alone.pooled[0], atol=2e-4, rtol=1e-3)
    assert not both.mask[0, 0] and both.mask[0, -n:].all()


def test_think_tokens_and_bridge_receive_gradients(backbone):
    torch.nn.init.normal_(backbone.bridge.seq_head.weight)
    loss = backbone.flow_loss(backbone.condition_t2i(["a red circle", "a blue square"]), images(2))
    loss.backward()
    assert backbone.think_tokens.grad.abs().sum() > 0
    assert backbone.bridge.fuse.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.vae.parameters())


def test_flow_loss_falls_on_a_fixed_batch(backbone):
    torch.manual_seed(0)
    backbone.requires_grad_(False)
    params = [backbone.think_tokens, *backbone.bridge.parameters(), *backbone.dit.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=2e-3)
    batch = images(4)
    captions = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    losses = []
    for step in range(30):
        gen = torch.Generator().manual_seed(step % 3)  # a few fixed noise draws
        loss = backbone.flow_loss(backbone.condition_t2i(captions), batch, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_edit_loss_and_sampling_with_references(backbone):
    refs = [[images(1)[0]], [images(1, seed=1)[0], images(1, 32, 64, seed=2)[0]]]
    ref_latents = backbone.encode_references(refs)
    assert [tuple(r.shape) for r in ref_latents[1]] == [(16, 8, 8), (16, 4, 8)]
    cond = backbone.condition_edit(["make the red circle blue", "remove the square"], refs)
    assert torch.isfinite(backbone.flow_loss(cond, images(2), ref_latents))
    uncond = backbone.condition_edit(["", ""], refs)
    out = backbone.sample(
        cond, uncond, 64, 64, ref_latents=ref_latents, num_steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (2, 3, 64, 64) and out.min() >= -1 and out.max() <= 1


def test_vae_round_trip_shapes(backbone):
    latents = backbone.encode_images(images(2, 64, 128))
    assert latents.shape == (2, 16, 8, 16)
    assert backbone.decode_latents(latents).shape == (2, 3, 64, 128)


def test_lora_goes_only_into_the_language_model(backbone):
    adapted = attach_vlm_lora(backbone.vlm, LoraConfig(rank=8, alpha=16))
    names = [n for n, _ in backbone.vlm.named_parameters() if "lora_" in n]
    assert adapted == 12 * 7 and names and all("language_model" in n for n in names)
    assert backbone.parameter_counts()["vlm_lora"] > 0


def test_missing_directories_and_files_name_the_layout(tmp_path, tiny_model_cfg):
    with pytest.raises(ModelLayoutError, match="does not exist: expected the Hugging Face Qwen2.5-VL layout"):
        load_vlm(tmp_path / "nope")
    dit = tmp_path / "sd3"
    shutil.copytree(tiny_model_cfg.dit_path, dit)
    shutil.rmtree(dit / "vae")
    cfg = tiny_model_cfg
    cfg.dit_path = str(dit)
    with pytest.raises(ModelLayoutError, match=r"has no vae/config.json: expected the diffusers SD3 layout"):
        DeepGenBackbone.from_pretrained_dirs(cfg)


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json", "chat_template.json"])
def test_chat_template_loads_from_any_hub_location(tmp_path, tiny_model_cfg, where):
    import json

    vlm = tmp_path / "vlm"
    shutil.copytree(tiny_model_cfg.vlm_path, vlm)
    template = (vlm / "chat_template.jinja").read_text()
    (vlm / "chat_template.jinja").unlink()
    if where == "chat_template.jinja":
        (vlm / where).write_text(template)
    elif where == "chat_template.json":
        (vlm / where).write_text(json.dumps({"chat_template": template}))
    else:
        cfg = json.loads((vlm / where).read_text())
        cfg["chat_template"] = template
        (vlm / where).write_text(json.dumps(cfg))
    tokenizer = load_tokenizer(vlm)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
