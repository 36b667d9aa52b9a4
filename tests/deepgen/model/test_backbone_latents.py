"""DeepGenBackbone.sample_latents: encode_images from a cached VAE posterior."""

import torch

from deepgen.model.backbone import DeepGenBackbone


def test_sample_latents_draws_what_encode_images_draws(tiny_model_cfg):
    bb = DeepGenBackbone.from_pretrained_dirs(tiny_model_cfg)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        moments = bb.vae.encode(images).latent_dist.parameters
        assert moments.shape == (2, 2 * bb.vae.config.latent_channels, *bb.latent_shape(64, 64)[1:])
        for seed in (3, 4):  # the same generator draw gives the same latent, bit for bit, in float32
            expected = bb.encode_images(images, torch.Generator().manual_seed(seed))
            assert torch.equal(bb.sample_latents(moments, torch.Generator().manual_seed(seed)), expected)
        torch.manual_seed(5)  # and so does the global generator, which training uses
        expected = bb.encode_images(images)
        torch.manual_seed(5)
        assert torch.equal(bb.sample_latents(moments), expected)
        assert not torch.equal(bb.sample_latents(moments), expected)  # the draw matters
