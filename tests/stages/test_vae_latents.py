"""Training on cached VAE latents (data.vae_latents): the same loss as encoding, and never another VAE's."""

import copy
from dataclasses import replace

import pytest
import torch

from deepgen.config import DataConfig, StageConfig
from deepgen.data.latents import add_vae_latents, vae_fingerprint
from deepgen.data.shards import LatentCacheError, ReadOptions, edit_batches, shard_urls, t2i_batches
from deepgen.data.tiny_world import write_tiny_world_shards
from stages.sft import JointSFTModule
from tests.conftest import tiny_model_config

OPTS = replace(
    ReadOptions.from_config(DataConfig(name="t", shards_dir="-", image_size=64, shuffle_buffer=0)),
    resampled=False,
    vae_latents=True,
)


@pytest.fixture(scope="module")
def module(tiny_zoo):
    torch.manual_seed(0)
    model_cfg = tiny_model_config(tiny_zoo)
    module = JointSFTModule(model_cfg, StageConfig(name="sft", train_dit=True, cfg_dropout=0.0), max_steps=1)
    module.configure_model()
    return module


def batches(shards_dir) -> dict[str, dict]:
    """One T2I batch and one edit batch, read with the cache."""
    t2i = next(t2i_batches(shard_urls(shards_dir, "t2i-*.tar"), batch_size=3, opts=OPTS))
    edit = next(edit_batches(shard_urls(shards_dir, "edit-*.tar"), batch_size=2, opts=OPTS))
    return {"t2i": t2i, "edit": edit}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, module):
    out = tmp_path_factory.mktemp("cached") / "shards"
    write_tiny_world_shards(out, num_t2i=3, num_edit=2, samples_per_shard=4, seed=0)
    add_vae_latents(out, module.backbone.vae, image_size=64, progress=False, log=lambda _: None)
    return out


def loss(module, batch, seed: int) -> float:
    torch.manual_seed(seed)  # noise, sigmas, the VAE sample and LoRA/DiT dropout all draw from it
    with torch.no_grad():
        return float(module.task_loss(batch))


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_cached_latents_give_the_encoded_loss_without_running_the_encoder(module, shards, task, monkeypatch):
    batch = batches(shards)[task]
    uncached = {k: v for k, v in batch.items() if k != "vae_moments"}
    encoded = loss(module, uncached, seed=0)

    def no_encoder(*args, **kwargs):
        raise AssertionError("the VAE encoder ran on a batch with cached latents")

    monkeypatch.setattr(module.backbone.vae, "encode", no_encoder)
    cached = loss(module, batch, seed=0)
    other_draw = loss(module, batch, seed=1)
    assert cached == pytest.approx(encoded, rel=1e-3)  # the cache is float16
    # The match is not trivial: another draw of noise, sigma and VAE sample changes the loss far more.
    assert abs(other_draw - encoded) > 20 * abs(cached - encoded)


def test_latents_of_another_vae_are_refused_by_name(module, tmp_path):
    out = tmp_path / "shards"
    write_tiny_world_shards(out, num_t2i=3, num_edit=2, samples_per_shard=4, seed=0)
    other = copy.deepcopy(module.backbone.vae)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    add_vae_latents(out, other, image_size=64, progress=False, log=lambda _: None)
    batch = batches(out)["t2i"]
    with pytest.raises(LatentCacheError) as err:
        module.task_loss(batch)
    message = str(err.value)
    assert "\n" not in message
    assert vae_fingerprint(other) in message and vae_fingerprint(module.backbone.vae) in message
    assert f"convert.py latents --shards {out} --vae {module.model_cfg.dit_path} --image-size 64" in message
