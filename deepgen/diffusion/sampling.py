"""Deterministic Euler sampling of the probability-flow ODE, with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


def guided_velocity(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Single-scale CFG: v = v_u + s * (v_c - v_u); s = 1 gives the conditional velocity."""
    return v_uncond + scale * (v_cond - v_uncond)


def euler_sample(
    velocity: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Integrate dx/dsigma = v from sigmas[0] (noise) to sigmas[-1] (0): x <- x + (sigma' - sigma) * v.

    Args:
        velocity: ``(x, sigma)`` -> predicted velocity, sigma a 0-d tensor.
        x: initial noise at ``sigmas[0]``.
        sigmas: decreasing noise levels, ``num_steps + 1`` of them.
    """
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, sigmas[i])
        if progress is not None:
            progress(i)
    return x
