"""Cached VAE latents in the shards: what is stored, how the reader checks it, and the CLI that makes it."""

import copy
import importlib
import io
import json
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch

from deepgen.config import DataConfig
from deepgen.data.latents import add_vae_latents, read_samples, vae_fingerprint
from deepgen.data.schema import LATENT_RECORD
from deepgen.data.shards import (
    DataHealth,
    LatentCacheError,
    ReadOptions,
    edit_batches,
    shard_urls,
    t2i_batches,
)
from deepgen.data.tiny_world import write_tiny_world_shards
from deepgen.data.writer import MANIFEST_NAME, write_shard
from deepgen.model.loading import load_vae
from tests.conftest import ROOT

with pytest.MonkeyPatch.context() as _patch:  # convert.py is an entry point at the repository root
    _patch.syspath_prepend(str(ROOT))
    convert = importlib.import_module("convert")

SIZE = 64
PLAIN = replace(
    ReadOptions.from_config(DataConfig(name="t", shards_dir="-", image_size=SIZE, shuffle_buffer=0)),
    resampled=False,
)
CACHED = replace(PLAIN, vae_latents=True)
FP16 = dict(rtol=2e-3, atol=2e-3)


def write_shards(path):
    """T2I at 1:1 and signs at 2:1, edits with 1:1 and 2:1 sources: the cache must follow every size."""
    write_tiny_world_shards(
        path, num_t2i=4, num_text_t2i=2, num_edit=3, num_text_edit=2, samples_per_shard=4, seed=0
    )
    return path


def members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


@pytest.fixture(scope="module")
def vae(tiny_zoo):
    return load_vae(tiny_zoo.dit_dir)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, vae):
    out = write_shards(tmp_path_factory.mktemp("latents") / "shards")
    report = add_vae_latents(out, vae, image_size=SIZE, progress=False, log=lambda _: None)
    return out, report


def test_cache_holds_the_vae_posterior_of_each_resized_image(cached, vae):
    out, report = cached
    assert report["written"] == report["shards"] == 4 and report["vae"] == vae_fingerprint(vae)
    t2i = list(t2i_batches(shard_urls(out, "t2i-*.tar"), batch_size=2, opts=CACHED))
    shapes = {tuple(b["images"].shape[2:]) for b in t2i}
    assert (64, 64) in shapes and len(shapes) == 2  # and the signs' 2:1 size
    for batch in t2i:
        moments = batch["vae_moments"]["images"]
        assert moments.dtype == torch.float16 and moments.shape[1] == 2 * vae.config.latent_channels
        with torch.no_grad():
            expected = vae.encode(batch["images"]).latent_dist.parameters
        torch.testing.assert_close(moments.float(), expected, **FP16)
        assert batch["vae_moments"]["vae"] == [report["vae"]] * len(batch["keys"])
    for batch in edit_batches(shard_urls(out, "edit-*.tar"), batch_size=2, opts=CACHED):
        cache = batch["vae_moments"]
        with torch.no_grad():
            torch.testing.assert_close(
                cache["targets"].float(), vae.encode(batch["targets"]).latent_dist.parameters, **FP16
            )
            for sources, moments in zip(batch["sources"], cache["sources"], strict=True):
                for image, m in zip(sources, moments, strict=True):
                    expected = vae.encode(image[None]).latent_dist.parameters[0]
                    torch.testing.assert_close(m.float(), expected, **FP16)
    # Without the switch the same shards read as before: no cache in the batch.
    assert "vae_moments" not in next(t2i_batches(shard_urls(out, "t2i-*.tar"), batch_size=2, opts=PLAIN))


def test_adding_latents_keeps_every_sample_and_resumes(tmp_path, vae):
    out = write_shards(tmp_path / "shards")
    before = {p.name: members(p) for p in sorted(out.glob("*.tar"))}
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    report = add_vae_latents(out, vae, image_size=SIZE, vae_dir="zoo/sd3", progress=False, log=lambda _: None)
    for name, old in before.items():
        new = members(out / name)
        added = sorted(set(new) - set(old))
        assert added and all(m.endswith(".latent.npy") for m in added)
        for member, data in old.items():
            if member.endswith(".json"):
                meta = json.loads(new[member])
                assert meta.pop(LATENT_RECORD) == {"vae": report["vae"], "image_size": SIZE, "size_unit": 32}
                assert meta == json.loads(data)
            else:
                assert new[member] == data  # images byte for byte
    now = json.loads((out / MANIFEST_NAME).read_text())
    assert now[LATENT_RECORD]["vae"] == report["vae"] and now[LATENT_RECORD]["vae_dir"] == "zoo/sd3"
    assert {k: v for k, v in now.items() if k != LATENT_RECORD} == manifest  # counts, tiny-world arguments
    again = add_vae_latents(out, vae, image_size=SIZE, progress=False, log=lambda _: None)
    assert again["written"] == 0

    # Another VAE replaces the cache of every shard; the old latents go, none are duplicated.
    other = copy.deepcopy(vae)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    replaced = add_vae_latents(out, other, image_size=SIZE, progress=False, log=lambda _: None)
    assert replaced["written"] == 4 and replaced["vae"] != report["vae"]
    for name, old in before.items():
        new = members(out / name)
        images = [m for m in old if not m.endswith(".json")]
        assert len(new) == len(old) + len(images)  # one latent per image, the old ones replaced
        records = [json.loads(v)[LATENT_RECORD]["vae"] for k, v in new.items() if k.endswith(".json")]
        assert set(records) == {replaced["vae"]}


def test_fingerprint_follows_the_weights_and_the_config(vae):
    same = copy.deepcopy(vae)
    assert vae_fingerprint(same) == vae_fingerprint(vae) and len(vae_fingerprint(vae)) == 16
    with torch.no_grad():
        next(same.parameters()).view(-1)[0] += 1e-4
    assert vae_fingerprint(same) != vae_fingerprint(vae)
    rescaled = copy.deepcopy(vae)
    rescaled.register_to_config(scaling_factor=vae.config.scaling_factor * 2)
    assert vae_fingerprint(rescaled) != vae_fingerprint(vae)


def test_reader_refuses_a_missing_cache_or_one_made_at_another_size(tmp_path, cached):
    plain = write_shards(tmp_path / "plain")
    with pytest.raises(LatentCacheError, match="has no cached VAE latents") as err:
        next(t2i_batches(shard_urls(plain, "t2i-*.tar"), batch_size=2, opts=CACHED))
    assert f"convert.py latents --shards {plain} " in str(err.value) and "\n" not in str(err.value)
    out, _ = cached
    smaller = replace(CACHED, image_size=32)
    with pytest.raises(LatentCacheError, match="made at image_size=64, size_unit=32.*data.image_size=32"):
        next(t2i_batches(shard_urls(out, "t2i-*.tar"), batch_size=2, opts=smaller))


def test_a_broken_latent_member_is_a_counted_skip(tmp_path, cached):
    out, _ = cached
    path = shard_urls(out, "t2i-*.tar")[0]
    samples = read_samples(path)
    raw = members(path)
    for sample in samples:  # read_samples drops the cache: put it back, breaking the first sample's
        sample["latent.npy"] = raw[f"{sample['__key__']}.latent.npy"]
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 3), dtype=np.float16))
    samples[0]["latent.npy"] = buf.getvalue()  # a posterior of the wrong shape
    samples[1]["latent.npy"] = samples[1]["latent.npy"][:200]  # truncated
    broken = tmp_path / "t2i-000000.tar"
    write_shard(broken, samples)
    health = DataHealth(max_bad_fraction=1.0)
    batches = list(t2i_batches([str(broken)], batch_size=8, opts=CACHED, health=health))
    assert health.reasons == {"bad_latent": 2}
    assert batches[0]["keys"] == [s["__key__"] for s in samples[2:]]
    assert batches[0]["vae_moments"]["images"].shape[0] == len(samples) - 2


def test_convert_latents_command(tmp_path, tiny_zoo, capsys):
    out = write_shards(tmp_path / "shards")
    args = ["latents", "--shards", str(out), "--image-size", str(SIZE), "--device", "cpu", "--no-progress"]
    assert convert.main([*args, "--vae", str(tiny_zoo.dit_dir)]) == 0
    assert "4 of 4 shards written now" in capsys.readouterr().out
    assert next(t2i_batches(shard_urls(out, "t2i-*.tar"), batch_size=2, opts=CACHED))["vae_moments"]
    assert convert.main([*args, "--vae", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no vae/config.json" in err and str(tmp_path / "nowhere") in err


def test_conversion_with_vae_caches_its_output(tmp_path, tiny_zoo, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i, (size, colour) in enumerate([((64, 64), "red"), ((96, 48), "blue")]):
        Image.new("RGB", size, colour).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a {colour} image")
    out = tmp_path / "shards"
    argv = ["--layout", "folder", "--input", str(images), "--out", str(out), "--no-progress"]
    assert (
        convert.main([*argv, "--vae", str(tiny_zoo.dit_dir), "--image-size", str(SIZE), "--device", "cpu"])
        == 0
    )
    assert "1 of 1 shards written now" in capsys.readouterr().out
    batches = list(t2i_batches(shard_urls(out, "t2i-*.tar"), batch_size=1, opts=CACHED))
    assert sorted(b["captions"][0] for b in batches) == ["a blue image", "a red image"]
    for b in batches:  # each posterior is of its own image's size (2:1 for the second)
        (h, w), (lh, lw) = b["images"].shape[-2:], b["vae_moments"]["images"].shape[-2:]
        assert h // lh == w // lw > 1 and h % lh == w % lw == 0
    assert {tuple(b["images"].shape[-2:]) for b in batches} == {(64, 64), (64, 96)}
