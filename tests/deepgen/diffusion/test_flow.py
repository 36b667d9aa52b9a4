import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from deepgen.diffusion.loss import add_noise, flow_matching_loss
from deepgen.diffusion.sampling import euler_sample, guided_velocity
from deepgen.diffusion.schedule import inference_sigmas, sample_train_sigmas, train_sigma_table


def scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def test_train_table_is_the_shift_3_schedule():
    table = train_sigma_table(scheduler())
    s = torch.linspace(1, 1 / 1000, 1000, dtype=torch.float64)
    torch.testing.assert_close(table.double(), 3 * s / (1 + 2 * s), atol=1e-6, rtol=0)


def test_training_sigmas_come_from_the_table_and_favour_high_noise():
    table = train_sigma_table(scheduler())
    sigmas = sample_train_sigmas(table, 20000, torch.Generator().manual_seed(0))
    assert torch.isin(sigmas, table).all()
    assert 0.6 < sigmas.mean() < 0.7  # E[3s/(1+2s)] for s ~ U(0,1) = 0.65


def test_inference_sigmas_match_set_timesteps_and_end_at_zero():
    sched = scheduler()
    sigmas = inference_sigmas(sched, 10)
    sched.set_timesteps(10)
    torch.testing.assert_close(sigmas, sched.sigmas.float())
    assert sigmas[0] == 1 and sigmas[-1] == 0 and len(sigmas) == 11


def test_loss_targets_noise_minus_x0():
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    xt = add_noise(x0, noise, sigma)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], noise[2])
    assert flow_matching_loss(noise - x0, x0, noise) == 0
    assert torch.isclose(flow_matching_loss(noise - x0 + 2, x0, noise), torch.tensor(4.0))


def test_euler_sampler_matches_the_diffusers_scheduler_loop():
    torch.manual_seed(0)
    weight = torch.randn(4, 4) * 0.3

    def velocity(x, sigma):
        return torch.tanh(x @ weight) * (1 + sigma)

    x = torch.randn(2, 4)
    sched = scheduler()
    sched.set_timesteps(8)
    ref = x.clone()
    for t, sigma in zip(sched.timesteps, sched.sigmas[:-1], strict=True):
        ref = sched.step(velocity(ref, sigma), t, ref).prev_sample
    ours = euler_sample(velocity, x, inference_sigmas(scheduler(), 8))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_guidance_scale_one_is_the_conditional_velocity():
    vc, vu = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(guided_velocity(vc, vu, 1.0), vc)
    torch.testing.assert_close(guided_velocity(vc, vu, 0.0), vu)
    torch.testing.assert_close(guided_velocity(vc, vu, 4.0), vu + 4 * (vc - vu))
