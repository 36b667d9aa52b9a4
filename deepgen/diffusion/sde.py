"""Stochastic (SDE) denoising steps with per-sample log-probabilities, for GRPO-style RL.

Conventions (as in ``loss.py`` / ``sampling.py``): ``x_t = (1 - sigma) x0 + sigma * noise``, the model predicts
``v = noise - x0``, and a deterministic Euler step is ``x' = x + (sigma' - sigma) v``. A step goes from
``sigma`` to ``sigma' < sigma``; ``dt = sigma' - sigma < 0``; ``eta`` is the noise level. Every quantity is
computed in float32 whatever the input dtype. Each kind defines a Gaussian ``x' ~ N(mean, std^2 I)``:

* ``cps`` (coefficients-preserving; the original's default). ``x0_hat = x - sigma v`` and
  ``x1_hat = x + (1 - sigma) v`` are the implied data and noise. ``std = sigma' sin(eta pi / 2)``,
  ``mean = (1 - sigma') x0_hat + sqrt(sigma'^2 - std^2) x1_hat``: the total noise coefficient stays sigma', split
  between the predicted noise and fresh noise. At eta = 1 the ``x1_hat`` term vanishes (full re-noising of the
  x0 prediction). ``kl_std = std``.
* ``flow_grpo``. ``s = eta sqrt(sigma / (1 - sigma))``, where, in the denominator only, sigma = 1 is replaced by
  ``sigma_max_sub`` (the original uses the scheduler's second sigma, ``sigmas[1]``; ``sde_rollout`` does this
  automatically). ``mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt``,
  ``std = s sqrt(-dt)``, ``kl_std = s`` (no ``sqrt(-dt)``, as the original's KL denominator).
* ``dance``. ``x0_hat = x - sigma v``; ``std = eta sqrt(-dt)``;
  ``mean = x + (v + eta^2 (x - (1 - sigma) x0_hat) / (2 sigma^2)) dt``; ``kl_std = std``. (The original adds
  1e-8 to sigma^2; sigma > 0 on every step, so it is left out here.)

flow_grpo and dance are Euler-Maruyama discretisations of the same family of reverse SDEs (the drift correction is
``-(g^2 / 2) * score`` with the score estimated as ``-x1_hat / sigma``); cps is exact for a point-mass x0
prediction. With eta = 0 all three reduce to the Euler ODE step.

Log-probabilities, one number per sample (``[B]``), always of a *detached* ``x'`` as a function of ``mean``:

* ``"gaussian"``: the mean over latent dims of ``log N(x'; mean, std^2)``
  = ``-(x' - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)``. Default for flow_grpo and dance (as the original).
* ``"cps_simplified"``: ``-mean((x' - mean)^2)``, no variance normalisation and no constants. Default for cps,
  as the original. It is not a density: ``exp(lp_new - lp_old)`` differs from the Gaussian ratio, whose exponent
  carries the extra factor ``1 / (2 std^2)`` (at eta = 1, std = sigma', i.e. a per-step scale); PPO clipping
  ranges tuned for one form do not transfer to the other.

Degenerate steps (``std == 0``: cps at sigma' = 0, or any kind at eta = 0) are deterministic; ``"gaussian"``
defines their log-prob as 0 (the density is a point mass) rather than the original's ``eps``-regularised value, so
it is never NaN/inf and carries no gradient; GRPO should not train such steps (the trainer skips the last one by
default). Note that flow_grpo and dance keep ``std > 0`` at sigma' = 0 (their formulas depend on dt, not sigma'),
so their last step is stochastic, as in the original.

Old and new log-probs are bitwise equal when recomputed with the same velocity and the stored float32 ``x'``
(store ``prev_sample`` in float32, not bf16).

The "v-based" KL of the original, ``velocity_kl``: mean over dims of ``(v_policy - v_ref)^2 / (2 kl_std^2 + 1e-7)``
(``kl_std`` = 0 at cps' last step makes it blow up; exclude that step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

SDE_KINDS = ("cps", "flow_grpo", "dance")
LOGPROB_KINDS = ("gaussian", "cps_simplified")
DEFAULT_LOGPROB = {"cps": "cps_simplified", "flow_grpo": "gaussian", "dance": "gaussian"}
KL_EPS = 1e-7
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class SDEStep:
    """One SDE step: ``prev_sample ~ N(mean, std^2)``; shapes ``[B, ...]`` or ``[B]``, float32."""

    prev_sample: Tensor  # x at sigma_next, [B, ...]
    log_prob: Tensor  # [B], log-density (or the simplified cps score) of prev_sample under this step
    mean: Tensor  # [B, ...] the step mean
    std: Tensor  # [B] noise std of the step actually applied to x
    kl_std: Tensor  # [B] the std the original uses in the velocity-KL denominator


def _per_sample(value: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """A scalar or ``[B]`` value as a float32 ``[B]`` tensor."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` to broadcast against ``like``."""
    return t.view(-1, *([1] * (like.ndim - 1)))


def _mean_over_dims(t: Tensor) -> Tensor:
    return t.mean(dim=tuple(range(1, t.ndim))) if t.ndim > 1 else t


def _step_moments(
    kind: str,
    v: Tensor,
    x: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    eta: float,
    sigma_max_sub: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(mean [B, ...], std [B], kl_std [B]) of one step; all inputs float32, sigmas ``[B]``."""
    s, s_next = _bcast(sigma, x), _bcast(sigma_next, x)
    minus_dt = (sigma - sigma_next).clamp(min=0)  # -dt >= 0, [B]
    if kind == "cps":
        std = sigma_next * math.sin(eta * math.pi / 2)
        x0_hat = x - s * v
        x1_hat = x + (1 - s) * v
        keep = (sigma_next.square() - std.square()).clamp(min=0).sqrt()
        mean = (1 - s_next) * x0_hat + _bcast(keep, x) * x1_hat
        return mean, std, std
    if kind == "flow_grpo":
        if eta == 0:
            level = torch.zeros_like(sigma)
        else:
            denom_sigma = sigma
            if sigma_max_sub is not None:
                denom_sigma = torch.where(sigma >= 1, torch.full_like(sigma, sigma_max_sub), sigma)
            elif bool((sigma >= 1).any()):
                raise ValueError("flow_grpo at sigma = 1 needs sigma_max_sub (the original uses sigmas[1])")
            level = eta * (sigma / (1 - denom_sigma)).sqrt()
        lv2, dt = _bcast(level.square(), x), -_bcast(minus_dt, x)
        mean = x * (1 + lv2 * dt / (2 * s)) + v * (1 + lv2 * (1 - s) / (2 * s)) * dt
        return mean, level * minus_dt.sqrt(), level
    if kind == "dance":
        std = eta * minus_dt.sqrt()
        x0_hat = x - s * v
        dt = -_bcast(minus_dt, x)
        mean = x + (v + 0.5 * eta**2 * (x - (1 - s) * x0_hat) / s.square()) * dt
        return mean, std, std
    raise ValueError(f"unknown SDE kind {kind!r}; expected one of {SDE_KINDS}")


def step_log_prob(prev_sample: Tensor, mean: Tensor, std: Tensor, logprob: str) -> Tensor:
    """``[B]`` log-prob of ``prev_sample`` (detached) under ``N(mean, std^2)``, see the module docstring."""
    diff = prev_sample.detach() - mean
    if logprob == "cps_simplified":
        return -_mean_over_dims(diff.square())
    if logprob != "gaussian":
        raise ValueError(f"unknown logprob {logprob!r}; expected one of {LOGPROB_KINDS}")
    positive = std > 0
    safe = torch.where(positive, std, torch.ones_like(std))
    per_dim = -diff.square() / (2 * _bcast(safe, diff).square()) - _bcast(safe.log(), diff) - _HALF_LOG_2PI
    return torch.where(positive, _mean_over_dims(per_dim), torch.zeros_like(std))


def sde_step(
    kind: str,
    velocity: Tensor,
    x: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    *,
    eta: float = 1.0,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    logprob: str | None = None,
    sigma_max_sub: float | None = None,
) -> SDEStep:
    """One stochastic step from ``sigma`` to ``sigma_next`` with the log-prob of its outcome.

    Args:
        kind: one of ``SDE_KINDS``.
        velocity: model output ``v`` at ``(x, sigma)``, ``[B, ...]``.
        x: current latents ``[B, ...]``.
        sigma, sigma_next: ``[B]`` or scalar noise levels.
        eta: noise level (0 = Euler ODE step).
        prev_sample: if given, the log-prob is of this sample and no noise is drawn (recomputation).
        generator, noise: otherwise ``prev_sample = mean + std * noise`` with ``noise`` if given, else drawn
            from ``generator``.
        logprob: ``"gaussian"`` or ``"cps_simplified"``; None = the original's choice for ``kind``.
        sigma_max_sub: flow_grpo only, replaces sigma = 1 in ``1 - sigma`` (pass ``sigmas[1]``).
    """
    if prev_sample is not None and noise is not None:
        raise ValueError("pass either prev_sample or noise, not both")
    logprob = DEFAULT_LOGPROB.get(kind, "gaussian") if logprob is None else logprob
    x32, v32 = x.float(), velocity.float()
    batch = x32.shape[0]
    sigma_b = _per_sample(sigma, batch, x32.device)
    sigma_next_b = _per_sample(sigma_next, batch, x32.device)
    mean, std, kl_std = _step_moments(kind, v32, x32, sigma_b, sigma_next_b, eta, sigma_max_sub)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x32.shape, generator=generator, device=x32.device, dtype=torch.float32)
        prev_sample = mean + _bcast(std, mean) * noise.float()
    else:
        prev_sample = prev_sample.float()
    log_prob = step_log_prob(prev_sample, mean, std, logprob)
    return SDEStep(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std, kl_std=kl_std)


def velocity_kl(v_policy: Tensor, v_ref: Tensor, kl_std: Tensor | float) -> Tensor:
    """The original's "v-based" KL, ``[B]``: mean over dims of ``(v_p - v_r)^2 / (2 kl_std^2 + 1e-7)``."""
    sq = _mean_over_dims((v_policy.float() - v_ref.float()).square())
    kl_std_b = _per_sample(kl_std, sq.shape[0], sq.device)
    return sq / (2 * kl_std_b.square() + KL_EPS)


def sde_rollout(
    velocity_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor,
    kind: str,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    logprob: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the whole SDE trajectory, keeping every state and step log-prob (float32).

    Args:
        velocity_fn: ``(x, sigma)`` -> velocity, sigma a 0-d tensor (as ``euler_sample``).
        x: initial noise at ``sigmas[0]``, ``[B, ...]``.
        sigmas: ``T + 1`` decreasing noise levels (flow_grpo uses ``sigmas[1]`` as ``sigma_max_sub``).

    Returns:
        ``latents [T + 1, B, ...]`` (``latents[0]`` = x) and ``log_probs [T, B]``. Call under ``torch.no_grad()``
        for rollouts.
    """
    sigmas = sigmas.float()
    sub = float(sigmas[1]) if kind == "flow_grpo" and len(sigmas) > 1 else None
    x = x.float()
    latents, log_probs = [x], []
    for i in range(len(sigmas) - 1):
        out = sde_step(
            kind,
            velocity_fn(x, sigmas[i]),
            x,
            sigmas[i],
            sigmas[i + 1],
            eta=eta,
            generator=generator,
            logprob=logprob,
            sigma_max_sub=sub,
        )
        x = out.prev_sample
        latents.append(x)
        log_probs.append(out.log_prob)
    return torch.stack(latents), torch.stack(log_probs) if log_probs else x.new_zeros(0, x.shape[0])
