"""export.py and deepgen/io/export.py: a tiny SFT checkpoint (LoRA attached, every weight perturbed so a
dropped or mis-merged part shows) exported to standard folders, loaded back part by part with the stock
transformers/diffusers classes and as a whole by load_model and generate.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from PIL import Image
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

from deepgen.images import to_uint8
from deepgen.inference import SOURCES, generate_images, load_model, read_run_config
from deepgen.io.export import EXPORT_FORMAT, EXPORT_MANIFEST
from deepgen.model.loading import load_diffusion, load_vlm
from tests.conftest import outputs, write_run

ROOT = Path(__file__).resolve().parents[1]
LORA_LAYER = "model.language_model.layers.0.self_attn.q_proj"


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, script, "--device", "cpu", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_ckpt(tiny_sft_run, tmp_path_factory) -> Path:
    """The tiny SFT checkpoint with every weight perturbed: untrained, LoRA B and the bridge heads are zero,
    so a merge that dropped the adapters or a bridge left at its init would still pass."""
    ckpt, state, _ = tiny_sft_run
    model_cfg, lora, _ = read_run_config(ckpt)
    gen = torch.Generator().manual_seed(5)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    return write_run(tmp_path_factory.mktemp("outputs") / "sft" / "perturbed", model_cfg, lora, perturbed)


@pytest.fixture(scope="module")
def exported(trained_ckpt, tmp_path_factory) -> tuple[Path, str]:
    """The export.py folder of ``trained_ckpt``'s run folder, and the script's stdout."""
    out = tmp_path_factory.mktemp("exports") / "sft"
    result = run_script("export.py", "--checkpoint", str(trained_ckpt.parents[1]), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, result.stdout


@pytest.fixture(scope="module")
def original(trained_ckpt):
    return load_model(trained_ckpt, device="cpu").backbone


def test_export_writes_standard_folders_and_a_manifest(exported, trained_ckpt):
    out, stdout = exported
    assert f"to {out}" in stdout and "84 LoRA layers merged" in stdout  # 12 layers x 7 projections
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    assert manifest["format"] == EXPORT_FORMAT and manifest["format_version"] == 1
    assert manifest["source"] == str(trained_ckpt.resolve()) and manifest["merged_lora_layers"] == 84
    for name in ("model_index.json", "transformer/config.json", "vae/config.json", "bridge/config.json"):
        assert (out / name).is_file(), name
    for name in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "config.json"):
        assert (out / "vlm" / name).is_file(), name
    assert (
        json.loads((out / "transformer" / "config.json").read_text())["_class_name"]
        == "SD3Transformer2DModel"
    )
    assert not Path(str(out) + ".tmp").exists()


def test_parts_load_with_transformers_and_diffusers(exported, original, trained_ckpt):
    out, _ = exported
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "vlm")
    vlm_state = vlm.state_dict()
    assert not [k for k in vlm_state if "lora_" in k or "base_layer" in k]
    # The merged weight is W + (alpha / r) B A, computed here without peft.
    _, lora, _ = read_run_config(trained_ckpt)
    layer = original.vlm.get_submodule(LORA_LAYER)
    base = layer.base_layer.weight
    delta = (lora.alpha / lora.rank) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(vlm_state[f"{LORA_LAYER}.weight"], base + delta)
    assert not torch.allclose(vlm_state[f"{LORA_LAYER}.weight"], base, atol=1e-3)
    torch.testing.assert_close(
        vlm_state["model.visual.blocks.0.attn.qkv.weight"],
        original.vlm.model.visual.blocks[0].attn.qkv.weight,
        rtol=0,
        atol=0,
    )

    dit = SD3Transformer2DModel.from_pretrained(out, subfolder="transformer")
    assert type(dit) is SD3Transformer2DModel
    ours = original.dit.state_dict()
    assert dit.state_dict().keys() == ours.keys()
    assert all(torch.equal(v, ours[k]) for k, v in dit.state_dict().items())
    vae = AutoencoderKL.from_pretrained(out, subfolder="vae")
    assert all(torch.equal(v, original.vae.state_dict()[k]) for k, v in vae.state_dict().items())
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    assert scheduler.config.shift == original.scheduler.config.shift

    bridge = load_file(out / "bridge" / "model.safetensors")
    expected = {
        k: v for k, v in original.state_dict().items() if k == "think_tokens" or k.startswith("bridge.")
    }
    assert bridge.keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in bridge.items())

    # The project's own loaders read the same folders (reference-latent DiT subclass, tokenizer, vision).
    assert load_vlm(out / "vlm").image_token_id == original.image_token_id
    assert type(load_diffusion(out).transformer).__name__ == "DeepGenSD3Transformer"


def test_reloaded_export_conditions_and_denoises_as_the_checkpoint(exported, original):
    out, _ = exported
    loaded = load_model(out, device="cpu")
    assert loaded.kind == "export" and loaded.num_loaded == len(
        [k for k in original.state_dict() if k == "think_tokens" or k.startswith("bridge.")]
    )
    assert not [n for n, _ in loaded.backbone.named_parameters() if "lora_" in n]
    # LoRA merged into the base weights rounds differently from the adapter path: close, not equal (about
    # 2e-5 on values up to 14; dropping the adapters moves them by 0.1 to 3).
    for got, want in zip(outputs(loaded.backbone), outputs(original), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Editing conditioning runs the vision tower too.
    reference = torch.linspace(-1, 1, 3 * 64 * 64).reshape(3, 64, 64)
    with torch.no_grad():
        got = loaded.backbone.condition_edit(["make it blue"], [[reference]])
        want = original.condition_edit(["make it blue"], [[reference]])
    torch.testing.assert_close(got.seq, want.seq, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.pooled, want.pooled, rtol=1e-4, atol=1e-4)


def test_generate_from_export_matches_the_checkpoint(exported, original, tmp_path):
    """generate.py on the export gives the stage checkpoint's image (what generate.py makes of a checkpoint
    is tested in test_generate.py; here the checkpoint's image is made in-process, which saves a run)."""
    out, _ = exported
    args = ["--checkpoint", str(out), "--prompt", "a red circle", "--seed", "3", "--out", str(tmp_path)]
    result = run_script("generate.py", "--steps", "2", "--size", "64", *args)
    assert result.returncode == 0, result.stderr
    num_bridge = len(load_file(out / "bridge" / "model.safetensors"))
    assert f"Loaded {num_bridge} weights from {out}" in result.stdout
    with Image.open(tmp_path / "0000_a-red-circle_00.png") as img:
        assert img.text["checkpoint"] == str(out)
        got = np.asarray(img).astype(int)
    want = to_uint8(generate_images(original, "a red circle", width=64, height=64, num_steps=2, seed=3))[0]
    # Float rounding of the merged LoRA may move a pixel by a level.
    assert np.abs(got - want.astype(int)).max() <= 2 and np.abs(got - want.astype(int)).mean() < 0.05


def test_sources_that_are_none_of_the_three_kinds_fail_naming_the_path(tmp_path, exported, tiny_zoo):
    out, _ = exported
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model deepgen can load") as err:
        load_model(empty, device="cpu")
    assert str(empty) in str(err.value) and SOURCES in str(err.value)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt is a file but not a state dict"):
        load_model(text, device="cpu")
    run = tmp_path / "outputs" / "sft" / "fresh"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    with pytest.raises(FileNotFoundError, match="has no checkpoints yet"):
        load_model(run, device="cpu")
    with pytest.raises(ValueError, match="carries its own vlm/"):
        load_model(out, vlm_path=str(tiny_zoo.vlm_dir), device="cpu")
    with pytest.raises(ValueError, match="--model-config applies to released weights only"):
        load_model(out, model_config=str(ROOT / "conf" / "model" / "tiny.yaml"), device="cpu")
    torch.save({"meta_queries": torch.zeros(4, 64)}, tmp_path / "DeepGen.pt")
    with pytest.raises(ValueError, match=r"DeepGen\.pt hold the bridge and the DiT only: .*--vlm-path"):
        load_model(tmp_path / "DeepGen.pt", device="cpu")

    result = run_script("export.py", "--checkpoint", str(out), "--out", str(out))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        == f"export.py: error: Export folder {out} already exists: choose another --out or remove it"
    )
