import lightning as L
import torch
from torch.utils.data import DataLoader

from deepgen.config import LoraConfig, StageConfig
from deepgen.io.checkpoints import load_checkpoint_dir
from stages.checkpoint_io import SafeCheckpointIO
from stages.sft import JointSFTModule


def stage_cfg() -> StageConfig:
    return StageConfig(name="sft", train_dit=True, lora=LoraConfig(rank=4, alpha=8))


def batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    img = lambda *s: torch.rand(*s, generator=g) * 2 - 1  # noqa: E731
    t2i = {"task": "t2i", "images": img(2, 3, 64, 64), "captions": ["a red circle", "a blue square"]}
    edit = {
        "task": "edit",
        "sources": [[img(3, 64, 64)], [img(3, 64, 64)]],
        "targets": img(2, 3, 64, 64),
        "instructions": ["make it blue", "remove the circle"],
    }
    return [(t2i, t2i, edit)[i % 3] for i in range(n)]


def trainer(max_steps: int, tmp_path) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        plugins=[SafeCheckpointIO()],
        default_root_dir=tmp_path,
        gradient_clip_val=1.0,
    )


def test_sft_trains_bridge_dit_and_language_model_lora_only(tiny_model_cfg):
    module = JointSFTModule(tiny_model_cfg, stage_cfg(), max_steps=10)
    module.configure_model()
    names = module.trainable_names()
    assert "backbone.think_tokens" in names
    assert any(n.startswith("backbone.bridge.") for n in names)
    assert any(n.startswith("backbone.dit.") for n in names)
    lora = [n for n in names if n.startswith("backbone.vlm.")]
    assert lora and all("lora_" in n and "language_model" in n for n in lora)
    assert not any(n.startswith("backbone.vae.") for n in names)
    assert all(p.requires_grad for p in module.backbone.dit.parameters())


def test_caption_dropout_rate():
    module = JointSFTModule(
        None, StageConfig(name="sft", train_dit=True, cfg_dropout=0.1), max_steps=1, seed=0
    )
    dropped = sum(c == "" for c in module.drop_captions(["x"] * 5000))
    assert 400 < dropped < 600


def test_steps_checkpoint_and_resume(tiny_model_cfg, tmp_path):
    module = JointSFTModule(tiny_model_cfg, stage_cfg(), max_steps=4)
    t = trainer(3, tmp_path)
    t.fit(module, DataLoader(batches(3), batch_size=None))
    assert t.global_step == 3
    path = tmp_path / "step=3.ckpt"
    t.save_checkpoint(path)
    ckpt = load_checkpoint_dir(path)
    assert set(ckpt["state_dict"]) == set(module.trainable_names())  # trainable weights only
    assert ckpt["optimizer_states"][0]["state"]  # AdamW moments saved

    resumed = JointSFTModule(tiny_model_cfg, stage_cfg(), max_steps=4)
    t2 = trainer(4, tmp_path)
    t2.fit(resumed, DataLoader(batches(4)[3:], batch_size=None), ckpt_path=path)
    assert t2.global_step == 4
    # the resumed weights started from the checkpoint, so they differ from a fresh init but stay close
    fresh = JointSFTModule(tiny_model_cfg, stage_cfg(), max_steps=4)
    fresh.configure_model()
    name = "backbone.bridge.fuse.weight"
    w_ckpt, w_res = ckpt["state_dict"][name], dict(resumed.named_parameters())[name].detach()
    assert (w_res - w_ckpt).abs().max() < (dict(fresh.named_parameters())[name].detach() - w_ckpt).abs().max()
