"""Noise levels of rectified flow, read from the model's own diffusers scheduler.

Reading them from ``FlowMatchEulerDiscreteScheduler`` (rather than re-deriving the shift formula)
keeps training and sampling consistent with whatever scheduler config the weights ship with.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor


def train_sigma_table(scheduler: FlowMatchEulerDiscreteScheduler) -> Tensor:
    """The scheduler's training sigmas (1000 for SD3: sigma = shift*s / (1 + (shift-1)*s), s in (0, 1])."""
    fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    return fresh.sigmas.float().clone()


def sample_train_sigmas(table: Tensor, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform index into the shifted table, as the original (weighting 'none'): biased toward high noise."""
    u = torch.rand(batch_size, generator=generator, device=table.device)
    index = (u * len(table)).long().clamp(max=len(table) - 1)
    return table[index]


def inference_sigmas(scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int) -> Tensor:
    """``num_steps + 1`` decreasing sigmas ending at 0 for Euler sampling, from ``set_timesteps``."""
    fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    fresh.set_timesteps(num_steps)
    return fresh.sigmas.float().clone()


def sigma_to_timestep(sigma: Tensor, scheduler: FlowMatchEulerDiscreteScheduler) -> Tensor:
    """The DiT's timestep input: sigma on the 0..num_train_timesteps scale."""
    return sigma * scheduler.config.num_train_timesteps
