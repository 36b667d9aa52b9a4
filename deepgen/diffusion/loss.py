"""Rectified-flow (flow-matching) training objective of SD3 and DeepGen."""

from __future__ import annotations

from torch import Tensor


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_t = (1 - sigma) * x0 + sigma * noise, with ``sigma`` of shape ``[B]``."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def flow_matching_loss(velocity: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """Unweighted MSE to the velocity target ``noise - x0``: mean per sample in fp32, then over samples."""
    error = (velocity.float() - (noise.float() - x0.float())) ** 2
    return error.flatten(1).mean(dim=1).mean()
