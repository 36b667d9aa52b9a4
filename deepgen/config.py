"""Typed configuration: every default of the project and what it means, in one place.

These dataclasses are plain data. The library takes them as arguments; the Hydra entry points
register them as schemas (``stages/schema.py``) so a mistyped key fails at compose time with its
name. Values marked "original" are those of the released DeepGen 1.0 code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class BridgeConfig:
    """Stacked Channel Bridging: VLM hidden states -> DiT conditioning."""

    num_fusion_layers: int = 6
    """Hidden-state layers concatenated on channels, uniformly spaced from the last (original: 6)."""
    num_layers: int = 6
    """Bidirectional encoder layers in the connector (original: 6)."""
    num_heads: int = 32
    """Attention heads of the connector (original: 32, head dim 64)."""
    intermediate_size: int = 11946
    """MLP width of the connector (original: 11946)."""
    mask_padding: bool = True
    """Keep left padding out of the connector, the pooled mean and the DiT's text attention.
    False reproduces the original, which attends to and averages over padding."""


@dataclass
class ModelConfig:
    """Which weights to load and the sizes of the parts this project adds.

    Architecture dimensions of the VLM and DiT come from the ``config.json`` files of the two
    directories, so the same code loads the tiny zoo and the real 5B models.
    """

    name: str = MISSING
    vlm_path: str = MISSING
    """Local Qwen2.5-VL directory in the Hugging Face layout (config.json, tokenizer, preprocessor_config.json)."""
    dit_path: str = MISSING
    """Local SD3/SD3.5 directory in the diffusers layout (transformer/, vae/, scheduler/)."""
    build_tiny_zoo: bool = False
    """Build the tiny model zoo into vlm_path/dit_path's parent on first use (tiny model only)."""
    num_think_tokens: int = 128
    """Learnable query tokens appended after the assistant header (original: 128)."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this (before think tokens and image tokens) are truncated from the left."""
    bridge: BridgeConfig = field(default_factory=BridgeConfig)


@dataclass
class TinyWorldConfig:
    """Procedurally drawn tiny-world shards, generated on first use when missing."""

    num_t2i: int = 4096
    num_edit: int = 2048
    num_reasoning_t2i: int = 512
    """T2I prompts that need a fact ("a circle the colour of a ripe banana")."""
    num_text_t2i: int = 512
    """Signs with a short word, at a 2:1 aspect ratio."""
    num_reasoning_edit: int = 256
    num_text_edit: int = 256
    num_eval_per_split: int = 64
    """Held-out prompts per eval split (eval/*.jsonl), disjoint from the training prompts."""
    image_size: int = 64
    samples_per_shard: int = 512
    seed: int = 0


@dataclass
class DatasetConfig:
    """One dataset of a task's mixture."""

    name: str = MISSING
    task: str = MISSING
    """t2i or edit."""
    shards: str = MISSING
    """A directory (its <task>-*.tar), a local glob, or a brace-expanded url
    (``pipe:aws s3 cp s3://bucket/t2i-{000000..000999}.tar -``, ``https://host/t2i-{0..9}.tar``)."""
    weight: float = 1.0
    """Relative sampling weight among the datasets of the same task."""


@dataclass
class DataConfig:
    """Where the webdataset shards are and how batches are formed."""

    name: str = MISSING
    shards_dir: str = MISSING
    """Shards of the default dataset (both tasks); used when ``datasets`` is empty."""
    t2i_pattern: str = "t2i-*.tar"
    edit_pattern: str = "edit-*.tar"
    datasets: list[DatasetConfig] = field(default_factory=list)
    """A mixture: several datasets per task with weights; replaces shards_dir when given."""
    image_size: int = 512
    """Target side for the fix-pixels resize: area about image_size**2, aspect kept (original: 512)."""
    size_unit: int = 32
    """Resized sides are multiples of this (original: 32)."""
    batch_size: int = 4
    """Per-device micro-batch (original: 4). Each micro-batch holds one task."""
    num_workers: int = 2
    shuffle_buffer: int = 1000
    """Samples held per worker and dataset for shuffling (deterministic from seed)."""
    seed: int = 0
    resampled: bool = True
    """Infinite streams of shards drawn with replacement (long runs); False reads each shard once per epoch."""
    bucketing: bool = True
    """Batch only samples of the same target size (dense batches with mixed aspect ratios)."""
    max_aspect: float = 10.0
    """Skip images more elongated than this (original: 10)."""
    min_side: int = 1
    """Skip images with a side below this many pixels (original pre-training: 81)."""
    max_bad_fraction: float = 0.1
    """Stop, naming the shard, when more than this fraction of a shard's samples are bad."""
    bad_check_min_samples: int = 20
    """Samples read from a shard before max_bad_fraction applies."""
    tiny_world: TinyWorldConfig | None = None
    """If set and shards_dir has no shards, generate tiny-world shards there."""
    vae_latents: bool = False
    """Train on the VAE posteriors cached in the shards (``python convert.py latents``) instead of running
    the VAE encoder on every target and reference image; a latent is still drawn from the posterior each
    step. Every sample must carry them, made at this image_size and size_unit by the model's VAE;
    otherwise training stops with a message saying how to make them."""


@dataclass
class LoraConfig:
    """LoRA on the VLM language model's linear layers (original SFT: r 64, alpha 128, dropout 0.05)."""

    rank: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear layer names inside the language model (the vision tower is never adapted)."""


@dataclass
class OptimConfig:
    """AdamW with decay only on >= 2-D tensors, linear warmup then cosine to zero."""

    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    eps: float = 1e-8
    warmup_ratio: float = 0.01
    """Fraction of max_steps spent in linear warmup (original: 1%)."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr (original: 0)."""


@dataclass
class PromptSetConfig:
    """One RL prompt set: where its prompts are, how often it is drawn, which rewards score it."""

    name: str = MISSING
    path: str = MISSING
    """A .txt (one prompt per line), .jsonl or .parquet file (``prompt`` or ``caption`` column; other
    fields are the sample's metadata, e.g. a tiny-world ``spec``), or a directory/glob of webdataset
    shards whose json records are read (images are skipped)."""
    category: str | None = None
    """Keep only records of this category (general, reasoning, text_rendering)."""
    weight: float = 1.0
    """Relative probability of drawing a prompt from this set (original: text rendering 3, others 1)."""
    rewards: dict[str, float] = field(default_factory=dict)
    """Reward name -> weight in this set's advantage (original text rendering: judge 0.2, clip 0.1, ocr 0.7)."""


@dataclass
class GRPOConfig:
    """MR-GRPO: SDE rollouts, PPO-clipped policy loss on a random subset of steps, velocity KL to a
    frozen copy of the DiT, per-reward group-normalised advantages, auxiliary SFT loss (original values)."""

    prompts_per_step: int = 4
    """Prompts per rank per optimiser step; each gets group_size images (original: 32 prompts over 8 GPUs)."""
    group_size: int = 8
    """Images per prompt sharing one initial noise (original rollout_n: 8)."""
    rollout_batch_size: int = 32
    """Images per rollout / update forward pass (original micro-batch: 32)."""
    same_noise: bool = True
    """All images of a group start from the same noise (original: True)."""
    num_steps: int = 50
    """SDE denoising steps per rollout (original: 50)."""
    sde: str = "cps"
    """cps (original default), flow_grpo or dance (deepgen/diffusion/sde.py)."""
    eta: float = 1.0
    """SDE noise level (original: 1.0)."""
    train_fraction: float = 0.6
    """int(num_steps * train_fraction) of the first num_steps - 1 steps are trained, drawn anew each
    optimiser step (original: 0.6, i.e. 30 of 49)."""
    cfg_scale: float = 0.0
    """Guidance in rollouts and updates; <= 1 uses the conditional branch only (original: 0)."""
    clip_range: float = 1e-4
    """PPO ratio clip (original: 1e-4)."""
    kl_beta: float = 5e-7
    """Weight of the velocity-space KL to the frozen reference DiT (original: 5e-7)."""
    adv_clip: float = 5.0
    """Advantages are clipped to +-adv_clip (original: 5)."""
    sft_aux_coef: float = 1e-4
    """lambda in (1 - lambda) GRPO + lambda SFT, the SFT loss on data.* batches (original: 1e-4)."""
    warmup_steps: int = 20
    """Linear warmup, then constant lr (original: 20)."""
    prompt_sets: list[PromptSetConfig] = field(default_factory=list)
    rewards: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Reward name -> constructor options (deepgen/rewards/); each reward used by a prompt set is built."""
    reward_workers: int = 0
    """Processes that compute rewards while the next rollout runs (0: in the training process)."""
    reward_retries: int = 2
    """Retries of a failed reward call before its samples are marked invalid."""
    eval_prompt_sets: list[PromptSetConfig] = field(default_factory=list)
    """Held-out prompt sets scored with ODE sampling and CFG at the start and end of the run."""
    eval_cfg_scale: float = 4.0
    """Guidance of held-out evaluation (original: 4.0)."""
    eval_rollout_sampler: bool = False
    """Also score the held-out prompts sampled as the rollouts are (SDE, num_steps, cfg_scale; metrics
    ``rollout/*``): the reward RL maximises, which ODE sampling need not follow (tiny world: it does not)."""
    eval_num_steps: int = 50
    eval_every_n_steps: int = 0
    """Also evaluate every N steps (0: only at the start and the end)."""
    log_images_every_n_steps: int = 10
    """Rollout grid (prompts, images, per-reward scores) to the run folder and W&B every N steps."""


@dataclass
class StageConfig:
    """One training stage: what trains, on which tasks, with which optimiser."""

    name: str = MISSING
    train_bridge: bool = True
    """Think tokens and the SCB bridge."""
    train_dit: bool = False
    """The full DiT."""
    lora: LoraConfig | None = None
    """LoRA on the VLM language model; None keeps the VLM fully frozen."""
    t2i_per_cycle: int = 2
    edit_per_cycle: int = 1
    """Single-task micro-batches in a repeating cycle (original SFT: 2 T2I then 1 edit)."""
    cfg_dropout: float = 0.1
    """Probability of an empty T2I caption, for classifier-free guidance (original: 0.1, T2I only)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    grpo: GRPOConfig | None = None
    """Set for stage grpo only."""


@dataclass
class TrainerConfig:
    """Loop length, clipping, checkpoint and logging cadence."""

    max_steps: int = 400_000
    grad_clip: float = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 1000
    keep_last_checkpoints: int = 3
    sample_every_n_steps: int = 0
    """Log a sample grid every N steps (0: only at the end)."""


@dataclass
class SamplingConfig:
    """ODE sampling for sample grids (original: 50 Euler steps, CFG 4.0-4.5)."""

    num_steps: int = 50
    cfg_scale: float = 4.0
    seed: int = 0
    prompts: list[str] = field(default_factory=list)
    """Captions for the T2I part of the sample grid."""
    num_edit_samples: int = 2
    """Editing samples (from the data stream) added to the grid."""


@dataclass
class ValidationConfig:
    """The tiny-world benchmark (what evaluate.py runs) as validation during training (stages/validation.py).

    Off by default: each run samples ``limit`` prompts of each of the six categories. Results go to
    ``<run>/validation/step_NNNNNN/`` and to the loggers as ``val/<category>/<metric>`` and
    ``val/overall/score|accuracy`` at the training step, so W&B and csv get curves.
    """

    every_n_steps: int = 0
    """Run every N optimiser steps (0: never periodically)."""
    at_start: bool = False
    """Also run before the first step: the starting point of the curves."""
    at_end: bool = False
    """Also run when training reaches max_steps (not when it stops early, e.g. on pre-emption)."""
    eval_dir: str = "${data.shards_dir}/eval"
    """Folder of the held-out ``<task>_<category>.jsonl`` files (default: the ``eval/`` folder written with
    the tiny-world shards)."""
    categories: list[str] = field(
        default_factory=lambda: [
            "t2i_general",
            "t2i_reasoning",
            "t2i_text_rendering",
            "edit_general",
            "edit_reasoning",
            "edit_text_rendering",
        ]
    )
    """Benchmark categories (deepgen/eval/benchmark.py); ``overall`` is their mean."""
    limit: int | None = 16
    """Prompts per category (the first N; None: all, 64 per category in the tiny world)."""
    num_steps: int = 20
    """Euler steps per image (evaluate.py's default is 50; 20 keeps validation cheap)."""
    cfg_scale: float = 4.0
    seed: int = 0
    """Sample i of a category uses seed + i at every validation: curves compare the same noise."""
    batch_size: int = 8
    """Prompts sampled together."""
    log_images: bool = True
    """Send one grid per category (``val/<category>/grid``) to loggers that take images (W&B)."""


@dataclass
class HardwareConfig:
    """Lightning accelerator settings."""

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    precision: str = "32-true"
    strategy: str = "auto"
    """A Lightning strategy name ("auto", "ddp", ...) or "fsdp2": parameters, gradients and AdamW
    state sharded over all processes (stages/parallel.py); bf16 sharding when precision is bf16-mixed."""
    torch_threads: int = 0
    """CPU threads for torch (0: leave torch's default)."""
    activation_checkpointing: bool = False
    """fsdp2: recompute VLM decoder layers, connector layers and DiT blocks in backward (less activation
    memory, about a third more compute)."""
    compile: bool = False
    """``torch.compile`` each VLM decoder layer, connector layer and DiT block on its own
    (stages/parallel.py compile_blocks); on in the GPU configs. The first steps are slower while
    the blocks compile."""
    compile_sampling: bool = False
    """Sampling (sample grids, validation, RL evaluation) and RL rollouts run each denoising step as one
    compiled graph, replayed as a CUDA graph (DeepGenBackbone.compile_sampling); on in the one-GPU config.
    Unsharded models only (strategy fsdp2 refuses it). Each new batch or image size compiles once."""
    reshard_after_forward: bool = True
    """fsdp2: free gathered block weights after forward and gather them again in backward (False:
    more memory, less communication)."""
    process_group_backend: str | None = None
    """torch.distributed backend (None: nccl on GPU, gloo on CPU)."""
    cluster: str = "auto"
    """auto: Lightning detects how processes were started (its own launcher, torchrun, SLURM);
    slurm: Lightning's SLURMEnvironment with the two settings below."""
    slurm_auto_requeue: bool = False
    """Lightning's own SLURM requeue. It saves a checkpoint inside the signal handler, mid-step, which
    can deadlock fsdp2: leave it off (the Preemption callback saves after the step)."""
    slurm_requeue_signal: str = "SIGUSR1"


@dataclass
class RunConfig:
    """The root of a training run's configuration."""

    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    loggers: dict[str, Any] = field(default_factory=dict)
    """Lightning loggers by name, each with a ``_target_`` (see conf/logger/)."""
    seed: int = 0
    output_dir: str = "outputs"
    """Runs go to <output_dir>/<stage>/<date>_<time>/."""
    init_from: str | None = None
    """A checkpoint directory of an earlier stage (align -> sft -> grpo) to start this stage's weights from."""
    resume: str | None = None
    """Continue an interrupted run: a checkpoint directory (``.../checkpoints/step_NNNNNN.ckpt``), or ``auto``
    for the newest checkpoint of this stage under output_dir (starts fresh when there is none). Restores
    weights, optimiser, schedule, step, random state and the exact data position."""
