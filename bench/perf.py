"""GPU performance suite: our training, sampling and RL paths against the plain loop, in one process.

    python -m bench.perf --model full --out perf.json        # the GPU machine (5-7 minutes, estimated)
    python -m bench.perf --model tiny --device cpu --size 32 --sample-sizes 32 --steps 2 --out smoke.json

Models are built from the published configs with random weights (``deepgen.model.random_init``):
nothing is downloaded, and timing does not depend on the weights. Prompts are random token ids of a
realistic length (``--prompt-tokens`` of template and caption, then the think tokens), so no
tokenizer is needed; tokenising a prompt costs well under a millisecond and is left out.

Measurements (``--only`` takes names or prefixes: ``train``, ``sample``, ``grpo``):
  train_align, train_align_edit, train_sft_t2i, train_sft_edit
                                               one optimiser step at --size px, micro-batch --batch;
                                               edit steps have one --size px reference per sample
  sample_cfg_<px>                              50-step (--steps) Euler sampling with CFG 4, batch 1,
                                               prompt encoding and VAE decoding included
  grpo_rollout                                 --rollout-images images of one prompt, --steps SDE steps,
                                               no CFG (the grpo stage's defaults), decoding included
  grpo_update                                  the update on that rollout: 30 of 49 steps trained, KL to
                                               the frozen reference DiT, the auxiliary SFT loss, AdamW

Each is run twice. "ours": the project's code, as a run with ``hardware=gpu`` executes it: the stage
module decides what trains and builds its AdamW, the backbone computes conditioning and loss
(``encode_prompts`` + ``flow_loss``), sampling is ``DeepGenBackbone.sample`` on bf16 weights like
``deepgen.inference``, RL is ``sde_rollout`` and ``MRGRPOModule.grpo_backward``, all under Lightning
Fabric with the Trainer's precision (bf16-mixed; 32-true on CPU, as hardware=cpu), with each block
compiled as ``hardware.compile`` does (``--no-compile`` to leave it out; off on CPU). "plain": the
textbook loop on stock parts: transformers' Qwen2.5-VL, diffusers' ``SD3Transformer2DModel``,
``AutoencoderKL`` and ``FlowMatchEulerDiscreteScheduler.step``, fp32 weights under bf16 autocast,
``AdamW(fused=True)`` on CUDA.
Both share the SCB bridge (no stock one exists), LoRA through peft and the SDE step formula. Stock SD3
cannot take reference latents, so the plain edit step places the reference beside the target (a
double-width latent): the same number of image tokens. Frozen weights (the VLM, a frozen DiT or
bridge, the RL reference DiT) are held in ``--frozen-dtype`` on both sides (bf16 on GPU): they never
update, their matmuls run in bf16 under autocast anyway, and fp32 copies of all of them would not fit
one 80 GB GPU next to the SFT optimiser state. (A real run keeps them fp32 and shards them with FSDP:
bench/fsdp_memory.py measures that path.)

Per side: median seconds of --iters timed steps after --warmup untimed ones (sampling and RL:
--long-iters after one), ``torch.cuda.synchronize`` around each; images/s; peak memory
(``torch.cuda.max_memory_allocated``, weights and optimiser state included); FLOPs of one step counted
once, eagerly (before compiling), with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; backward
included), TFLOP/s and MFU against --peak-tflops (989: H100 SXM dense bf16; meaningless elsewhere).
``speedup`` = plain seconds / our seconds. With compile on, ``compile_numerics`` first checks that the
compiled blocks give the eager loss and gradient within bf16 tolerance. The JSON is rewritten after every measurement, so a run
cut short keeps what it measured; a measurement that fails (out of memory) records its error.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from deepgen.config import PromptSetConfig, StageConfig
from deepgen.diffusion.schedule import inference_sigmas
from deepgen.diffusion.sde import sde_rollout, sde_step, velocity_kl
from deepgen.images import to_uint8
from deepgen.inference import default_dtype
from deepgen.model.backbone import DeepGenBackbone
from deepgen.model.bridge import SCBBridge
from deepgen.model.lora import attach_vlm_lora
from deepgen.model.random_init import (
    ARCHITECTURES,
    Architecture,
    build_random_backbone,
    build_random_diffusion,
    build_random_vlm,
)
from deepgen.model.vlm import (
    VisionSpec,
    VLMBatch,
    mrope_position_ids,
    reference_to_vit_input,
    select_fusion_layers,
)
from stages import STAGES
from stages.grpo import Rollout
from stages.parallel import compile_blocks

ROOT = Path(__file__).resolve().parents[1]
H100_DENSE_BF16_TFLOPS = 989.0
GRAD_CLIP = 1.0  # trainer.grad_clip's default
CFG_SCALE = 4.0  # the original's sampling guidance
UNCOND_TEXT_TOKENS = 13  # the T2I template with an empty caption (Qwen2.5 tokenizer)
GIB = 2**30


@dataclass
class Settings:
    """One suite run: the command-line options (``--help`` says what each means)."""

    model: str = "full"
    device: str = "cuda"
    size: int = 512
    sample_sizes: tuple[int, ...] = (512, 1024)
    steps: int = 50
    batch: int = 4
    rollout_images: int = 8
    prompt_tokens: int = 96
    warmup: int = 2
    iters: int = 5
    long_iters: int = 3  # sampling and RL: seconds per step, not fractions of one
    precision: str = "bf16-mixed"
    frozen_dtype: str = "bfloat16"
    compile: bool = True  # ours: hardware.compile, on in the GPU configs
    peak_tflops: float = H100_DENSE_BF16_TFLOPS
    seed: int = 0

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.model]

    @property
    def dev(self) -> torch.device:
        return torch.device(self.device)

    @property
    def frozen(self) -> torch.dtype:
        return getattr(torch, self.frozen_dtype)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype Lightning's precision setting implies (None: no autocast)."""
        return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.precision)


Step = Callable[[], None]
Compile = Callable[[], None]
"""Turns on the fast path of our side (``hardware.compile``): called after FLOPs are counted eagerly."""


# ---------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(
    step: Step, images: int, s: Settings, compile: Compile | None = None, count_flops: bool = True
) -> dict:
    """Count one step's FLOPs (eagerly: compiled kernels can hide matmuls from the counter), compile,
    warm up, then time ``s.iters`` steps; see the module docstring."""
    flops = None
    if count_flops:
        with FlopCounterMode(display=False) as counter:
            step()
        synchronize(s.dev)
        flops = counter.get_total_flops()
    if compile is not None:
        compile()
    for _ in range(s.warmup):
        step()
    synchronize(s.dev)
    if s.dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.dev)
    seconds = []
    for _ in range(s.iters):
        synchronize(s.dev)
        start = time.perf_counter()
        step()
        synchronize(s.dev)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    cuda = s.dev.type == "cuda"
    tflops = flops / median / 1e12 if flops is not None else None
    return {
        "seconds": median,
        "seconds_min": min(seconds),
        "seconds_all": seconds,
        "images": images,
        "img_per_s": images / median,
        "peak_mem_gib": torch.cuda.max_memory_allocated(s.dev) / GIB if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(s.dev) / GIB if cuda else None,
        "flops": flops,
        "tflops_per_s": tflops,
        "mfu": tflops / s.peak_tflops if tflops is not None else None,
        "compiled": compile is not None,
    }


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------------- inputs
def synthetic_prompts(
    arch: Architecture,
    vision: VisionSpec,
    batch: int,
    text_tokens: int,
    think_tokens: int,
    references: list[list[Tensor]] | None = None,
    seed: int = 0,
) -> VLMBatch:
    """What ``VLMPrompter`` hands the VLM, from random ids: ``text_tokens`` of template and text, one
    vision block per reference after the user header (as the edit template), then the think slots."""
    cfg = arch.vlm
    ordinary = min(cfg[k] for k in ("bos_token_id", "vision_start_token_id", "image_token_id"))
    gen = torch.Generator().manual_seed(seed)
    rows, pixels, grids = [], [], []
    for b in range(batch):
        text = torch.randint(0, ordinary, (text_tokens,), generator=gen)
        pieces = [text[:3]]
        for ref in references[b] if references else []:
            patch_rows, grid = reference_to_vit_input(ref.cpu(), vision)
            pixels.append(patch_rows)
            grids.append(grid)
            count = int(grid.prod()) // vision.merge_size**2
            pieces.append(torch.tensor([cfg["vision_start_token_id"], *[cfg["image_token_id"]] * count]))
            pieces.append(torch.tensor([cfg["vision_end_token_id"]]))
        pieces += [text[3:], torch.full((think_tokens,), cfg["bos_token_id"])]
        rows.append(torch.cat(pieces))
    input_ids = torch.stack(rows)
    mask = torch.ones_like(input_ids)
    grid_thw = torch.stack(grids) if grids else None
    positions = mrope_position_ids(input_ids, mask, grid_thw, cfg["image_token_id"], vision.merge_size)
    think = torch.zeros_like(input_ids, dtype=torch.bool)
    think[:, input_ids.shape[1] - think_tokens :] = True
    return VLMBatch(input_ids, mask, positions, think, torch.cat(pixels) if pixels else None, grid_thw)


def random_images(batch: int, size: int, device: torch.device, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device)


def load_stage_config(name: str) -> StageConfig:
    """conf/stage/<name>.yaml over the schema defaults: the settings a real run of that stage uses."""
    node = OmegaConf.merge(
        OmegaConf.structured(StageConfig), OmegaConf.load(ROOT / "conf" / "stage" / f"{name}.yaml")
    )
    if node.grpo is not None:  # prompt sets and rewards point at data; the timing needs neither
        node.grpo.prompt_sets, node.grpo.eval_prompt_sets, node.grpo.rewards = [], [], {}
    return OmegaConf.to_object(node)


# ------------------------------------------------------------------------------------ our path
def hold_frozen(bb: DeepGenBackbone, stage_cfg: StageConfig, dtype: torch.dtype) -> None:
    """Frozen parts in ``dtype``, before LoRA is attached (so adapters stay fp32); the VAE stays fp32."""
    bb.vlm.to(dtype)
    if not stage_cfg.train_dit:
        bb.dit.to(dtype)
    if not stage_cfg.train_bridge:
        bb.bridge.to(dtype)


def our_stage(s: Settings, stage: str, stage_cfg: StageConfig | None = None, **kwargs) -> tuple:
    """(backbone, stage module, its optimiser, fabric): the module sets the trainables and builds AdamW."""
    stage_cfg = stage_cfg or load_stage_config(stage)
    bb = build_random_backbone(s.arch, device=s.dev)
    hold_frozen(bb, stage_cfg, s.frozen)
    module = STAGES[stage](s.arch.model, stage_cfg, max_steps=1000, seed=s.seed, **kwargs)
    module.backbone = bb
    module.apply_trainable()
    module.on_weights_ready()
    optimizer = module.configure_optimizers()["optimizer"]
    fabric = L.Fabric(accelerator=s.dev.type, devices=1, precision=s.precision)
    fabric.setup_module(module)
    return bb, module, optimizer, fabric


def fast_path(s: Settings, bb: DeepGenBackbone, sampling: bool = False) -> list[Compile]:
    """Our side's compile step as the gpu config applies it, if on: ``hardware.compile`` (compile_blocks)
    and, for sampling and rollouts, ``hardware.compile_sampling`` (one CUDA-graphed denoising step)."""

    def compile() -> None:
        compile_blocks(bb)
        if sampling:
            bb.compile_sampling()

    return [compile] if s.compile else []


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """Clip, step, clear: what the Trainer does after backward (trainer.grad_clip = 1.0)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def ours_train(s: Settings, stage: str, task: str) -> tuple[Step, int]:
    bb, _module, optimizer, fabric = our_stage(s, stage)
    refs = [[img] for img in random_images(s.batch, s.size, s.dev, s.seed + 1)] if task == "edit" else None
    prompts = synthetic_prompts(s.arch, bb.vision, s.batch, s.prompt_tokens, bb.cfg.num_think_tokens, refs)
    targets = random_images(s.batch, s.size, s.dev, s.seed)

    def step() -> None:
        with fabric.autocast():
            cond = bb.encode_prompts(prompts)
            loss = bb.flow_loss(cond, targets, bb.encode_references(refs) if refs else None)
        fabric.backward(loss)
        optimizer_step(optimizer)

    return step, s.batch, *fast_path(s, bb)


def ours_sample(s: Settings, size: int) -> tuple[Step, int]:
    """``deepgen.inference.generate_images`` minus tokenising: bf16 weights on GPU, autocast, bb.sample."""
    bb = build_random_backbone(s.arch, device=s.dev)
    dtype = default_dtype(s.device)
    bb.to(dtype=dtype).eval().requires_grad_(False)
    think = bb.cfg.num_think_tokens
    prompt = synthetic_prompts(s.arch, bb.vision, 1, s.prompt_tokens, think, seed=s.seed)
    negative = synthetic_prompts(s.arch, bb.vision, 1, UNCOND_TEXT_TOKENS, think, seed=s.seed + 1)
    autocast = torch.autocast(s.dev.type, dtype=dtype, enabled=dtype != torch.float32)

    @torch.no_grad()
    def step() -> None:
        generator = torch.Generator(device=s.dev).manual_seed(s.seed)
        with autocast:
            cond, uncond = bb.encode_prompts(prompt), bb.encode_prompts(negative)
            bb.sample(cond, uncond, size, size, num_steps=s.steps, cfg_scale=CFG_SCALE, generator=generator)

    return step, 1, *fast_path(s, bb, sampling=True)


def grpo_stage_config(s: Settings, prompt_file: Path) -> StageConfig:
    cfg = load_stage_config("grpo")
    cfg.grpo.num_steps = s.steps
    cfg.grpo.prompt_sets = [PromptSetConfig(name="bench", path=str(prompt_file))]
    return cfg


def ours_grpo(s: Settings) -> tuple:
    """A grpo stage module, its optimiser and fabric, with one rollout's inputs."""
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompts.txt"
        prompt_file.write_text("a benchmark prompt\n")
        cfg = grpo_stage_config(s, prompt_file)
        bb, module, optimizer, fabric = our_stage(s, "grpo", cfg, image_size=s.size)
    module.reference_dit.to(s.frozen)
    module._set_modes()
    g = module.grpo
    n = s.rollout_images
    prompts = synthetic_prompts(s.arch, bb.vision, n, s.prompt_tokens, bb.cfg.num_think_tokens)
    noise_gen = torch.Generator(device=s.dev).manual_seed(s.seed)
    x = torch.randn((1, *bb.latent_shape(s.size, s.size)), generator=noise_gen, device=s.dev).expand(
        n, -1, -1, -1
    )
    sigmas = inference_sigmas(bb.scheduler, g.num_steps).to(s.dev)
    return bb, module, optimizer, fabric, prompts, x, sigmas


def our_rollout(bb, module, fabric, prompts, x, sigmas, generator) -> Rollout:
    """The core of ``MRGRPOModule.rollout`` for one chunk: conditioning, SDE trajectory, decoded images."""
    g = module.grpo
    with torch.no_grad(), fabric.autocast():
        cond = bb.encode_prompts(prompts)
        latents, log_probs = sde_rollout(module.velocity_fn(cond, None), x, sigmas, g.sde, g.eta, generator)
        images = to_uint8(bb.decode_latents(latents[-1]))
    items = [(0, m) for m in range(x.shape[0])]
    return Rollout(items, cond, None, latents, log_probs, images)


def ours_grpo_rollout(s: Settings) -> tuple[Step, int]:
    bb, module, _optimizer, fabric, prompts, x, sigmas = ours_grpo(s)
    generator = torch.Generator(device=s.dev).manual_seed(s.seed)
    return (
        (lambda: our_rollout(bb, module, fabric, prompts, x, sigmas, generator)),
        x.shape[0],
        *fast_path(s, bb, sampling=True),
    )


def ours_grpo_update(s: Settings) -> tuple[Step, int]:
    """``MRGRPOModule.training_step`` after the rewards: auxiliary SFT loss, ``grpo_backward``, AdamW."""
    bb, module, optimizer, fabric, prompts, x, sigmas = ours_grpo(s)
    generator = torch.Generator(device=s.dev).manual_seed(s.seed)
    rollout = our_rollout(bb, module, fabric, prompts, x, sigmas, generator)
    n = x.shape[0]
    adv = torch.linspace(-1, 1, n)  # any advantages: the work does not depend on them
    mask = torch.ones(n, dtype=torch.bool)
    trained = module.trained_steps(0)
    sft_prompts = synthetic_prompts(s.arch, bb.vision, s.batch, s.prompt_tokens, bb.cfg.num_think_tokens)
    sft_images = random_images(s.batch, s.size, s.dev, s.seed)
    aux = module.grpo.sft_aux_coef

    def step() -> None:
        with fabric.autocast():  # Lightning runs the whole training_step, backward included, in autocast
            sft = bb.flow_loss(bb.encode_prompts(sft_prompts), sft_images)
            module.manual_backward(aux * sft)
            module.grpo_backward([rollout], adv, mask, trained)
        optimizer_step(optimizer)

    return step, n, *fast_path(s, bb)


# ---------------------------------------------------------------------------------- plain loop
class PlainModel(nn.Module):
    """Stock parts: transformers' Qwen2.5-VL, diffusers' SD3 DiT, VAE and scheduler, plus the SCB bridge."""

    def __init__(self, s: Settings) -> None:
        super().__init__()
        arch, cfg = s.arch, s.arch.model
        vlm = build_random_vlm(arch, device=s.dev)
        diffusion = build_random_diffusion(arch, device=s.dev, stock=True)
        self.vlm, self.vision, self.image_token_id = vlm.model, vlm.vision, vlm.image_token_id
        self.dit, self.vae, self.scheduler = diffusion.transformer, diffusion.vae, diffusion.scheduler
        text = self.vlm.config.get_text_config()
        self.fusion_layers = select_fusion_layers(text.num_hidden_layers, cfg.bridge.num_fusion_layers)
        with torch.device(s.dev):
            self.think = nn.Parameter(
                torch.randn(cfg.num_think_tokens, text.hidden_size) * text.hidden_size**-0.5
            )
            self.bridge = SCBBridge(
                text.hidden_size,
                cfg.bridge.num_fusion_layers,
                cfg.bridge.num_layers,
                cfg.bridge.num_heads,
                cfg.bridge.intermediate_size,
                self.dit.config.joint_attention_dim,
                self.dit.config.pooled_projection_dim,
                cfg.bridge.mask_padding,
            )
        self.sigmas = self.scheduler.sigmas.float().to(s.dev)  # the 1000 training sigmas
        self.requires_grad_(False)

    def condition(self, prompts: VLMBatch) -> tuple[Tensor, Tensor]:
        dev = self.think.device
        ids, mask = prompts.input_ids.to(dev), prompts.attention_mask.to(dev)
        lm = self.vlm.model.language_model
        embeds = lm.embed_tokens(ids)
        if prompts.pixel_values is not None:
            with torch.no_grad():
                features = self.vlm.model.get_image_features(
                    prompts.pixel_values.to(dev), prompts.image_grid_thw.to(dev)
                ).pooler_output
            features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
            embeds = embeds.masked_scatter((ids == self.image_token_id)[..., None], features.to(embeds.dtype))
        k = self.think.shape[0]
        embeds = torch.cat(
            [embeds[:, : ids.shape[1] - k], self.think.to(embeds.dtype).expand(len(ids), -1, -1)], 1
        )
        out = lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=prompts.position_ids.to(dev),
            output_hidden_states=True,
            use_cache=False,
        )
        return self.bridge(torch.cat([out.hidden_states[i] for i in self.fusion_layers], dim=-1), mask)

    @torch.no_grad()
    def latents(self, images: Tensor) -> Tensor:
        z = self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample()
        return (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def velocity(
        self, x: Tensor, sigma: Tensor, seq: Tensor, pooled: Tensor, dit: nn.Module | None = None
    ) -> Tensor:
        t = (sigma * self.scheduler.config.num_train_timesteps).expand(x.shape[0])
        return (dit or self.dit)(
            hidden_states=x,
            encoder_hidden_states=seq,
            pooled_projections=pooled,
            timestep=t,
            return_dict=False,
        )[0]

    def flow_loss(
        self, seq: Tensor, pooled: Tensor, targets: Tensor, references: Tensor | None = None
    ) -> Tensor:
        """Rectified-flow MSE; a reference sits beside the target (stock SD3 takes no reference tokens)."""
        x0 = self.latents(targets)
        noise = torch.randn_like(x0)
        sigma = self.sigmas[torch.randint(len(self.sigmas), (len(x0),), device=x0.device)]
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        width = x_t.shape[-1]
        if references is not None:
            x_t = torch.cat([x_t, self.latents(references)], dim=-1)
        v = self.velocity(x_t, sigma, seq, pooled)[..., :width]
        return F.mse_loss(v.float(), (noise - x0).float())


def plain_autocast(s: Settings) -> torch.autocast:
    return torch.autocast(s.dev.type, dtype=s.amp_dtype or torch.float32, enabled=s.amp_dtype is not None)


def plain_optimizer(s: Settings, params: list[nn.Parameter], stage_cfg: StageConfig) -> torch.optim.Optimizer:
    o = stage_cfg.optim
    fused = s.dev.type == "cuda"
    return torch.optim.AdamW(
        params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps, fused=fused
    )


def plain_trainables(pm: PlainModel, stage_cfg: StageConfig, frozen: torch.dtype) -> list[nn.Parameter]:
    """The same parts as the stage trains, frozen ones held in ``frozen`` (as on our side). RL attaches
    LoRA but keeps it frozen, as ``MRGRPOModule.apply_trainable``."""
    pm.vlm.to(frozen)
    trained: list[nn.Module] = []
    if stage_cfg.train_bridge:
        trained += [pm.bridge]
        pm.think.requires_grad_(True)
    else:
        pm.bridge.to(frozen)
    if stage_cfg.train_dit:
        trained.append(pm.dit)
    else:
        pm.dit.to(frozen)
    if stage_cfg.lora is not None:
        attach_vlm_lora(pm.vlm, stage_cfg.lora)  # peft; marks only the adapters trainable
        if stage_cfg.grpo is not None:
            pm.vlm.requires_grad_(False)
    for module in trained:
        module.requires_grad_(True)
    pm.train()
    pm.vae.eval()
    return [p for p in pm.parameters() if p.requires_grad]


def plain_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def plain_train(s: Settings, stage: str, task: str) -> tuple[Step, int]:
    stage_cfg = load_stage_config(stage)
    pm = PlainModel(s)
    params = plain_trainables(pm, stage_cfg, s.frozen)
    optimizer = plain_optimizer(s, params, stage_cfg)
    refs = random_images(s.batch, s.size, s.dev, s.seed + 1) if task == "edit" else None
    per_sample = [[r] for r in refs] if refs is not None else None
    prompts = synthetic_prompts(s.arch, pm.vision, s.batch, s.prompt_tokens, pm.think.shape[0], per_sample)
    targets = random_images(s.batch, s.size, s.dev, s.seed)

    def step() -> None:
        with plain_autocast(s):
            seq, pooled = pm.condition(prompts)
            loss = pm.flow_loss(seq, pooled, targets, refs)
        loss.backward()
        plain_step(optimizer, params)

    return step, s.batch


def plain_sample(s: Settings, size: int) -> tuple[Step, int]:
    """The diffusers SD3 pipeline's loop: CFG batch of two, ``scheduler.step``, VAE decode."""
    pm = PlainModel(s).eval()
    think = pm.think.shape[0]
    prompt = synthetic_prompts(s.arch, pm.vision, 1, s.prompt_tokens, think, seed=s.seed)
    negative = synthetic_prompts(s.arch, pm.vision, 1, UNCOND_TEXT_TOKENS, think, seed=s.seed + 1)
    scheduler = type(pm.scheduler).from_config(pm.scheduler.config)
    factor = 2 ** (len(pm.vae.config.block_out_channels) - 1)
    shape = (1, pm.dit.config.in_channels, size // factor, size // factor)

    @torch.no_grad()
    def step() -> None:
        generator = torch.Generator(device=s.dev).manual_seed(s.seed)
        with plain_autocast(s):
            seq, pooled = pm.condition(prompt)
            neg_seq, neg_pooled = pm.condition(negative)
            # the stock pipeline pads prompts to one length and attends to the padding
            neg_seq = F.pad(neg_seq, (0, 0, seq.shape[1] - neg_seq.shape[1], 0))
            seq, pooled = torch.cat([seq, neg_seq]), torch.cat([pooled, neg_pooled])
            scheduler.set_timesteps(s.steps, device=s.dev)
            x = torch.randn(shape, generator=generator, device=s.dev)
            for t in scheduler.timesteps:
                v = pm.dit(
                    hidden_states=torch.cat([x, x]),
                    encoder_hidden_states=seq,
                    pooled_projections=pooled,
                    timestep=t.expand(2),
                    return_dict=False,
                )[0]
                v_cond, v_uncond = v.chunk(2)
                x = scheduler.step(v_uncond + CFG_SCALE * (v_cond - v_uncond), t, x).prev_sample
            z = x / pm.vae.config.scaling_factor + pm.vae.config.shift_factor
            pm.vae.decode(z.to(pm.vae.dtype)).sample.clamp(-1, 1)

    return step, 1


def plain_grpo(s: Settings) -> tuple:
    stage_cfg = load_stage_config("grpo")
    pm = PlainModel(s)
    params = plain_trainables(pm, stage_cfg, s.frozen)
    reference = build_random_diffusion(s.arch, device=s.dev, stock=True).transformer.to(s.frozen)
    reference.requires_grad_(False).eval()
    n = s.rollout_images
    prompts = synthetic_prompts(s.arch, pm.vision, n, s.prompt_tokens, pm.think.shape[0])
    factor = 2 ** (len(pm.vae.config.block_out_channels) - 1)
    noise_gen = torch.Generator(device=s.dev).manual_seed(s.seed)
    shape = (1, pm.dit.config.in_channels, s.size // factor, s.size // factor)
    x = torch.randn(shape, generator=noise_gen, device=s.dev).expand(n, -1, -1, -1)
    sigmas = inference_sigmas(pm.scheduler, s.steps).to(s.dev)
    return stage_cfg, pm, params, reference, prompts, x, sigmas


def plain_rollout(
    s: Settings, stage_cfg: StageConfig, pm: PlainModel, prompts, x, sigmas, generator
) -> tuple:
    g = stage_cfg.grpo
    with torch.no_grad(), plain_autocast(s):
        seq, pooled = pm.condition(prompts)
        latents, log_probs = [x.float()], []
        for i in range(len(sigmas) - 1):
            v = pm.velocity(latents[-1], sigmas[i], seq, pooled)
            out = sde_step(g.sde, v, latents[-1], sigmas[i], sigmas[i + 1], eta=g.eta, generator=generator)
            latents.append(out.prev_sample)
            log_probs.append(out.log_prob)
        z = latents[-1] / pm.vae.config.scaling_factor + pm.vae.config.shift_factor
        to_uint8(pm.vae.decode(z.to(pm.vae.dtype)).sample.clamp(-1, 1))
    return seq, pooled, torch.stack(latents), torch.stack(log_probs)


def plain_grpo_rollout(s: Settings) -> tuple[Step, int]:
    stage_cfg, pm, _params, _reference, prompts, x, sigmas = plain_grpo(s)
    generator = torch.Generator(device=s.dev).manual_seed(s.seed)
    return (lambda: plain_rollout(s, stage_cfg, pm, prompts, x, sigmas, generator)), x.shape[0]


def plain_grpo_update(s: Settings) -> tuple[Step, int]:
    """PPO-clipped policy loss plus velocity KL per trained step, one backward each, then fused AdamW."""
    stage_cfg, pm, params, reference, prompts, x, sigmas = plain_grpo(s)
    g = stage_cfg.grpo
    optimizer = plain_optimizer(s, params, stage_cfg)
    generator = torch.Generator(device=s.dev).manual_seed(s.seed)
    seq, pooled, latents, old_log_probs = plain_rollout(s, stage_cfg, pm, prompts, x, sigmas, generator)
    n = x.shape[0]
    adv = torch.linspace(-1, 1, n, device=s.dev)
    count = min(s.steps - 1, int(s.steps * g.train_fraction))
    trained = sorted(torch.randperm(s.steps - 1, generator=torch.Generator().manual_seed(0))[:count].tolist())
    sft_prompts = synthetic_prompts(s.arch, pm.vision, s.batch, s.prompt_tokens, pm.think.shape[0])
    sft_images = random_images(s.batch, s.size, s.dev, s.seed)

    def step() -> None:
        with plain_autocast(s):
            sft = pm.flow_loss(*pm.condition(sft_prompts), sft_images)
        (g.sft_aux_coef * sft).backward()
        for j in trained:
            with plain_autocast(s):
                v = pm.velocity(latents[j], sigmas[j], seq, pooled)
                out = sde_step(
                    g.sde, v, latents[j], sigmas[j], sigmas[j + 1], eta=g.eta, prev_sample=latents[j + 1]
                )
                ratio = torch.exp(out.log_prob - old_log_probs[j])
                clipped = ratio.clamp(1 - g.clip_range, 1 + g.clip_range)
                policy = torch.maximum(-adv * ratio, -adv * clipped).mean()
                with torch.no_grad():
                    v_ref = pm.velocity(latents[j], sigmas[j], seq, pooled, dit=reference)
                kl = velocity_kl(v, v_ref, out.kl_std).mean()
            ((1 - g.sft_aux_coef) / len(trained) * (policy + g.kl_beta * kl)).backward()
        plain_step(optimizer, params)

    return step, n


# ------------------------------------------------------------------------------------- the suite
Prepare = Callable[[Settings], tuple[Step, int]]
TRAIN_STEPS = {  # name -> (stage, task); edit steps have one reference image per sample
    "train_align": ("align", "t2i"),
    "train_align_edit": ("align", "edit"),
    "train_sft_t2i": ("sft", "t2i"),
    "train_sft_edit": ("sft", "edit"),
}


def measurements(s: Settings) -> dict[str, tuple[dict, Prepare, Prepare]]:
    """name -> (workload description, ours, plain), in the order they run. Workloads with ``steps``
    (sampling, RL) take seconds a step: one warm-up and --long-iters timed steps."""
    train = {"px": s.size, "batch": s.batch, "prompt_tokens": s.prompt_tokens}
    out: dict[str, tuple[dict, Prepare, Prepare]] = {}
    for name, (stage, task) in TRAIN_STEPS.items():
        workload = {**train, "stage": stage, "task": task, **({"references": 1} if task == "edit" else {})}
        out[name] = (
            workload,
            lambda s, stage=stage, task=task: ours_train(s, stage, task),
            lambda s, stage=stage, task=task: plain_train(s, stage, task),
        )
    for px in s.sample_sizes:
        out[f"sample_cfg_{px}"] = (
            {"px": px, "batch": 1, "steps": s.steps, "cfg_scale": CFG_SCALE},
            lambda s, px=px: ours_sample(s, px),
            lambda s, px=px: plain_sample(s, px),
        )
    rl = {"px": s.size, "images": s.rollout_images, "steps": s.steps, "cfg_scale": 0.0}
    out["grpo_rollout"] = (rl, ours_grpo_rollout, plain_grpo_rollout)
    out["grpo_update"] = ({**rl, "aux_sft_batch": s.batch}, ours_grpo_update, plain_grpo_update)
    return out


def run_side(prepare: Prepare, s: Settings) -> dict:
    """Build one side and time it; its models live in this frame only, so they are gone on return."""
    step, images, *fast = prepare(s)
    return time_step(step, images, s, *fast)


def measure_side(prepare: Prepare, s: Settings) -> dict:
    """One side of one measurement; a failure (e.g. out of memory) is recorded, not raised. The side's
    models are freed before the next one is built: two full-size backbones do not fit at once."""
    torch.manual_seed(s.seed)
    try:
        result = run_side(prepare, s)
    except Exception as error:  # the suite goes on; the JSON says what failed and why
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
    free_memory(s.dev)
    if s.dev.type == "cuda":  # should be ~0: anything left is a leak that would crowd the next measurement
        result["allocated_after_gib"] = torch.cuda.memory_allocated(s.dev) / GIB
    return result


def environment(s: Settings) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    env = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit,
        "device": torch.cuda.get_device_name(s.dev)
        if s.dev.type == "cuda"
        else platform.processor() or "cpu",
    }
    for name in ("transformers", "diffusers", "lightning", "peft"):
        env[name] = __import__(name).__version__
    return env


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def table(results: dict) -> str:
    lines = [
        f"{'measurement':<16} {'ours s':>9} {'plain s':>9} {'speedup':>8} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'GiB':>6}"
    ]
    for name, r in results.items():
        ours, plain = r["ours"], r["plain"]
        if "error" in ours:
            lines.append(f"{name:<16} ours failed: {ours['error'][:80]}")
            continue
        mem = f"{ours['peak_mem_gib']:6.1f}" if ours["peak_mem_gib"] is not None else f"{'-':>6}"
        plain_s = f"{plain['seconds']:9.4f}" if "seconds" in plain else f"{'failed':>9}"
        speedup = f"{r['speedup']:8.2f}" if r["speedup"] is not None else f"{'-':>8}"
        lines.append(
            f"{name:<16} {ours['seconds']:9.4f} {plain_s} {speedup} {ours['img_per_s']:8.2f} "
            f"{ours['tflops_per_s']:8.1f} {ours['mfu']:6.1%} {mem}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[Settings, list[str], Path]:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(ARCHITECTURES), default=d.model)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--size", type=int, default=d.size, help="train and RL image side (px)")
    p.add_argument("--sample-sizes", type=int, nargs="+", default=list(d.sample_sizes))
    p.add_argument("--steps", type=int, default=d.steps, help="sampling and rollout steps")
    p.add_argument("--batch", type=int, default=d.batch, help="train micro-batch (original: 4)")
    p.add_argument("--rollout-images", type=int, default=d.rollout_images)
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="template + caption tokens")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--iters", type=int, default=d.iters, help="timed steps of the train measurements")
    p.add_argument("--long-iters", type=int, default=d.long_iters, help="timed runs of sampling and RL")
    p.add_argument(
        "--precision",
        default=None,
        help="Lightning precision (default: hardware=gpu's bf16-mixed, on CPU 32-true)",
    )
    p.add_argument("--frozen-dtype", default=None, help="dtype of frozen weights (default: bfloat16 on GPU)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="our side compiles its blocks, as hardware.compile (default: on GPU yes, on CPU no)",
    )
    p.add_argument("--peak-tflops", type=float, default=d.peak_tflops)
    p.add_argument("--only", nargs="+", default=[], help="measurement names or prefixes")
    p.add_argument("--out", type=Path, default=Path("perf.json"))
    a = p.parse_args(argv)
    if min(a.iters, a.long_iters) < 1:
        p.error("--iters and --long-iters must be at least 1")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cpu = torch.device(device).type == "cpu"
    frozen = a.frozen_dtype or ("float32" if on_cpu else "bfloat16")
    precision = a.precision or ("32-true" if on_cpu else d.precision)  # as conf/hardware/{cpu,gpu}.yaml
    if frozen != "float32" and precision.startswith(("32", "64")):  # fp32 compute without autocast
        p.error(
            f"--frozen-dtype {frozen} needs autocast to meet the fp32 trainables: add --precision bf16-mixed"
        )
    s = Settings(
        model=a.model,
        device=device,
        size=a.size,
        sample_sizes=tuple(a.sample_sizes),
        steps=a.steps,
        batch=a.batch,
        rollout_images=a.rollout_images,
        prompt_tokens=a.prompt_tokens,
        warmup=a.warmup,
        iters=a.iters,
        long_iters=a.long_iters,
        precision=precision,
        frozen_dtype=frozen,
        compile=not on_cpu if a.compile is None else a.compile,
        peak_tflops=a.peak_tflops,
    )
    return s, a.only, a.out


NUMERICS_RTOL = {
    "loss": 1e-2,
    "grad": 5e-2,
    "velocity": 2e-2,
}  # bf16: 8 bits of mantissa; fused kernels reorder sums


def compile_numerics(s: Settings) -> dict:
    """The fast path keeps the numbers: one SFT T2I loss and the DiT output layer's gradient, eager and
    then with compiled blocks, on the same inputs and noise, and one guided (CFG) sampling velocity, eager
    and then through the compiled sampling step (its third call: CUDA graphs record on an early call and
    replay after); relative differences against NUMERICS_RTOL."""
    bb, _module, _optimizer, fabric = our_stage(s, "sft")
    prompts = synthetic_prompts(s.arch, bb.vision, s.batch, s.prompt_tokens, bb.cfg.num_think_tokens)
    targets = random_images(s.batch, s.size, s.dev, s.seed)

    def loss_and_grad() -> tuple[float, Tensor]:
        generator = torch.Generator(device=s.dev).manual_seed(s.seed)
        with fabric.autocast():
            loss = bb.flow_loss(bb.encode_prompts(prompts), targets, generator=generator)
        fabric.backward(loss)
        grad = bb.dit.proj_out.weight.grad.float().clone()
        bb.zero_grad(set_to_none=True)
        return loss.item(), grad

    think = bb.cfg.num_think_tokens
    prompt = synthetic_prompts(s.arch, bb.vision, 1, s.prompt_tokens, think, seed=s.seed)
    negative = synthetic_prompts(s.arch, bb.vision, 1, UNCOND_TEXT_TOKENS, think, seed=s.seed + 1)
    noise_gen = torch.Generator(device=s.dev).manual_seed(s.seed)
    x = torch.randn((1, *bb.latent_shape(s.size, s.size)), generator=noise_gen, device=s.dev)
    sigma = torch.tensor(0.7, device=s.dev)

    @torch.no_grad()
    def velocity() -> Tensor:
        with fabric.autocast():
            cond, uncond = bb.encode_prompts(prompt), bb.encode_prompts(negative)
            return bb.guided_velocity_fn(cond, uncond, CFG_SCALE)(x, sigma).float().clone()

    loss, grad, v = *loss_and_grad(), velocity()
    compile_blocks(bb)
    fast_loss, fast_grad = loss_and_grad()
    bb.compile_sampling()
    fast_v = [velocity() for _ in range(3)][-1]
    diff = {
        "loss": abs(fast_loss - loss) / abs(loss),
        "grad": ((fast_grad - grad).norm() / grad.norm()).item(),
        "velocity": ((fast_v - v).norm() / v.norm()).item(),
    }
    return {
        "loss_eager": loss,
        "loss_compiled": fast_loss,
        "rel_diff": diff,
        "rtol": NUMERICS_RTOL,
        "ok": all(diff[k] <= NUMERICS_RTOL[k] for k in diff),
    }


def main(argv: list[str] | None = None) -> dict:
    s, only, out = parse_args(argv)
    suite = measurements(s)
    chosen = [n for n in suite if not only or any(n.startswith(o) for o in only)]
    if not chosen:
        raise SystemExit(f"--only {only} matches none of {list(suite)}")
    doc = {"env": environment(s), "settings": asdict(s), "results": {}}
    if s.compile:
        doc["compile_numerics"] = compile_numerics(s)
        free_memory(s.dev)  # the check's models went with its frame
        write_json(out, doc)
        print(f"compiled vs eager: {doc['compile_numerics']}", flush=True)
    for name in chosen:
        workload, ours, plain = suite[name]
        start = time.perf_counter()
        run = replace(s, warmup=min(s.warmup, 1), iters=s.long_iters) if "steps" in workload else s
        result = {"workload": workload, "ours": measure_side(ours, run), "plain": measure_side(plain, run)}
        both = "seconds" in result["ours"] and "seconds" in result["plain"]
        result["speedup"] = result["plain"]["seconds"] / result["ours"]["seconds"] if both else None
        doc["results"][name] = result
        write_json(out, doc)
        print(f"{name}: done in {time.perf_counter() - start:.0f} s", flush=True)
    print(table(doc["results"]))
    return doc


if __name__ == "__main__":
    main()
