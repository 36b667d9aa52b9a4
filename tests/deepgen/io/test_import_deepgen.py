"""Importing checkpoints in the original DeepGen naming (meta_queries, projector_*, connector.*, transformer.*, lmm.*)."""

import pytest
import torch
from safetensors.torch import save_file

from deepgen.config import LoraConfig
from deepgen.io.import_deepgen import import_deepgen_state, load_released
from deepgen.model.backbone import DeepGenBackbone
from deepgen.model.lora import attach_vlm_lora
from tests.conftest import outputs, perturb, to_original


class Opaque:
    """Not an allowed global for torch.load(weights_only=True)."""


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def assert_differs(a, b):
    assert any(not torch.allclose(x, y, atol=1e-4) for x, y in zip(a, b, strict=True))


@pytest.fixture
def fresh(tiny_model_cfg):
    return DeepGenBackbone.from_pretrained_dirs(tiny_model_cfg).eval()


NEW_PARTS = ("bridge.", "dit.", "think_tokens")


@pytest.fixture
def source_full(tiny_model_cfg):
    """Every part perturbed, the VLM included."""
    return perturb(DeepGenBackbone.from_pretrained_dirs(tiny_model_cfg), seed=7).eval()


@pytest.fixture
def source(tiny_model_cfg):
    """Bridge, think tokens and DiT perturbed; the VLM is the stock one (files without ``lmm.`` keys)."""
    return perturb(DeepGenBackbone.from_pretrained_dirs(tiny_model_cfg), seed=3, prefixes=NEW_PARTS).eval()


def test_full_original_state_reproduces_bridge_and_dit(source_full, fresh):
    source = source_full
    state = to_original(source.state_dict())
    assert (
        "meta_queries" in state
        and "projector_1.weight" in state
        and "lmm.model.layers.0.mlp.up_proj.weight" in state
    )
    expected = outputs(source)
    assert_differs(outputs(fresh), expected)

    report = import_deepgen_state(state, fresh)

    assert report.unexpected == [] and report.merged_lora == []
    # the tiny VLM ties lm_head to embed_tokens: the (unused) head is skipped, not counted missing
    assert report.ignored == ["lmm.lm_head.weight"]
    assert report.missing and all(k.startswith("vae.") for k in report.missing)
    assert report.counts["matched"] == len(state) - 1
    assert "think_tokens" in report.matched and "vlm.model.visual.blocks.0.attn.qkv.weight" in report.matched
    assert_same(outputs(fresh), expected)


def test_bridge_and_dit_only_file_keeps_vlm(source, fresh):
    """What the original's state_dict() saves: no vae., lmm. or ema. keys."""
    state = to_original(source.state_dict(), vlm=False)
    expected = outputs(source)
    assert_differs(outputs(fresh), expected)
    report = import_deepgen_state(state, fresh)
    assert set(report.missing_by_part()) == {"vae", "vlm"} and report.unexpected == []
    assert report.counts["matched"] == len(state)
    assert_same(outputs(fresh), expected)


def test_vlm_lora_loads_into_adapters_or_merges(source_full, tiny_model_cfg):
    source = source_full
    """SFT-style file: new transformers layout, peft base_layer + lora_A/lora_B names, alpha not stored."""
    lora = LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    attach_vlm_lora(source.vlm, lora)
    perturb(source, seed=11, prefixes=("vlm.",))  # lora_B starts at zero
    source.eval()
    state = {
        ("lmm." + k[len("vlm.") :] if k.startswith("vlm.") else k): v
        for k, v in to_original(source.state_dict()).items()
    }
    for k in [k for k in state if k.startswith("lmm.model.")]:  # undo the old-layout rename of to_original
        state["lmm.model.language_model." + k[len("lmm.model.") :]] = state.pop(k)
    assert any(".lora_A.default.weight" in k for k in state) and any(".base_layer." in k for k in state)
    expected = outputs(source)

    with_adapters = DeepGenBackbone.from_pretrained_dirs(tiny_model_cfg)
    attach_vlm_lora(with_adapters.vlm, lora)
    report = import_deepgen_state(state, with_adapters.eval())
    assert report.unexpected == [] and report.merged_lora == []
    assert_same(outputs(with_adapters), expected)

    plain = DeepGenBackbone.from_pretrained_dirs(tiny_model_cfg).eval()
    report = import_deepgen_state(state, plain, lora_alpha=8)
    assert report.unexpected == [] and len(report.merged_lora) == 2 * len(
        source.vlm.model.language_model.layers
    )
    assert all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in report.merged_lora)
    for x, y in zip(outputs(plain), expected, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_report_lists_unexpected_and_ignored_keys(source, fresh):
    state = to_original(source.state_dict(), vlm=False)
    state["projector_4.weight"] = torch.zeros(2, 2)
    state["lmm.model.not_a_layer.weight"] = torch.zeros(2)
    state["module.ema.projector_1.weight"] = torch.zeros(2)
    state["vae.encoder.conv_in.weight"] = torch.zeros(2)
    report = import_deepgen_state(state, fresh)
    assert sorted(report.unexpected) == ["lmm.model.not_a_layer.weight", "projector_4.weight"]
    assert sorted(report.ignored) == ["module.ema.projector_1.weight", "vae.encoder.conv_in.weight"]
    assert report.counts["unexpected"] == 2
    assert "projector_4.weight" in report.summary()


def test_shape_mismatch_names_the_key_and_loads_nothing(source, fresh):
    state = to_original(source.state_dict(), vlm=False)
    state["projector_1.weight"] = state["projector_1.weight"][:, :-1]
    before = fresh.bridge.seq_head.weight.clone()
    with pytest.raises(ValueError, match=r"projector_1\.weight -> bridge\.fuse\.weight"):
        import_deepgen_state(state, fresh)
    torch.testing.assert_close(fresh.bridge.seq_head.weight, before, rtol=0, atol=0)


def test_released_file_layouts(source, fresh, tmp_path):
    state = to_original(source.state_dict(), vlm=False)
    expected = outputs(source)
    torch.save({"state_dict": state, "meta": {"iter": 200000}}, tmp_path / "iter_200000.pth")
    ds = tmp_path / "iter_400000.pth" / "global_step1"  # DeepSpeed folder saved under a .pth name
    ds.mkdir(parents=True)
    (ds.parent / "latest").write_text("global_step1")
    torch.save({"module": {f"module.{k}": v for k, v in state.items()}}, ds / "mp_rank_00_model_states.pt")
    torch.save(state, tmp_path / "MR-GDPO_final.pt")
    for path in ("iter_200000.pth", "iter_400000.pth", "MR-GDPO_final.pt"):
        target = perturb(fresh, seed=99, prefixes=NEW_PARTS)
        report = load_released(tmp_path / path, target)
        assert report.counts["matched"] == len(state) and report.unexpected == [], path
        assert_same(outputs(target), expected)


def test_pickled_objects_are_refused_by_default(source, fresh, tmp_path):
    torch.save(
        {"state_dict": {"meta_queries": source.think_tokens.detach()}, "obj": Opaque()}, tmp_path / "x.pt"
    )
    with pytest.raises(ValueError, match="allow_pickle"):
        load_released(tmp_path / "x.pt", fresh)


def test_diffusers_folder(source, fresh, tmp_path):
    folder = tmp_path / "DeepGen-1.0-diffusers"
    source.dit.save_pretrained(folder / "transformer")
    (folder / "connector").mkdir(parents=True)
    bridge = {
        k: v
        for k, v in to_original(source.state_dict(), vlm=False).items()
        if not k.startswith("transformer.")
    }
    # encoder keys stored without their ``connector.`` prefix, the rest in the original naming
    bridge = {
        (k[len("connector.") :] if k.startswith("connector.") else k): v.contiguous()
        for k, v in bridge.items()
    }
    save_file(bridge, folder / "connector" / "model.safetensors")
    (folder / "model_index.json").write_text("{}")

    report = load_released(folder, fresh)

    assert report.unexpected == [] and set(report.missing_by_part()) == {"vae", "vlm"}
    assert any(k.startswith("dit.transformer_blocks.") for k in report.matched)
    assert_same(outputs(fresh), outputs(source))
