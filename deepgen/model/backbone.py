"""DeepGenBackbone: the one model wrapper all stages share.

VLM (prompt + reference images + think tokens) -> six stacked hidden-state layers -> SCB bridge ->
SD3 DiT (clean reference latents appended to the image tokens) -> VAE. Which parts train is decided
by the stage, not here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import Tensor, nn

from deepgen.config import ModelConfig
from deepgen.diffusion.loss import add_noise, flow_matching_loss
from deepgen.diffusion.sampling import euler_sample, guided_velocity
from deepgen.diffusion.schedule import (
    inference_sigmas,
    sample_train_sigmas,
    sigma_to_timestep,
    train_sigma_table,
)
from deepgen.model.bridge import SCBBridge
from deepgen.model.loading import DiffusionParts, VLMParts, load_diffusion, load_vlm
from deepgen.model.vlm import VLMBatch, VLMPrompter, select_fusion_layers


@dataclass
class Conditioning:
    """What the DiT receives from the VLM side."""

    seq: Tensor  # [B, L, joint_attention_dim]
    pooled: Tensor  # [B, pooled_projection_dim]
    mask: Tensor | None  # [B, L] bool (True = real token), None when padding is not masked

    def cat(self, other: Conditioning) -> Conditioning:
        """Stack two conditionings on the batch axis (CFG: conditional then unconditional)."""
        length = max(self.seq.shape[1], other.seq.shape[1])
        seqs, masks = [], []
        for c in (self, other):
            pad = length - c.seq.shape[1]
            # Left-pad, like the VLM side, so the think tokens stay at the end.
            seqs.append(nn.functional.pad(c.seq, (0, 0, pad, 0)))
            if c.mask is not None:
                masks.append(nn.functional.pad(c.mask, (pad, 0), value=False))
        mask = torch.cat(masks) if masks else None
        if mask is None and any(s.shape[1] != length for s in (self.seq, other.seq)):
            raise ValueError("Cannot batch conditionings of different lengths without a padding mask")
        return Conditioning(torch.cat(seqs), torch.cat([self.pooled, other.pooled]), mask)

    def padded(self, multiple: int) -> Conditioning:
        """Left-padded with masked tokens to a multiple of ``multiple`` tokens (unchanged without a mask:
        unmasked padding would change the result)."""
        length = self.seq.shape[1]
        pad = math.ceil(length / multiple) * multiple - length
        if self.mask is None or pad == 0:
            return self
        seq = nn.functional.pad(self.seq, (0, 0, pad, 0))
        return Conditioning(seq, self.pooled, nn.functional.pad(self.mask, (pad, 0), value=False))


class DeepGenBackbone(nn.Module):
    def __init__(self, vlm: VLMParts, diffusion: DiffusionParts, cfg: ModelConfig) -> None:
        super().__init__()
        text_cfg = vlm.model.config.get_text_config()
        dit_cfg = diffusion.transformer.config
        self.cfg = cfg
        self.vlm = vlm.model
        self.dit = diffusion.transformer
        self.vae = diffusion.vae
        self.scheduler = diffusion.scheduler
        self.tokenizer = vlm.tokenizer
        self.vision = vlm.vision
        self.image_token_id = vlm.image_token_id
        self.fusion_layers = select_fusion_layers(text_cfg.num_hidden_layers, cfg.bridge.num_fusion_layers)
        hidden = text_cfg.hidden_size
        self.think_tokens = nn.Parameter(torch.randn(cfg.num_think_tokens, hidden) * hidden**-0.5)
        self.bridge = SCBBridge(
            vlm_hidden=hidden,
            num_fusion_layers=cfg.bridge.num_fusion_layers,
            num_layers=cfg.bridge.num_layers,
            num_heads=cfg.bridge.num_heads,
            intermediate_size=cfg.bridge.intermediate_size,
            joint_attention_dim=dit_cfg.joint_attention_dim,
            pooled_projection_dim=dit_cfg.pooled_projection_dim,
            mask_padding=cfg.bridge.mask_padding,
        )
        self.vae.requires_grad_(False)
        self.register_buffer("train_sigmas", train_sigma_table(self.scheduler), persistent=False)
        self._compiled_velocity: Callable[..., Tensor] | None = None  # set by compile_sampling
        self._pad_multiple = 1

    @classmethod
    def from_pretrained_dirs(
        cls, cfg: ModelConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> DeepGenBackbone:
        """Load from ``cfg.vlm_path`` and ``cfg.dit_path``; ``device="meta"`` builds the architecture only."""
        vlm = load_vlm(cfg.vlm_path, device=device, dtype=dtype)
        diffusion = load_diffusion(cfg.dit_path, device=device, dtype=dtype)
        if str(device) == "meta":
            with torch.device("meta"):
                return cls(vlm, diffusion, cfg)
        return cls(vlm, diffusion, cfg).to(device)

    # ----------------------------------------------------------------------------------- sizes
    @property
    def device(self) -> torch.device:
        return self.think_tokens.device

    @property
    def prompter(self) -> VLMPrompter:
        return VLMPrompter(
            self.tokenizer,
            self.vision,
            self.image_token_id,
            self.cfg.num_think_tokens,
            self.cfg.max_prompt_tokens,
        )

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part (LoRA adapters, when attached, are counted apart from the VLM)."""

        def count(module: nn.Module, lora: bool | None = None) -> int:
            return sum(
                p.numel() for n, p in module.named_parameters() if lora is None or (("lora_" in n) == lora)
            )

        return {
            "vlm": count(self.vlm, lora=False),
            "vlm_vision": count(self.vlm.model.visual, lora=False),
            "vlm_lora": count(self.vlm, lora=True),
            "dit": count(self.dit),
            "vae": count(self.vae),
            "bridge": count(self.bridge) + self.think_tokens.numel(),
        }

    # ---------------------------------------------------------------------------- conditioning
    def encode_prompts(self, batch: VLMBatch) -> Conditioning:
        """Run the VLM with think tokens and bridge six of its hidden-state layers to the DiT."""
        dev = self.device
        ids = batch.input_ids.to(dev)
        mask = batch.attention_mask.to(dev)
        lm = self.vlm.model.language_model
        embeds = lm.get_input_embeddings()(ids)
        if batch.pixel_values is not None:
            # The vision tower is always frozen (the original never trains it, LoRA included).
            with torch.no_grad():
                vis = self.vlm.model.visual(
                    batch.pixel_values.to(dev, self.vlm.dtype), grid_thw=batch.image_grid_thw.to(dev)
                )
            features = getattr(vis, "pooler_output", vis).to(embeds.dtype)
            embeds = embeds.masked_scatter((ids == self.image_token_id).unsqueeze(-1), features)
        k = self.cfg.num_think_tokens
        if k:
            think = self.think_tokens.to(embeds.dtype).expand(ids.shape[0], -1, -1)
            embeds = torch.cat([embeds[:, : ids.shape[1] - k], think], dim=1)
        out = lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=batch.position_ids.to(dev),
            output_hidden_states=True,
            use_cache=False,
        )
        stacked = torch.cat([out.hidden_states[i] for i in self.fusion_layers], dim=-1)
        seq, pooled = self.bridge(stacked, mask)
        return Conditioning(seq, pooled, mask.bool() if self.cfg.bridge.mask_padding else None)

    def condition_t2i(self, captions: list[str]) -> Conditioning:
        return self.encode_prompts(self.prompter.t2i(captions))

    def condition_edit(self, instructions: list[str], references: list[list[Tensor]]) -> Conditioning:
        """Args: references: per sample, reference images ``[3, H, W]`` in [-1, 1]."""
        return self.encode_prompts(self.prompter.edit(instructions, references))

    # -------------------------------------------------------------------------------- latents
    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] -> normalised latents ``(z - shift) * scale``."""
        z = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist.sample(generator)
        return (z - self._vae_shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def sample_latents(self, moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``encode_images`` from a cached VAE posterior ``[B, 2C, h, w]`` (mean, then log-variance; what
        ``vae.encode(x).latent_dist.parameters`` holds) instead of the pixels: the encoder does not run.

        ``z = mean + exp(logvar / 2) * eps`` through diffusers' own distribution class, so it draws the same
        random numbers as ``encode_images`` and gives the same latent, up to the cache's float16.
        """
        z = DiagonalGaussianDistribution(moments.to(self.device, self.vae.dtype)).sample(generator)
        return (z - self._vae_shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Normalised latents -> pixels in [-1, 1]."""
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self._vae_shift
        return self.vae.decode(z).sample.clamp(-1, 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(channels, h, w) of the latents of a ``height`` x ``width`` image."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.dit.config.in_channels, height // factor, width // factor

    @property
    def _vae_shift(self) -> float:
        return self.vae.config.shift_factor or 0.0

    def encode_references(self, references: list[list[Tensor]]) -> list[list[Tensor]]:
        return [[self.encode_images(r[None])[0] for r in refs] for refs in references]

    def sample_references(self, moments: list[list[Tensor]]) -> list[list[Tensor]]:
        """``encode_references`` from cached posteriors ``[2C, h, w]``: the same draws in the same order."""
        return [[self.sample_latents(m[None])[0] for m in refs] for refs in moments]

    # ------------------------------------------------------------------------------ diffusion
    def velocity(
        self,
        x_t: Tensor,
        sigma: Tensor,
        cond: Conditioning,
        ref_latents: list[list[Tensor]] | None = None,
        dit: nn.Module | None = None,
    ) -> Tensor:
        """The DiT's velocity prediction for the target latents ``x_t`` at noise level ``sigma`` ``[B]``.

        ``dit`` replaces the backbone's own DiT (the RL stage's frozen reference copy)."""
        return (dit or self.dit)(
            hidden_states=x_t,
            encoder_hidden_states=cond.seq,
            pooled_projections=cond.pooled,
            timestep=sigma_to_timestep(sigma, self.scheduler).to(x_t.dtype),
            encoder_attention_mask=cond.mask,
            ref_latents=ref_latents,
            return_dict=False,
        )[0]

    def flow_loss(
        self,
        cond: Conditioning,
        targets: Tensor,
        ref_latents: list[list[Tensor]] | None = None,
        generator: torch.Generator | None = None,
        moments: Tensor | None = None,
    ) -> Tensor:
        """Flow-matching loss on target images ``[B, 3, H, W]`` in [-1, 1]; with ``moments``, their cached VAE
        posterior ``[B, 2C, h, w]``, the latents are drawn from it and the VAE encoder does not run."""
        if moments is None:
            x0 = self.encode_images(targets, generator)
        else:
            x0 = self.sample_latents(moments, generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        sigma = sample_train_sigmas(self.train_sigmas, x0.shape[0], generator)
        return flow_matching_loss(
            self.velocity(add_noise(x0, noise, sigma), sigma, cond, ref_latents), x0, noise
        )

    @torch.no_grad()
    def sample(
        self,
        cond: Conditioning,
        uncond: Conditioning,
        height: int,
        width: int,
        *,
        ref_latents: list[list[Tensor]] | None = None,
        num_steps: int = 50,
        cfg_scale: float = 4.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Euler ODE sampling with CFG; returns pixels ``[B, 3, height, width]`` in [-1, 1]."""
        batch = cond.pooled.shape[0]
        x = torch.randn((batch, *self.latent_shape(height, width)), generator=generator, device=self.device)
        velocity = self.guided_velocity_fn(cond, uncond, cfg_scale, ref_latents)
        sigmas = inference_sigmas(self.scheduler, num_steps).to(self.device)
        return self.decode_latents(euler_sample(velocity, x, sigmas))

    def guided_velocity_fn(
        self,
        cond: Conditioning,
        uncond: Conditioning | None = None,
        cfg_scale: float = 1.0,
        ref_latents: list[list[Tensor]] | None = None,
        dit: nn.Module | None = None,
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """``(x, sigma) -> v`` for one batch, ``sigma`` 0-d: the conditional velocity, or CFG with ``uncond``.

        Without grad and with the backbone's own DiT, this calls the compiled step of compile_sampling
        once it has run; with grad (RL updates) or another ``dit`` (the RL reference), the eager one.
        """
        scale = None if uncond is None else cfg_scale
        both = cond if uncond is None else cond.cat(uncond)
        refs = ref_latents if uncond is None or ref_latents is None else ref_latents + ref_latents
        compiled = self._compiled_velocity if dit is None else None
        if compiled is not None:
            fixed = both.padded(self._pad_multiple)
            # The DiT's all-true-mask check, made once here rather than as a host sync in every step.
            if fixed.mask is not None and bool(fixed.mask.all()):
                fixed = Conditioning(fixed.seq, fixed.pooled, None)

        def velocity(x: Tensor, sigma: Tensor) -> Tensor:
            s = sigma.to(self.device).expand(x.shape[0])
            if compiled is not None and not torch.is_grad_enabled():
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's output has been used
                return compiled(x, s, fixed.seq, fixed.pooled, fixed.mask, refs, scale)
            return self._velocity_step(x, s, both.seq, both.pooled, both.mask, refs, scale, dit)

        return velocity

    def _velocity_step(
        self,
        x: Tensor,
        sigma: Tensor,
        seq: Tensor,
        pooled: Tensor,
        mask: Tensor | None,
        refs: list[list[Tensor]] | None,
        scale: float | None,
        dit: nn.Module | None = None,
    ) -> Tensor:
        """One denoising step's velocity from tensors only, so that it compiles as one graph;
        ``scale`` None: conditional only, else the batch of ``seq`` is conditional then unconditional."""
        cond = Conditioning(seq, pooled, mask)
        if scale is None:
            return self.velocity(x, sigma, cond, refs, dit)
        v = self.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), cond, refs, dit)
        return guided_velocity(v[: x.shape[0]], v[x.shape[0] :], scale)

    def compile_sampling(
        self,
        backend: str | Callable = "inductor",
        mode: str | None = "reduce-overhead",
        pad_multiple: int = 64,
    ) -> None:
        """Sampling and RL rollouts call the DiT through one compiled step of fixed shapes.

        At batch 1 sampling is bound by kernel launches; inductor's "reduce-overhead" mode makes each
        denoising step on CUDA one CUDA-graph replay. Conditionings are left-padded (masked) to a multiple of
        ``pad_multiple`` tokens, so prompts of other lengths reuse the graph; without a padding mask
        (``bridge.mask_padding`` false) each new length compiles anew. Each new batch or image size, and
        train/eval mode, compiles once; past torch._dynamo.config.recompile_limit (8) variants, new ones run
        eagerly. ``backend="aot_eager", mode=None`` traces the same graph without generating kernels (CPU tests).
        """
        options = {} if mode is None else {"mode": mode}
        self._compiled_velocity = torch.compile(
            self._velocity_step, backend=backend, dynamic=False, **options
        )
        self._pad_multiple = pad_multiple
