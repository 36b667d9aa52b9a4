"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``) under Lightning.

``shard_backbone`` wraps the backbone block by block; ``FSDP2Strategy`` is Lightning's
``ModelParallelStrategy`` restricted to pure data parallelism, carrying the sharding options to
``StageModule.configure_model`` and writing the project's own checkpoint format (trainable weights
in safetensors, gathered to rank 0, through the ``CheckpointIO`` plugin) so that a checkpoint does
not depend on how many processes wrote it.

Units (each one all-gather / reduce-scatter), bottom-up:
  VLM decoder layers, vision-tower blocks, connector layers, DiT blocks (the repeated blocks:
  peak memory is one unsharded block at a time); then the vision tower, the bridge and the DiT
  (their embedders and heads); an untied ``lm_head`` alone (never called, so never gathered); and
  the backbone root (think tokens, token embeddings, final LM norm).

Frozen parameters: FSDP2 shards each parameter on its own (a DTensor per parameter, no flat
buffer), so a unit may mix frozen and trainable parameters (frozen base weights + LoRA in a decoder
layer, frozen embeddings + trainable think tokens in the root). Only parameters that received a
gradient are reduce-scattered; frozen ones are only all-gathered for forward. The frozen vision
tower is sharded like the rest (0.67 B parameters in the real model, run under ``no_grad``). The
VAE is left out of FSDP (``ignored_params``): it is frozen, small, and used through
``encode``/``decode`` rather than ``forward``, so every rank keeps a full replica and runs it
without any collective.
"""

from __future__ import annotations

import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from lightning.pytorch.strategies.parallel import ParallelStrategy
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from deepgen.config import HardwareConfig
from deepgen.model.backbone import DeepGenBackbone

# Backbone methods that use parameters of the root unit directly (think tokens, token embeddings)
# or are entry points into the DiT. FSDP only hooks ``forward``; the backbone has none.
ROOT_FORWARD_METHODS = ("encode_prompts", "velocity")


def repeated_blocks(backbone: DeepGenBackbone) -> list[nn.Module]:
    """The blocks that train and are checkpointed: VLM decoder layers, connector layers, DiT blocks."""
    return [
        *backbone.vlm.model.language_model.layers,
        *backbone.bridge.layers,
        *backbone.dit.transformer_blocks,
    ]


def compile_blocks(backbone: DeepGenBackbone, backend: str = "inductor") -> None:
    """``torch.compile`` each repeated block on its own, in place (parameter names do not change).

    Per block rather than the whole model: blocks of one kind share one compiled graph, the
    backbone's Python control flow (prompts, references, padding) stays eager, and the FSDP2 units
    wrap compiled blocks as in torchtitan (checkpointing, then compile, then ``fully_shard``).
    ``backend``: torch.compile's; "aot_eager" traces the same graphs without generating kernels.
    """
    for block in repeated_blocks(backbone):
        block.compile(backend=backend)


def is_sharded(backbone: nn.Module) -> bool:
    return isinstance(backbone, FSDPModule)


def shard_backbone(
    backbone: DeepGenBackbone,
    mesh: DeviceMesh,
    *,
    activation_checkpointing: bool,
    mixed_precision: bool,
    reshard_after_forward: bool = True,
    compile: bool = False,
) -> None:
    """Apply FSDP2 in place over the 1-D data-parallel ``mesh`` (after the trainable flags are set).

    With ``mixed_precision`` parameters are gathered and used in bf16, gradients reduced in fp32
    and the sharded master weights stay fp32; no autocast is needed. Units cast their floating
    inputs to bf16, except the root and the DiT: the DiT casts all but its timestep, which stays
    fp32 (bf16 would round t to steps of 4 near 1000 while the loss uses the exact sigma).

    Activation checkpointing uses the composable ``checkpoint`` (forward hooks): unlike
    ``checkpoint_wrapper`` it adds no wrapper module, so parameter names, ``trainable_names`` and
    checkpoint keys stay those of an unsharded run. ``compile``: see compile_blocks.
    """
    if is_sharded(backbone):
        raise RuntimeError("The backbone is already sharded")
    if mesh.ndim != 1:
        raise ValueError(f"shard_backbone needs a 1-D data-parallel mesh, got {mesh.ndim} dimensions")
    bf16, fp32 = torch.bfloat16, torch.float32
    cast = (
        MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    keep_inputs = (  # root and DiT: sigma/timestep stay fp32
        MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32, cast_forward_inputs=False)
        if mixed_precision
        else MixedPrecisionPolicy()
    )

    def shard(module: nn.Module, policy: MixedPrecisionPolicy, **kwargs: Any) -> None:
        fully_shard(module, mesh=mesh, mp_policy=policy, **kwargs)

    blocks = repeated_blocks(backbone)
    if activation_checkpointing:
        for block in blocks:
            checkpoint(block)
    if compile:
        compile_blocks(backbone)
    visual = backbone.vlm.model.visual
    for block in [*blocks, *visual.blocks]:
        shard(block, cast, reshard_after_forward=reshard_after_forward)
    shard(visual, cast, reshard_after_forward=reshard_after_forward)
    shard(backbone.bridge, cast, reshard_after_forward=reshard_after_forward)
    shard(backbone.dit, keep_inputs, reshard_after_forward=reshard_after_forward)
    if mixed_precision:
        backbone.dit.register_forward_pre_hook(_bf16_except_timestep, with_kwargs=True)
    lm_head = backbone.vlm.lm_head
    if lm_head.weight is not backbone.vlm.model.language_model.embed_tokens.weight:
        shard(lm_head, cast)  # untied (7B): its own unit, so the unused head is never gathered
    # The root keeps its parameters gathered from forward to backward (FSDP's default for a root).
    shard(backbone, keep_inputs, ignored_params=set(backbone.vae.parameters()))
    for name in ROOT_FORWARD_METHODS:
        register_fsdp_forward_method(backbone, name)


def _to_bf16(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(torch.bfloat16) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_bf16(v) for v in value)
    return value


def _bf16_except_timestep(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return _to_bf16(args), {k: v if k == "timestep" else _to_bf16(v) for k, v in kwargs.items()}


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as pure FSDP2 over all processes, with consolidated checkpoints.

    The mesh is ``(world_size, 1)`` (data parallel only). Checkpoints hold only the trainable
    weights, gathered to rank 0 and written by the ``CheckpointIO`` plugin (``SafeCheckpointIO``),
    with the optimizer state in the single-device layout (integer ids in optimizer order), so a
    checkpoint resumes on any number of processes, sharded or not. On load, rank 0 reads the
    checkpoint and broadcasts the tensors; the other ranks get the non-tensor state.
    """

    def __init__(
        self,
        *,
        activation_checkpointing: bool = False,
        mixed_precision: bool = False,
        reshard_after_forward: bool = True,
        compile: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.activation_checkpointing = activation_checkpointing
        self.mixed_precision = mixed_precision
        self.reshard_after_forward = reshard_after_forward
        self.compile = compile

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard(self, backbone: DeepGenBackbone) -> None:
        """Shard ``backbone`` with this strategy's options, once (called from ``configure_model``)."""
        if is_sharded(backbone):
            return
        shard_backbone(
            backbone,
            self.device_mesh["data_parallel"],
            activation_checkpointing=self.activation_checkpointing,
            mixed_precision=self.mixed_precision,
            reshard_after_forward=self.reshard_after_forward,
            compile=self.compile,
        )

    # ----------------------------------------------------------------------------- saving
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The checkpointed weights (the trainable ones), full, on rank 0; frozen ones are never gathered."""
        state = {}
        kept = set(self.lightning_module.checkpoint_names())
        with torch.no_grad():
            for name, param in self.lightning_module.named_parameters():
                if name not in kept:
                    continue
                full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
                if self.is_global_zero:
                    state[name] = full.cpu()
        return state

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        if not optimizer.state:  # before the first step: get_optimizer_state_dict would run a zero step
            return optimizer.state_dict() if self.is_global_zero else {}
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        by_name = get_optimizer_state_dict(self.lightning_module, optimizer, options=options)
        if not self.is_global_zero:
            return {}
        ids = {name: i for i, name in enumerate(self._optimizer_param_names(optimizer))}
        return {
            "state": {ids[name]: value for name, value in by_name["state"].items()},
            "param_groups": [{**g, "params": [ids[n] for n in g["params"]]} for g in by_name["param_groups"]],
        }

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        # ModelParallelStrategy refuses an existing directory; ours are directories replaced atomically.
        ParallelStrategy.save_checkpoint(self, checkpoint, self.broadcast(filepath), storage_options)

    # ---------------------------------------------------------------------------- loading
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        checkpoint = self.checkpoint_io.load_checkpoint(path) if self.is_global_zero else {}
        skeleton = self.broadcast(_without_tensors(checkpoint) if self.is_global_zero else None)
        set_model_state_dict(  # fills the dict it gets with every model key: give it a copy
            self.lightning_module,
            dict(checkpoint.get("state_dict", {})),
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False),
        )
        saved_optimizers = checkpoint.get("optimizer_states", [{}] * len(self.optimizers))
        for optimizer, saved in zip(self.optimizers, saved_optimizers, strict=True):
            by_name = {}
            if self.is_global_zero:
                names = self._optimizer_param_names(optimizer)
                by_name = {
                    "state": {names[i]: value for i, value in saved["state"].items()},
                    "param_groups": [
                        {**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]
                    ],
                }
            set_optimizer_state_dict(
                self.lightning_module,
                optimizer,
                by_name,
                # strict=False: parameters that never had a gradient have no AdamW state (as unsharded)
                options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False),
            )
        return checkpoint if self.is_global_zero else skeleton

    def _optimizer_param_names(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """Parameter names in the optimizer's order: the ids of a single-device optimizer state."""
        names = {id(p): n for n, p in self.lightning_module.named_parameters()}
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _without_tensors(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What ranks other than 0 need: the loop/scheduler/callback state, and the weight names and
    shapes (as meta tensors, for hooks that check the key set). Weights arrive by broadcast."""
    rest = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
    rest["state_dict"] = {
        k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in checkpoint["state_dict"].items()
    }
    return rest


def shard_for_strategy(backbone: DeepGenBackbone, strategy: Strategy) -> None:
    """``configure_model``'s sharding step: the strategy gave a device mesh, so it must be ours."""
    if not isinstance(strategy, FSDP2Strategy):
        raise TypeError(
            f"{type(strategy).__name__} gives a device mesh but deepgen shards only with FSDP2Strategy "
            "(hardware.strategy=fsdp2); tensor parallelism is not supported"
        )
    strategy.shard(backbone)


def make_strategy(hardware: HardwareConfig) -> str | FSDP2Strategy:
    """The Trainer's strategy: ``hardware.strategy`` as given, or an ``FSDP2Strategy`` for "fsdp2"."""
    if hardware.strategy != "fsdp2":
        return hardware.strategy
    return FSDP2Strategy(
        activation_checkpointing=hardware.activation_checkpointing,
        mixed_precision=hardware.precision == "bf16-mixed",
        reshard_after_forward=hardware.reshard_after_forward,
        compile=hardware.compile,
        process_group_backend=hardware.process_group_backend,
    )


def cluster_plugins(hardware: HardwareConfig) -> list[ClusterEnvironment]:
    """Trainer plugins for ``hardware.cluster``: none for "auto" (Lightning detects torchrun, SLURM, ...)."""
    if hardware.cluster == "auto":
        return []
    if hardware.cluster == "slurm":
        requeue_signal = signal.Signals[hardware.slurm_requeue_signal]
        return [SLURMEnvironment(auto_requeue=hardware.slurm_auto_requeue, requeue_signal=requeue_signal)]
    raise ValueError(f"hardware.cluster={hardware.cluster!r}: expected 'auto' or 'slurm'")
