import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from deepgen.diffusion.sampling import euler_sample
from deepgen.diffusion.schedule import inference_sigmas
from deepgen.diffusion.sde import DEFAULT_LOGPROB, SDE_KINDS, sde_rollout, sde_step, velocity_kl


def _inputs(batch: int = 4, shape: tuple[int, ...] = (3, 5, 5), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g)
    v = torch.randn(batch, *shape, generator=g)
    sigma = torch.rand(batch, generator=g) * 0.8 + 0.15  # (0.15, 0.95)
    sigma_next = sigma * (torch.rand(batch, generator=g) * 0.8 + 0.1)
    return x, v, sigma, sigma_next


def _bc(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.ndim - 1)))


def _reference_moments(kind, v, x, sigma, sigma_next, eta):
    """Formulas of the reference (6.3), written out independently of the module."""
    s, sn = _bc(sigma, x), _bc(sigma_next, x)
    dt = sn - s
    if kind == "cps":
        std = sn * math.sin(eta * math.pi / 2)
        mean = (1 - sn) * (x - s * v) + torch.sqrt(sn**2 - std**2) * (x + (1 - s) * v)
        return mean, std.flatten()
    if kind == "flow_grpo":
        lv = eta * torch.sqrt(s / (1 - s))
        mean = x * (1 + lv**2 * dt / (2 * s)) + v * (1 + lv**2 * (1 - s) / (2 * s)) * dt
        return mean, (lv * torch.sqrt(-dt)).flatten()
    x0_hat = x - s * v
    mean = x + (v + 0.5 * eta**2 * (x - (1 - s) * x0_hat) / s**2) * dt
    return mean, (eta * torch.sqrt(-dt)).flatten()


@pytest.mark.parametrize("kind", SDE_KINDS)
def test_eta_zero_is_the_euler_step(kind):
    x, v, sigma, sigma_next = _inputs()
    out = sde_step(kind, v, x, sigma, sigma_next, eta=0.0, generator=torch.Generator().manual_seed(1))
    euler = x + _bc(sigma_next - sigma, x) * v
    torch.testing.assert_close(out.prev_sample, euler, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.mean, euler, atol=1e-6, rtol=0)
    assert (out.std == 0).all() and torch.isfinite(out.log_prob).all()


@pytest.mark.parametrize("kind", SDE_KINDS)
def test_eta_zero_rollout_is_euler_sample(kind):
    sigmas = inference_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), 8)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))

    def velocity(z, sigma):
        return 0.5 * z - 0.3 * sigma + torch.tanh(z)

    latents, log_probs = sde_rollout(velocity, x, sigmas, kind, eta=0.0)
    assert latents.shape == (9, 2, 4, 3, 3) and log_probs.shape == (8, 2)
    torch.testing.assert_close(latents[0], x)
    torch.testing.assert_close(latents[-1], euler_sample(velocity, x, sigmas), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", SDE_KINDS)
@pytest.mark.parametrize("logprob", [None, "gaussian", "cps_simplified"])
def test_recomputation_gives_identical_log_prob(kind, logprob):
    x, v, sigma, sigma_next = _inputs()
    out = sde_step(
        kind, v, x, sigma, sigma_next, eta=0.7, generator=torch.Generator().manual_seed(2), logprob=logprob
    )
    again = sde_step(kind, v, x, sigma, sigma_next, eta=0.7, prev_sample=out.prev_sample, logprob=logprob)
    assert torch.equal(again.log_prob, out.log_prob)
    assert torch.equal(torch.exp(again.log_prob - out.log_prob), torch.ones(4))
    assert torch.equal(again.prev_sample, out.prev_sample)


@pytest.mark.parametrize("kind", SDE_KINDS)
def test_gaussian_log_prob_matches_torch_normal(kind):
    x, v, sigma, sigma_next = _inputs(seed=3)
    out = sde_step(
        kind, v, x, sigma, sigma_next, eta=0.8, generator=torch.Generator().manual_seed(4), logprob="gaussian"
    )
    other = out.prev_sample + 0.1 * torch.randn_like(x)  # off-mean sample, as after a policy update
    lp = sde_step(kind, v, x, sigma, sigma_next, eta=0.8, prev_sample=other, logprob="gaussian").log_prob
    expected = torch.distributions.Normal(out.mean, _bc(out.std, x)).log_prob(other).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lp, expected, atol=1e-5, rtol=1e-6)


def test_default_log_prob_per_kind_and_simplified_form():
    assert DEFAULT_LOGPROB == {"cps": "cps_simplified", "flow_grpo": "gaussian", "dance": "gaussian"}
    x, v, sigma, sigma_next = _inputs(seed=5)
    out = sde_step("cps", v, x, sigma, sigma_next, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(out.log_prob, -((out.prev_sample - out.mean) ** 2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("kind", SDE_KINDS)
def test_mean_std_match_reference_formulas_and_samples(kind):
    x, v, sigma, sigma_next = _inputs(batch=3, shape=(200_000,), seed=7)
    eta = 0.6
    out = sde_step(kind, v, x, sigma, sigma_next, eta=eta, generator=torch.Generator().manual_seed(8))
    mean, std = _reference_moments(kind, v, x, sigma, sigma_next, eta)
    torch.testing.assert_close(out.mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.std, std, atol=1e-6, rtol=1e-5)
    resid = out.prev_sample - out.mean  # 200k draws per sample
    torch.testing.assert_close(resid.mean(dim=1), torch.zeros(3), atol=4e-3 * float(std.max()), rtol=0)
    torch.testing.assert_close(resid.std(dim=1), std, atol=0, rtol=1e-2)


def test_kl_std_per_kind():
    x, v, sigma, sigma_next = _inputs(seed=9)
    for kind in ("cps", "dance"):
        out = sde_step(kind, v, x, sigma, sigma_next, eta=0.5, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out.kl_std, out.std)
    out = sde_step("flow_grpo", v, x, sigma, sigma_next, eta=0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.kl_std, 0.5 * torch.sqrt(sigma / (1 - sigma)))
    torch.testing.assert_close(out.std, out.kl_std * torch.sqrt(sigma - sigma_next))


def test_cps_eta_one_fully_renoises_x0_prediction():
    x, v, sigma, sigma_next = _inputs(seed=10)
    out = sde_step("cps", v, x, sigma, sigma_next, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.std, sigma_next)
    torch.testing.assert_close(out.mean, (1 - _bc(sigma_next, x)) * (x - _bc(sigma, x) * v), atol=0, rtol=0)


def test_cps_preserves_the_marginal_of_a_point_mass():
    # x0 fixed, x_sigma = (1 - sigma) x0 + sigma eps; the exact velocity is (x - x0) / sigma.
    g = torch.Generator().manual_seed(11)
    n, sigma, sigma_next = 400_000, 0.8, 0.3
    x0 = torch.tensor([1.5])
    x = (1 - sigma) * x0 + sigma * torch.randn(n, 1, generator=g)
    out = sde_step("cps", (x - x0) / sigma, x, sigma, sigma_next, eta=0.7, generator=g)
    assert abs(out.prev_sample.mean() - (1 - sigma_next) * x0) < 3e-3
    assert abs(out.prev_sample.std() - sigma_next) < 3e-3


def test_flow_grpo_first_step_uses_sigma_max_sub():
    x, v, _, _ = _inputs(seed=12)
    one, nxt = torch.ones(4), torch.full((4,), 0.95)
    with pytest.raises(ValueError, match="sigma_max_sub"):
        sde_step("flow_grpo", v, x, one, nxt, generator=torch.Generator().manual_seed(0))
    out = sde_step(
        "flow_grpo", v, x, one, nxt, sigma_max_sub=0.99, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(out.kl_std, torch.full((4,), math.sqrt(1 / 0.01)))
    assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.log_prob).all()


@pytest.mark.parametrize("kind", SDE_KINDS)
def test_last_step_is_finite(kind):
    x, v, sigma, _ = _inputs(seed=13)
    zero = torch.zeros(4)
    a = sde_step(kind, v, x, sigma, zero, generator=torch.Generator().manual_seed(0))
    b = sde_step(kind, v, x, sigma, zero, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(a.log_prob).all() and torch.isfinite(a.prev_sample).all()
    if kind == "cps":  # std = sigma' sin(.) = 0: deterministic, lands on the x0 prediction
        assert torch.equal(a.prev_sample, b.prev_sample) and (a.std == 0).all()
        torch.testing.assert_close(a.prev_sample, x - _bc(sigma, x) * v)
        assert torch.equal(a.log_prob, torch.zeros(4))
        gauss = sde_step(kind, v, x, sigma, zero, prev_sample=a.prev_sample + 1, logprob="gaussian")
        assert torch.equal(gauss.log_prob, torch.zeros(4))


def test_scalar_sigmas_broadcast_and_output_is_fp32():
    x, v, _, _ = _inputs(seed=14)
    for kind in SDE_KINDS:
        noise = torch.randn_like(x)
        scalar = sde_step(kind, v.bfloat16(), x.bfloat16(), torch.tensor(0.6), 0.4, noise=noise)
        batched = sde_step(
            kind, v.bfloat16(), x.bfloat16(), torch.full((4,), 0.6), torch.full((4,), 0.4), noise=noise
        )
        for field in ("prev_sample", "log_prob", "mean", "std", "kl_std"):
            a, b = getattr(scalar, field), getattr(batched, field)
            assert a.dtype == torch.float32 and torch.equal(a, b), field
        assert scalar.std.shape == (4,) and scalar.log_prob.shape == (4,)


def test_rollout_is_reproducible_and_its_log_probs_recompute():
    sigmas = inference_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), 6)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))

    def velocity(z, sigma):
        return 0.5 * z - 0.3 * sigma

    for kind in SDE_KINDS:
        lat, lp = sde_rollout(velocity, x, sigmas, kind, 1.0, torch.Generator().manual_seed(5))
        lat2, lp2 = sde_rollout(velocity, x, sigmas, kind, 1.0, torch.Generator().manual_seed(5))
        assert torch.equal(lat, lat2) and torch.equal(lp, lp2)
        assert torch.isfinite(lp).all() and torch.isfinite(lat).all()
        sub = float(sigmas[1])
        for i in range(len(sigmas) - 1):
            again = sde_step(
                kind,
                velocity(lat[i], sigmas[i]),
                lat[i],
                sigmas[i],
                sigmas[i + 1],
                prev_sample=lat[i + 1],
                sigma_max_sub=sub,
            )
            assert torch.equal(again.log_prob, lp[i])


def test_velocity_kl():
    v = torch.randn(3, 2, 4)
    assert torch.equal(velocity_kl(v, v, torch.tensor([0.5, 1.0, 0.0])), torch.zeros(3))
    v_ref = v.clone()
    v_ref[0] += 1.0  # squared difference 1 everywhere for sample 0
    v_ref[1, 0] += 2.0  # 4 on half the entries of sample 1 -> mean 2
    kl = velocity_kl(v, v_ref, torch.tensor([0.5, 2.0, 1.0]))
    torch.testing.assert_close(kl, torch.tensor([1 / (2 * 0.25 + 1e-7), 2 / (2 * 4 + 1e-7), 0.0]))
    torch.testing.assert_close(velocity_kl(v, v_ref, 0.5)[0], torch.tensor(1 / (0.5 + 1e-7)))


@pytest.mark.parametrize("kind", SDE_KINDS)
@pytest.mark.parametrize("logprob", ["gaussian", "cps_simplified"])
def test_log_prob_gradients_are_finite_including_degenerate_steps(kind, logprob):
    x, v, sigma, sigma_next = _inputs(seed=15)
    stored = sde_step(kind, v, x, sigma, sigma_next, generator=torch.Generator().manual_seed(0)).prev_sample
    for target, eta in ((sigma_next, 1.0), (torch.zeros(4), 1.0), (sigma_next, 0.0)):
        v_grad = v.clone().requires_grad_(True)
        out = sde_step(kind, v_grad, x, sigma, target, eta=eta, prev_sample=stored, logprob=logprob)
        out.log_prob.sum().backward()
        assert torch.isfinite(out.log_prob).all() and torch.isfinite(v_grad.grad).all()


def test_prev_sample_and_noise_are_exclusive():
    x, v, sigma, sigma_next = _inputs()
    with pytest.raises(ValueError, match="not both"):
        sde_step("cps", v, x, sigma, sigma_next, prev_sample=x, noise=torch.randn_like(x))
    with pytest.raises(ValueError, match="unknown SDE kind"):
        sde_step("ddpm", v, x, sigma, sigma_next)
