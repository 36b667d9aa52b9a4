"""The tiny zoo builds once, caches, and every part loads with the standard HF / diffusers classes."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from deepgen.model import tiny_zoo
from deepgen.model.tiny_zoo import SPECIAL_TOKENS, build_tiny_zoo

FAST_STEPS = 3


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo") / "tiny"
    return build_tiny_zoo(root, vae_fit_steps=FAST_STEPS, vlm_pretrain_steps=FAST_STEPS, log=lambda _: None)


def test_layout(zoo):
    root = zoo.vlm_dir.parent
    assert (root / "manifest.json").is_file()
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "preprocessor_config.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ):
        assert (zoo.vlm_dir / name).is_file(), name
    for name in (
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ):
        assert (zoo.dit_dir / name).is_file(), name
    index = json.loads((zoo.dit_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder"] == [None, None]
    assert zoo.manifest["vae"]["fit_steps"] == FAST_STEPS
    # Quick test builds shorten the LM pretraining of the VLM as well.
    assert zoo.manifest["vlm"]["pretrain_steps"] == FAST_STEPS
    assert not list(root.parent.glob(".tiny.*")), "temporary build directories were left behind"


def test_tokenizer_special_tokens_match_model_config(zoo):
    tok = AutoTokenizer.from_pretrained(zoo.vlm_dir)
    config = Qwen2_5_VLConfig.from_pretrained(zoo.vlm_dir)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))
    assert ids[-1] == len(tok) - 1
    for t, i in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tok(t)["input_ids"] == [i]
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == ids[0]
    assert tok.eos_token == "<|im_end|>"
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert config.text_config.vocab_size >= len(tok) and config.text_config.vocab_size % 64 == 0


def test_tokenizer_words_roundtrip_and_padding(zoo):
    tok = AutoTokenizer.from_pretrained(zoo.vlm_dir)
    for word in (
        " circle",
        " square",
        " triangle",
        " red",
        " purple",
        " orange",
        " above",
        " below",
    ):
        assert len(tok(word)["input_ids"]) == 1, word
    for text in (
        "Generate an image: a small red circle",
        "ünïcødé ✓ 🙂 中文\r\n\t  x",
        "<|im_start|>user\nhi",
    ):
        assert tok.decode(tok(text)["input_ids"]) == text
    batch = tok(
        ["a", "Generate an image: a large blue square"],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    assert batch["input_ids"].shape[0] == 2
    assert batch["input_ids"][0, 0].item() == tok.pad_token_id
    assert batch["attention_mask"][0, 0].item() == 0 and batch["attention_mask"][0, -1].item() == 1


def test_chat_template(zoo):
    tok = AutoTokenizer.from_pretrained(zoo.vlm_dir)
    template = (zoo.vlm_dir / "chat_template.jinja").read_text()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    text = tok.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    two = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "image"}]},
    ]
    text = tok.apply_chat_template(two, chat_template=template, tokenize=False, add_vision_id=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|>"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
    )


def test_image_processor_settings(zoo):
    proc = Qwen2VLImageProcessorPil.from_pretrained(zoo.vlm_dir)
    assert (proc.patch_size, proc.merge_size, proc.temporal_patch_size) == (14, 2, 2)
    cfg = json.loads((zoo.vlm_dir / "preprocessor_config.json").read_text())
    assert cfg["image_processor_type"] == "Qwen2VLImageProcessor"
    assert cfg["processor_class"] == "Qwen2_5_VLProcessor"


def test_vlm_forward_hidden_states(zoo):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(zoo.vlm_dir).eval()
    assert model.config.vision_config.patch_size == 14
    assert model.config.vision_config.spatial_merge_size == 2
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]), output_hidden_states=True)
    assert len(out.hidden_states) == 13
    assert out.hidden_states[-1].shape == (1, 5, 64)


def test_diffusion_parts_load(zoo):
    transformer = SD3Transformer2DModel.from_pretrained(zoo.dit_dir, subfolder="transformer")
    vae = AutoencoderKL.from_pretrained(zoo.dit_dir, subfolder="vae").eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(zoo.dit_dir, subfolder="scheduler")
    assert scheduler.config.shift == 3.0 and scheduler.config.num_train_timesteps == 1000
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    assert vae.config.latent_channels == transformer.config.in_channels == 16
    assert vae.config.scaling_factor == pytest.approx(zoo.manifest["vae"]["scaling_factor"])
    assert vae.config.shift_factor == pytest.approx(zoo.manifest["vae"]["shift_factor"])
    with torch.no_grad():
        image = torch.rand(1, 3, 32, 128) * 2 - 1
        z = (vae.encode(image).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        assert z.shape == (1, 16, 4, 16)
        assert vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample.shape == image.shape
        out = transformer(
            hidden_states=z,
            encoder_hidden_states=torch.randn(1, 7, 64),
            pooled_projections=torch.randn(1, 64),
            timestep=torch.tensor([500.0]),
        ).sample
    assert out.shape == z.shape


def test_cached_second_call_does_not_rebuild(zoo):
    messages: list[str] = []
    again = tiny_zoo.build_tiny_zoo(
        zoo.vlm_dir.parent, vae_fit_steps=FAST_STEPS, vlm_pretrain_steps=FAST_STEPS, log=messages.append
    )
    assert messages == []
    assert again == zoo


def test_force_and_changed_settings_rebuild(tmp_path):
    root = tmp_path / "tiny"
    first = build_tiny_zoo(root, vae_fit_steps=1, vlm_pretrain_steps=1, log=lambda _: None)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    weights = (root / "qwen2_5_vl/model.safetensors").read_bytes()

    messages: list[str] = []
    forced = build_tiny_zoo(root, vae_fit_steps=1, vlm_pretrain_steps=1, force=True, log=messages.append)
    assert any("Building tiny model zoo" in m for m in messages)
    assert (root / "manifest.json").stat().st_mtime_ns != stamp
    # Deterministic: the same settings give the same weights.
    assert forced.manifest["vae"]["shift_factor"] == first.manifest["vae"]["shift_factor"]
    assert (root / "qwen2_5_vl/model.safetensors").read_bytes() == weights

    changed = build_tiny_zoo(root, vae_fit_steps=2, vlm_pretrain_steps=1, log=lambda _: None)
    assert changed.manifest["settings_hash"] != first.manifest["settings_hash"]
    assert changed.manifest["vae"]["fit_steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_interrupted_build_never_looks_complete(tmp_path, monkeypatch):
    root = tmp_path / "tiny"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_zoo, "build_vae", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_zoo(root, vae_fit_steps=1, vlm_pretrain_steps=1, log=lambda _: None)
    assert not (root / "manifest.json").exists()
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_zoo(tmp_path, vae_fit_steps=1, vlm_pretrain_steps=1, log=lambda _: None)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_short_fit_lowers_reconstruction_error():
    images = tiny_zoo.tiny_world_images(16, seed=0)
    heldout = images[:8]
    vae = tiny_zoo.new_vae()
    before = tiny_zoo.evaluate_vae(vae, heldout)["heldout_mse"]
    losses = tiny_zoo.fit_vae(vae, images, 60)
    after = tiny_zoo.evaluate_vae(vae, heldout)["heldout_mse"]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5
    assert after < 0.5 * before


def test_vlm_pretrain_steps_are_part_of_the_settings(zoo):
    assert zoo.manifest["settings"]["vlm_pretrain_steps"] == FAST_STEPS
    hashes = {tiny_zoo.settings_hash(tiny_zoo.builder_settings(1, n)) for n in (0, 1, 2)}
    assert len(hashes) == 3
    default = tiny_zoo.builder_settings(tiny_zoo.DEFAULT_VAE_FIT_STEPS)
    assert default["vlm_pretrain_steps"] == tiny_zoo.DEFAULT_VLM_PRETRAIN_STEPS


def test_vlm_pretrain_chats():
    from deepgen.data.tiny_world import holdout_split

    chats = tiny_zoo.vlm_pretrain_chats(60)
    assert chats == tiny_zoo.vlm_pretrain_chats(60)
    for chat in chats:
        assert chat.startswith("<|im_start|>user\nGenerate an image: ")
        assert "<|im_end|>\n<|im_start|>assistant\nThe image shows " in chat
        assert chat.endswith(".<|im_end|>\n")
    answers = [c.split("The image shows ")[1][: -len(".<|im_end|>\n")] for c in chats]
    assert len(set(answers)) > 20
    # Held-out prompts are never part of the corpus (for general and sign prompts the answer is the key).
    for chat, answer in zip(chats, answers, strict=True):
        if "colour of" not in chat and "shaped like" not in chat:
            assert holdout_split(answer) == "train"


def test_short_pretraining_lowers_lm_loss(zoo):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(zoo.vlm_dir)
    tok = AutoTokenizer.from_pretrained(zoo.vlm_dir)
    visual = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
    losses = tiny_zoo.pretrain_vlm(model, tok, 30)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert not model.training
    # The vision tower is not part of the LM pretraining.
    assert all(torch.equal(v, model.model.visual.state_dict()[k]) for k, v in visual.items())
    assert tiny_zoo.pretrain_vlm(model, tok, 0) == []
