import logging
from collections.abc import Iterator

import pytest
import torch
from diffusers import SD3Transformer2DModel
from torch import Tensor

import deepgen.model.dit as dit_module
from deepgen.model.dit import DeepGenSD3Transformer, MaskedImageSelfAttnProcessor, MaskedJointAttnProcessor

CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=32,
    caption_projection_dim=32,
    pooled_projection_dim=32,
    pos_embed_max_size=32,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)
TEXT_LEN = 6


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Stock init zeroes the AdaLN gates and output projection, which would hide most of the computation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


@pytest.fixture
def diffusers_warnings() -> Iterator[list[str]]:
    """Collect diffusers log warnings (its logger does not propagate, so caplog misses them)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def model() -> DeepGenSD3Transformer:
    torch.manual_seed(0)
    m = DeepGenSD3Transformer(**CONFIG).eval()
    _randomize(m)
    return m


def _inputs(batch: int, size: int = 8, seed: int = 1) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 16, size, size, generator=gen),
        encoder_hidden_states=torch.randn(batch, TEXT_LEN, 32, generator=gen),
        pooled_projections=torch.randn(batch, 32, generator=gen),
        timestep=torch.rand(batch, generator=gen) * 1000,
    )


def _refs(seed: int = 2) -> list[list[Tensor]]:
    """Three samples with 0, 1 and 2 references of different sizes."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [],
        [torch.randn(16, 4, 6, generator=gen)],
        [torch.randn(16, 8, 8, generator=gen), torch.randn(16, 2, 4, generator=gen)],
    ]


def _pad_text(inputs: dict[str, Tensor], valid: list[int], garbage: float) -> tuple[Tensor, Tensor]:
    """Left-pad the text of each sample: the first ``TEXT_LEN - valid[b]`` tokens become ``garbage``."""
    seq = inputs["encoder_hidden_states"].clone()
    mask = torch.ones(seq.shape[:2], dtype=torch.bool)
    for b, n in enumerate(valid):
        seq[b, : TEXT_LEN - n] = garbage
        mask[b, : TEXT_LEN - n] = False
    return seq, mask


def _per_sample(model: DeepGenSD3Transformer, inputs: dict[str, Tensor], refs, valid: list[int]) -> Tensor:
    outs = []
    for b, n in enumerate(valid):
        out = model(
            hidden_states=inputs["hidden_states"][b : b + 1],
            encoder_hidden_states=inputs["encoder_hidden_states"][b : b + 1, TEXT_LEN - n :],
            pooled_projections=inputs["pooled_projections"][b : b + 1],
            timestep=inputs["timestep"][b : b + 1],
            ref_latents=[refs[b]],
            return_dict=False,
        )[0]
        outs.append(out)
    return torch.cat(outs)


def test_processors_installed(model: DeepGenSD3Transformer) -> None:
    assert isinstance(model.transformer_blocks[0].attn.processor, MaskedJointAttnProcessor)
    assert isinstance(model.transformer_blocks[0].attn2.processor, MaskedImageSelfAttnProcessor)
    assert model.transformer_blocks[1].attn2 is None


@torch.no_grad()
def test_matches_stock_without_refs_or_mask(model: DeepGenSD3Transformer) -> None:
    stock = SD3Transformer2DModel(**CONFIG).eval()
    stock.load_state_dict(model.state_dict())
    inputs = _inputs(2)
    expected = stock(**inputs, return_dict=False)[0]
    assert torch.equal(model(**inputs).sample, expected)
    # Empty reference lists and an all-valid text mask take the same unmasked path.
    out = model(
        **inputs, ref_latents=[[], []], encoder_attention_mask=torch.ones(2, TEXT_LEN, dtype=torch.bool)
    )
    assert torch.equal(out.sample, expected)


@torch.no_grad()
def test_padded_batch_equals_per_sample(model: DeepGenSD3Transformer, diffusers_warnings: list[str]) -> None:
    inputs, refs, valid = _inputs(3), _refs(), [6, 3, 1]
    expected = _per_sample(model, inputs, refs, valid)
    seq, mask = _pad_text(inputs, valid, garbage=0.0)
    out = model(
        **{**inputs, "encoder_hidden_states": seq},
        encoder_attention_mask=mask,
        ref_latents=refs,
        return_dict=False,
    )[0]
    assert out.shape == (3, 16, 8, 8)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not diffusers_warnings


@torch.no_grad()
def test_masks_matter(model: DeepGenSD3Transformer, monkeypatch) -> None:
    inputs, refs, valid = _inputs(3), _refs(), [6, 3, 1]
    expected = _per_sample(model, inputs, refs, valid)
    seq, mask = _pad_text(inputs, valid, garbage=5.0)
    batched = {**inputs, "encoder_hidden_states": seq, "ref_latents": refs, "return_dict": False}

    # Garbage text without the text mask leaks into the padded samples.
    out = model(**batched)[0]
    assert not torch.allclose(out[1:], expected[1:], atol=1e-3)
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=1e-5)

    # Dropping only the image padding mask also changes the samples that were padded (0 and 1).
    real_pack = dit_module.pack_image_tokens
    monkeypatch.setattr(dit_module, "pack_image_tokens", lambda t, r: (real_pack(t, r)[0], None))
    out = model(**batched, encoder_attention_mask=mask)[0]
    assert not torch.allclose(out[:2], expected[:2], atol=1e-3)
    torch.testing.assert_close(out[2], expected[2], atol=1e-5, rtol=1e-5)


def test_refs_change_output_and_get_gradients(model: DeepGenSD3Transformer) -> None:
    inputs = _inputs(1)
    ref = torch.randn(16, 4, 4, requires_grad=True)
    with torch.no_grad():
        plain = model(**inputs).sample
    out = model(**inputs, ref_latents=[[ref]]).sample
    assert not torch.allclose(out, plain, atol=1e-3)
    out.square().mean().backward()
    assert ref.grad is not None and ref.grad.abs().sum() > 0
    no_grad = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()}
    model.zero_grad(set_to_none=True)
    # As in stock SD3, the last block's text-stream output is discarded, so its text queries get no gradient.
    last = "transformer_blocks.1.attn"
    assert no_grad == {f"{last}.add_q_proj.weight", f"{last}.add_q_proj.bias", f"{last}.norm_added_q.weight"}


@torch.no_grad()
def test_save_load_round_trip_with_stock(model: DeepGenSD3Transformer, tmp_path) -> None:
    inputs = _inputs(2)
    model.save_pretrained(tmp_path / "ours")
    stock, info = SD3Transformer2DModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(stock.eval()(**inputs).sample, model(**inputs).sample, atol=1e-6, rtol=0)

    stock.save_pretrained(tmp_path / "stock")
    ours, info = DeepGenSD3Transformer.from_pretrained(tmp_path / "stock", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert isinstance(ours.transformer_blocks[0].attn.processor, MaskedJointAttnProcessor)
    torch.testing.assert_close(ours.eval()(**inputs).sample, model(**inputs).sample, atol=0, rtol=0)

    with torch.device("meta"):
        meta = DeepGenSD3Transformer.from_config(DeepGenSD3Transformer.load_config(tmp_path / "stock"))
    assert meta.device.type == "meta"
    assert meta.transformer_blocks[0].attn2 is not None


def test_gradient_checkpointing_matches(model: DeepGenSD3Transformer) -> None:
    inputs, refs, valid = _inputs(3), _refs(), [6, 3, 1]
    seq, mask = _pad_text(inputs, valid, garbage=5.0)
    kwargs = {**inputs, "encoder_hidden_states": seq, "encoder_attention_mask": mask, "ref_latents": refs}

    def run() -> tuple[Tensor, dict[str, Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = model(**kwargs).sample.square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    plain_loss, plain_grads = run()
    model.enable_gradient_checkpointing()
    try:
        ckpt_loss, ckpt_grads = run()
    finally:
        model.disable_gradient_checkpointing()
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(ckpt_loss, plain_loss, atol=1e-6, rtol=0)
    assert ckpt_grads.keys() == plain_grads.keys() and len(plain_grads) > 50
    torch.testing.assert_close(ckpt_grads, plain_grads, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(16, 5, 4), (8, 4, 4), (16, 4)])
def test_bad_ref_shape_raises(model: DeepGenSD3Transformer, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"ref_latents\[0\]\[1\] has shape"):
        model(**_inputs(1), ref_latents=[[torch.randn(16, 4, 4), torch.randn(*shape)]])


def test_ref_list_length_must_match_batch(model: DeepGenSD3Transformer) -> None:
    with pytest.raises(ValueError, match="2 samples"):
        model(**_inputs(2), ref_latents=[[]])


def test_bad_target_or_text_mask_shape_raises(model: DeepGenSD3Transformer) -> None:
    with pytest.raises(ValueError, match=r"hidden_states has shape \(1, 16, 7, 8\)"):
        model(**{**_inputs(1), "hidden_states": torch.randn(1, 16, 7, 8)})
    with pytest.raises(ValueError, match=r"encoder_attention_mask has shape \(1, 5\); expected \(1, 6\)"):
        model(**_inputs(1), encoder_attention_mask=torch.ones(1, TEXT_LEN - 1, dtype=torch.bool))
