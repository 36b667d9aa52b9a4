"""SD3.5 MMDiT whose image stream also carries clean reference latents (DeepGen-style editing).

Each reference latent is patch-embedded by the *same* ``pos_embed`` as the target (centre-cropped 2-D
sin-cos table, no extra offset) and appended after the target tokens. Samples with different reference
counts/sizes are right-padded to a common length; padded image keys and left-padded text keys are masked
out of every attention. Only the target tokens are decoded. Parameter names are stock, so checkpoints are
interchangeable with ``diffusers.SD3Transformer2DModel``.
"""

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import apply_lora_scale
from torch import Tensor

__all__ = [
    "DeepGenSD3Transformer",
    "MaskedImageSelfAttnProcessor",
    "MaskedJointAttnProcessor",
    "key_padding_mask",
    "pack_image_tokens",
]


def key_padding_mask(
    *masks: Tensor | None, lengths: tuple[int, ...], batch: int, device: torch.device
) -> Tensor | None:
    """Concatenate per-segment key masks ``[B, L_i]`` (None = all valid) into an SDPA mask ``[B, 1, 1, S]``.

    Returns None when every segment is unmasked so that SDPA runs exactly as in stock diffusers.
    """
    if all(m is None for m in masks):
        return None
    parts = [
        torch.ones(batch, n, dtype=torch.bool, device=device) if m is None else m.bool()
        for m, n in zip(masks, lengths, strict=True)
    ]
    return torch.cat(parts, dim=1)[:, None, None, :]


def _heads(x: Tensor, heads: int) -> Tensor:
    """``[B, N, heads * d]`` -> ``[B, heads, N, d]``."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


class MaskedJointAttnProcessor:
    """Stock SD3 joint attention (keys ordered ``[image, text]``) plus an optional key-padding mask.

    ``image_mask`` ``[B, N]`` / ``text_mask`` ``[B, L]``: True = real token. Only keys are masked, so padded
    queries still see real keys and never produce NaN rows; their outputs are simply unused.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_mask: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("MaskedJointAttnProcessor needs encoder_hidden_states (text stream).")
        batch, n_image = hidden_states.shape[:2]
        query = _heads(attn.to_q(hidden_states), attn.heads)
        key = _heads(attn.to_k(hidden_states), attn.heads)
        value = _heads(attn.to_v(hidden_states), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        text_query = _heads(attn.add_q_proj(encoder_hidden_states), attn.heads)
        text_key = _heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
        text_value = _heads(attn.add_v_proj(encoder_hidden_states), attn.heads)
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)

        query = torch.cat([query, text_query], dim=2)
        key = torch.cat([key, text_key], dim=2)
        value = torch.cat([value, text_value], dim=2)
        mask = key_padding_mask(
            image_mask,
            text_mask,
            lengths=(n_image, encoder_hidden_states.shape[1]),
            batch=batch,
            device=query.device,
        )
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False
        )
        out = out.transpose(1, 2).flatten(2).to(query.dtype)

        image_out, text_out = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        return image_out, text_out


class MaskedImageSelfAttnProcessor:
    """Image-only self-attention (``attn2`` of SD3.5 dual-attention blocks) with an image key-padding mask.

    Accepts (and ignores) ``text_mask`` because JointTransformerBlock passes the same kwargs to both attentions.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_mask: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        batch, n_image = hidden_states.shape[:2]
        query = _heads(attn.to_q(hidden_states), attn.heads)
        key = _heads(attn.to_k(hidden_states), attn.heads)
        value = _heads(attn.to_v(hidden_states), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        mask = key_padding_mask(image_mask, lengths=(n_image,), batch=batch, device=query.device)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False
        )
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def pack_image_tokens(target: Tensor, refs: list[list[Tensor]]) -> tuple[Tensor, Tensor | None]:
    """Append each sample's reference tokens after its target tokens and right-pad to the batch maximum.

    target: ``[B, N, D]``; refs: per sample, a list of ``[n_i, D]``. Returns tokens ``[B, S, D]`` and a
    key mask ``[B, S]`` (True = real token), or None when no sample needed padding.
    """
    rows = [torch.cat([target[b], *refs[b]], dim=0) for b in range(target.shape[0])]
    lengths = [r.shape[0] for r in rows]
    longest = max(lengths)
    if all(n == longest for n in lengths):
        return torch.stack(rows), None
    tokens = torch.stack([F.pad(r, (0, 0, 0, longest - r.shape[0])) for r in rows])
    mask = (
        torch.arange(longest, device=target.device)[None, :]
        < torch.tensor(lengths, device=target.device)[:, None]
    )
    return tokens, mask


class DeepGenSD3Transformer(SD3Transformer2DModel):
    """``SD3Transformer2DModel`` with reference latents in the image stream and masked attention.

    Same constructor/config as the stock class (so ``from_pretrained``/``from_config`` work unchanged);
    masked processors are installed on every joint block.
    """

    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 96,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = None,
    ):
        # Not decorated with @register_to_config: the stock __init__ already registers these arguments. The
        # explicit signature is still required because ConfigMixin.from_config reads it to pick config keys.
        super().__init__(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            caption_projection_dim=caption_projection_dim,
            pooled_projection_dim=pooled_projection_dim,
            out_channels=out_channels,
            pos_embed_max_size=pos_embed_max_size,
            dual_attention_layers=dual_attention_layers,
            qk_norm=qk_norm,
        )
        self.install_masked_processors()

    def install_masked_processors(self) -> None:
        """(Re)install the mask-aware processors, e.g. after ``set_attn_processor`` or ``unfuse_qkv_projections``."""
        for block in self.transformer_blocks:
            assert isinstance(block, JointTransformerBlock)
            block.attn.set_processor(MaskedJointAttnProcessor())
            if block.attn2 is not None:
                block.attn2.set_processor(MaskedImageSelfAttnProcessor())

    def embed_references(
        self, ref_latents: list[list[Tensor]], batch: int, dtype: torch.dtype
    ) -> list[list[Tensor]]:
        """Patch-embed every reference ``[C, h, w]`` with the target's ``pos_embed`` -> ``[h*w/p^2, D]`` each.

        References are embedded one by one because sizes differ across (and within) samples.
        """
        if len(ref_latents) != batch:
            raise ValueError(f"ref_latents has {len(ref_latents)} entries but the batch has {batch} samples.")
        p, channels = self.config.patch_size, self.config.in_channels
        embedded = []
        for b, refs in enumerate(ref_latents):
            sample = []
            for i, ref in enumerate(refs):
                if ref.ndim != 3 or ref.shape[0] != channels or ref.shape[1] % p or ref.shape[2] % p:
                    raise ValueError(
                        f"ref_latents[{b}][{i}] has shape {tuple(ref.shape)}; expected [{channels}, h, w] with h "
                        f"and w multiples of patch_size={p}."
                    )
                sample.append(self.pos_embed(ref[None].to(dtype))[0])
            embedded.append(sample)
        return embedded

    @apply_lora_scale("joint_attention_kwargs")
    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        timestep: Tensor,
        *,
        encoder_attention_mask: Tensor | None = None,
        ref_latents: list[list[Tensor]] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        skip_layers: list[int] | None = None,
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        """Predict the target's velocity/noise.

        Args:
            hidden_states: noisy target latents ``[B, C, H, W]``.
            encoder_hidden_states: text sequence ``[B, L, joint_attention_dim]``.
            pooled_projections: ``[B, pooled_projection_dim]``.
            timestep: ``[B]`` on the 0-1000 scale.
            encoder_attention_mask: optional bool ``[B, L]``, True = real text token.
            ref_latents: optional per-sample lists of clean latents ``[C, h_i, w_i]`` (any count, any size).
            joint_attention_kwargs: passed to the attention processors (``scale`` sets the LoRA scale).
            skip_layers: indices of transformer blocks to skip.

        Returns:
            ``[B, C, H, W]`` as ``Transformer2DModelOutput`` or a 1-tuple.
        """
        batch = hidden_states.shape[0]
        height, width = hidden_states.shape[-2:]
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(
                f"hidden_states has shape {tuple(hidden_states.shape)}; H and W must be multiples of patch_size={p}."
            )
        text_shape = tuple(encoder_hidden_states.shape[:2])
        if encoder_attention_mask is not None and tuple(encoder_attention_mask.shape) != text_shape:
            raise ValueError(
                f"encoder_attention_mask has shape {tuple(encoder_attention_mask.shape)}; expected {text_shape} "
                "to match encoder_hidden_states."
            )

        target = self.pos_embed(hidden_states).contiguous()  # PatchEmbed output is a non-contiguous view
        n_target = target.shape[1]
        hidden_states, image_mask = target, None
        if ref_latents is not None:
            refs = self.embed_references(ref_latents, batch, target.dtype)
            if any(refs):
                hidden_states, image_mask = pack_image_tokens(target, refs)

        # An all-valid text mask is dropped so the unmasked SDPA path (identical to stock, flash-capable) is
        # used; the check costs one host sync per forward, so a compiled caller makes it once, outside.
        text_mask = None
        if encoder_attention_mask is not None and (
            torch.compiler.is_compiling() or not bool(encoder_attention_mask.all())
        ):
            text_mask = encoder_attention_mask.to(device=hidden_states.device, dtype=torch.bool)

        attn_kwargs = dict(joint_attention_kwargs or {})
        if image_mask is not None:
            attn_kwargs["image_mask"] = image_mask
        if text_mask is not None:
            attn_kwargs["text_mask"] = text_mask

        temb = self.time_text_embed(timestep, pooled_projections)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)

        for index, block in enumerate(self.transformer_blocks):
            if skip_layers is not None and index in skip_layers:
                continue
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                encoder_hidden_states, hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, temb, attn_kwargs
                )
            else:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    temb=temb,
                    joint_attention_kwargs=attn_kwargs,
                )

        hidden_states = hidden_states[:, :n_target]
        hidden_states = self.proj_out(self.norm_out(hidden_states, temb))
        output = self.unpatchify(hidden_states, height // p, width // p)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def unpatchify(self, tokens: Tensor, grid_h: int, grid_w: int) -> Tensor:
        """``[B, grid_h * grid_w, p * p * C]`` -> ``[B, C, grid_h * p, grid_w * p]`` (stock layout)."""
        p = self.config.patch_size
        x = tokens.reshape(tokens.shape[0], grid_h, grid_w, p, p, self.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(tokens.shape[0], self.out_channels, grid_h * p, grid_w * p)
