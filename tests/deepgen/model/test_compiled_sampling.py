"""compile_sampling (hardware.compile_sampling): sampling and rollouts through one compiled denoising step
give the eager results, and prompts of other lengths reuse the compiled graph. The tests trace with
"aot_eager" (the graph inductor would compile, without generating kernels); CUDA graphs need a GPU."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from deepgen.diffusion.schedule import inference_sigmas
from deepgen.diffusion.sde import sde_rollout
from deepgen.model.backbone import DeepGenBackbone
from stages.parallel import compile_blocks
from tests.conftest import perturb

SHORT = "a red circle"
LONG = "a large blue square to the left of a green triangle"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo counts compiled variants per code object for the whole process, and other tests compile
    the same method: each test here starts with none (otherwise the recompile limit turns it eager)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def backbone(tiny_model_cfg):
    torch.manual_seed(0)
    bb = DeepGenBackbone.from_pretrained_dirs(tiny_model_cfg).eval().requires_grad_(False)
    return perturb(bb, seed=1, prefixes=("bridge.", "think_tokens", "dit."))


def sample(bb, captions, refs=None, cfg_scale=4.0):
    gen = torch.Generator().manual_seed(3)
    if refs is None:
        cond, uncond = bb.condition_t2i(captions), bb.condition_t2i([""] * len(captions))
        ref_latents = None
    else:
        cond, uncond = bb.condition_edit(captions, refs), bb.condition_edit([""] * len(captions), refs)
        torch.manual_seed(7)  # the references' latents are drawn from the VAE posterior
        ref_latents = bb.encode_references(refs)
    with torch.no_grad():
        return bb.sample(
            cond, uncond, 32, 32, ref_latents=ref_latents, num_steps=4, cfg_scale=cfg_scale, generator=gen
        )


def rollout(bb, captions):
    cond = bb.condition_t2i(captions)
    x = torch.randn((len(captions), *bb.latent_shape(32, 32)), generator=torch.Generator().manual_seed(4))
    sigmas = inference_sigmas(bb.scheduler, 4)
    with torch.no_grad():
        return sde_rollout(
            bb.guided_velocity_fn(cond), x, sigmas, "cps", 1.0, torch.Generator().manual_seed(5)
        )


def test_compiled_sampling_and_rollouts_match_eager(backbone):
    refs = [[torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1]] * 2
    eager = (
        sample(backbone, [SHORT, LONG]),
        sample(backbone, [SHORT, LONG], refs),
        *rollout(backbone, [SHORT, LONG]),
    )
    assert eager[0].abs().mean() > 0.05  # a real picture, not a constant
    backbone.compile_sampling(backend="aot_eager", mode=None, pad_multiple=16)
    compiled = (
        sample(backbone, [SHORT, LONG]),
        sample(backbone, [SHORT, LONG], refs),
        *rollout(backbone, [SHORT, LONG]),
    )
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_one_graph_per_shape_and_other_prompt_lengths_reuse_it(backbone):
    counter = CompileCounter()  # counts graphs: a graph break inside the DiT would count two
    backbone.compile_sampling(backend=counter, mode=None, pad_multiple=64)
    lengths = [backbone.condition_t2i([c]).seq.shape[1] for c in (SHORT, LONG)]
    assert lengths[0] != lengths[1]  # two lengths, one padded length
    sample(backbone, [SHORT])
    sample(backbone, [LONG])
    assert counter.frame_count == 1
    sample(backbone, [SHORT, LONG])  # a new batch size compiles once more
    assert counter.frame_count == 2
    sample(backbone, [SHORT, LONG], refs=[[torch.zeros(3, 32, 32)]] * 2)  # and so do reference latents
    assert counter.frame_count == 3


def test_grad_and_other_dits_stay_eager(backbone):
    counter = CompileCounter()
    backbone.compile_sampling(backend=counter, mode=None)
    cond = backbone.condition_t2i([SHORT])
    x = torch.randn((1, *backbone.latent_shape(32, 32)))
    sigma = torch.tensor(0.5)
    backbone.dit.requires_grad_(True)
    v = backbone.guided_velocity_fn(cond)(x, sigma)  # an RL update: gradients through the eager DiT
    v.square().mean().backward()
    assert backbone.dit.proj_out.weight.grad is not None
    with torch.no_grad():
        backbone.guided_velocity_fn(cond, dit=backbone.dit)(x, sigma)  # the RL reference DiT
    assert counter.frame_count == 0


def test_compiled_blocks_inline_into_the_sampling_step(backbone):
    """hardware.compile and hardware.compile_sampling together (the gpu config): still one graph per shape."""
    eager = sample(backbone, [SHORT])
    compile_blocks(backbone, backend="aot_eager")
    counter = CompileCounter()
    backbone.compile_sampling(backend=counter, mode=None)
    torch.testing.assert_close(sample(backbone, [SHORT]), eager, atol=1e-4, rtol=1e-4)
    assert counter.frame_count == 1
